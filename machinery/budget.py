"""A run's progress, which optim.get_lr's schedule is a function of: 0 at the end of the warmup, 1 at the end
(max_steps, or where a --time_budget runs out). A time budget re-estimates its end at every progress line and
goes on in a straight line from where it is, so the LR never rises and reaches min_lr as the time runs out."""

import math
import time

import torch

from config import GREEDY, TinyLLMError, parse_duration
import sampling

from machinery.cli import format_seconds
from machinery.device import broadcast_from_master


def now():
    """The clock every duration of a run is read from."""
    return time.perf_counter()


SAFETY = 0.01     # of a time budget: for the process's exit, and drift after the last estimate


def progress(step, progress_from, end_step):
    """Progress at step: a straight line from progress_from = [step0, progress0] to 1 at end_step."""
    step0, progress0 = progress_from
    if step >= end_step:
        return 1.0
    if step <= step0:
        return progress0
    return progress0 + (1 - progress0) * (step - step0) / (end_step - step0)


def start_and_end(state, cfg):
    """(progress_from, end_step): from 0 at the warmup's end unless re-aimed, to max_steps or a budget's estimate."""
    start = state.progress_from or [cfg.warmup_steps, 0.0]
    end = (state.end_step if state.end_step is not None else math.inf) if cfg.time_budget else cfg.max_steps
    return start, end


def run_progress(state, cfg):
    return progress(state.step, *start_and_end(state, cfg))


def resume_at(state, cfg, old_end):
    """A new end on resume (--max_steps): progress goes on from where old_end had it, to 1 at the new end."""
    if state.step >= cfg.warmup_steps:
        state.progress_from = [state.step, progress(state.step, start_and_end(state, cfg)[0], old_end)]
    state.end_step = None


class Clock:
    """The loop's progress and end; a --time_budget's end is re-aimed from the time spent (resumes included)."""

    def __init__(self, run):
        self.state, self.cfg, self.master, self.world = run.state, run.cfg, run.master, run.world
        self.seconds = parse_duration(run.cfg.time_budget) if run.cfg.time_budget else None
        self.started, self.earlier = run.started, run.state.seconds
        self.sample_seconds = time_sample(run) if self.seconds else 0.0  # measured before the first step

    def progress(self):
        return run_progress(self.state, self.cfg)

    def at_end(self):
        return self.state.step >= start_and_end(self.state, self.cfg)[1]

    def steps_shown(self):
        """The step the run ends at, as a line shows it: max_steps, a budget's estimate, or ? before its first."""
        end = start_and_end(self.state, self.cfg)[1]
        return "?" if end == math.inf else f"{math.ceil(end)}"

    def spent(self):
        return self.earlier + now() - self.started

    def evaluated(self, seconds, step_seconds):
        """An evaluation took seconds (saves and plots included): a budget keeps room for one more, and re-aims."""
        if self.seconds:
            self.state.eval_seconds = seconds
            self.paced(step_seconds)

    def paced(self, step_seconds):
        """A budget aims progress straight from here (in the warmup: from its end) to where its time runs out."""
        if not self.seconds:
            return
        state, cfg, end = self.state, self.cfg, None
        if self.master:
            try:
                end = self.end_step(step_seconds)
            except TinyLLMError as e:
                end = str(e)
        end = broadcast_from_master(end, self.world)
        if isinstance(end, str):
            raise TinyLLMError(end)
        if end is not None:
            if state.step >= cfg.warmup_steps:
                state.progress_from = [state.step, run_progress(state, cfg)]
            state.end_step = end

    def end_step(self, step_seconds):
        """The most steps (and their evaluations) that fit in what is left less the closing sample, SAFETY and one
        more evaluation: an unforeseen one would cut the schedule short. None before a step is timed."""
        state, cfg = self.state, self.cfg
        left = self.seconds * (1 - SAFETY) - self.spent() - state.eval_seconds - self.sample_seconds
        if not step_seconds:
            if left <= 0:
                raise self.too_short(0.0)
            return None
        first = state.step + (state.last_eval_step == state.step)  # the first step that may still evaluate

        def fits(n):  # n more steps, and the evaluations on the way (at steps first to step + n - 1)
            evaluations = max(0, (state.step + n - 1) // cfg.eval_interval - (first - 1) // cfg.eval_interval)
            return n * step_seconds + evaluations * state.eval_seconds <= left

        n = max(0, int(left / (step_seconds + state.eval_seconds / cfg.eval_interval)))  # about right; then exactly
        while fits(n + 1):
            n += 1
        while n > 0 and not fits(n):
            n -= 1
        if state.step + n <= cfg.warmup_steps:
            raise self.too_short(step_seconds)
        return state.step + n

    def too_short(self, step_seconds):
        state, cfg = self.state, self.cfg
        need = self.spent() + state.eval_seconds + self.sample_seconds + 2 * cfg.warmup_steps * step_seconds
        return TinyLLMError(
            f"--time_budget {cfg.time_budget} is too short here: {self.spent():.1f}s are gone, an evaluation takes "
            f"{state.eval_seconds:.1f}s, a step {1000 * step_seconds:.0f}ms and the closing sample "
            f"{self.sample_seconds:.1f}s, which leaves no time after the warmup ({cfg.warmup_steps} steps); give at "
            f"least {need / (1 - SAFETY):.0f}s")

    def summary(self):
        """A time budget's closing line: the time used, and the --max_steps that trains as many steps (else None)."""
        if self.seconds:
            return (f"time budget {self.cfg.time_budget}: {format_seconds(self.spent())} used, "
                    f"{self.state.step:,} steps (python train.py --max_steps {self.state.step} trains as many, "
                    f"decaying by steps)")


def time_sample(run):
    """Seconds the closing sample will take, from 16 timed tokens (0 without one)."""
    n = run.cfg.sample_tokens
    if not n:
        return 0.0
    start = torch.zeros((1, 1), dtype=torch.long, device=run.device)
    model = run.model.eval()
    sampling.generate(model, start, 2, GREEDY).tolist()  # once untimed
    t0 = now()
    sampling.generate(model, start, 16, GREEDY).tolist()  # (.tolist(): a GPU has finished only now)
    model.train()
    return (now() - t0) / 16 * n * 1.2  # longer contexts cost a little more per token
