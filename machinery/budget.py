"""How far a run is: the progress that optim.get_lr's schedule is a function of, 0 at the end
of the warmup and 1 at the end of the run.

A run given --max_steps ends at max_steps, and its progress moves on by one step's share at
every step. A --time_budget run (the default on a CPU or a Mac) ends when its time is up: at
every progress line aim() estimates the step at which the time will be spent, from the pace of
the latest steps, the last evaluation and the closing sample, and progress goes on in a
straight line from where it is to 1 at that step. So the learning rate never jumps, whatever
the machine's pace does, and it reaches min_lr as the time runs out. A resume that gives a new
--max_steps re-aims the same way. Where progress was last aimed from and the end it aims at are
TrainState's progress_from and end_step: every checkpoint saves them.
"""

import math
import time

from config import TinyLLMError, parse_duration

from machinery.distributed import broadcast_from_master


def now():
    """The clock every duration of a run is read from."""
    return time.perf_counter()


SAFETY = 0.01     # of a time budget: for the process's exit, and drift after the last estimate


def progress(step, progress_from, end_step):
    """How far the run is at step: from progress_from = [step0, progress0], in a straight line
    to 1 at end_step."""
    step0, progress0 = progress_from
    if step >= end_step:
        return 1.0
    if step <= step0:
        return progress0
    return progress0 + (1 - progress0) * (step - step0) / (end_step - step0)


def start_and_end(state, cfg):
    """(progress_from, end_step) of the run now: from the end of the warmup at 0 unless re-aimed
    since; to max_steps, or to a time budget's latest estimate (none yet: progress waits at 0)."""
    start = state.progress_from or [cfg.warmup_steps, 0.0]
    end = (state.end_step if state.end_step is not None else math.inf) if cfg.time_budget else cfg.max_steps
    return start, end


def run_progress(state, cfg):
    """The progress of the run's next step."""
    return progress(state.step, *start_and_end(state, cfg))


def resume_at(state, cfg, old_end):
    """A resumed run given a new end (--max_steps): progress goes on from where the old end had
    it, to 1 at the new end."""
    if state.step >= cfg.warmup_steps:
        state.progress_from = [state.step, progress(state.step, start_and_end(state, cfg)[0], old_end)]
    state.end_step = None


class Clock:
    """A run's progress as the loop asks for it: progress() for the schedule, at_end() for the
    loop, and what the loop tells it, evaluated() and paced(), which a time budget uses to aim the
    end and a run of --max_steps does not need. time_sample: the closing sample's seconds, asked
    for only under a time budget, which keeps room for it."""

    def __init__(self, run, time_sample):
        self.state, self.cfg = run.state, run.cfg
        self.budget = Budget(run, time_sample(run)) if run.cfg.time_budget else None

    def progress(self):
        return run_progress(self.state, self.cfg)

    def at_end(self):
        """Whether the run has taken its last step: max_steps, or where a time budget runs out."""
        return self.state.step >= start_and_end(self.state, self.cfg)[1]

    def steps_shown(self):
        """The step the run ends at, as a line shows it: max_steps, a budget's estimate, or ? before its first."""
        end = start_and_end(self.state, self.cfg)[1]
        return "?" if end == math.inf else f"{math.ceil(end)}"

    def evaluated(self, seconds, step_seconds):
        if self.budget:
            self.budget.evaluated(seconds, self.state, self.cfg, step_seconds)

    def paced(self, step_seconds):
        if self.budget:
            self.budget.aim(self.state, self.cfg, step_seconds)


class Budget:
    """A --time_budget run's time: how much of it is spent (this process's, from when python
    train.py started, and the run's earlier processes'), and where that puts the run's end."""

    def __init__(self, run, sample_seconds):
        self.seconds = parse_duration(run.cfg.time_budget)
        self.master, self.world = run.master, run.world
        self.started, self.earlier = run.started, run.state.seconds
        self.sample_seconds = sample_seconds  # the closing sample's, measured before the first step

    def spent(self):
        return self.earlier + now() - self.started

    def evaluated(self, seconds, state, cfg, step_seconds):
        """An evaluation took seconds (its saves and plots included): room is kept for one more
        at the end, and the end is re-aimed."""
        state.eval_seconds = seconds
        self.aim(state, cfg, step_seconds)

    def end_step(self, state, cfg, step_seconds):
        """The step at which the budget runs out: the most steps that fit, with the evaluations due
        among them, in what is left less the last evaluation, the closing sample and SAFETY (an
        evaluation that came unforeseen would pull the end in to where it is, leaving the
        schedule short of its end). None before a step is timed. A budget that would end the run
        within its warmup is refused."""
        left = self.seconds * (1 - SAFETY) - self.spent() - state.eval_seconds - self.sample_seconds
        if not step_seconds:
            if left <= 0:
                raise self.too_short(state, cfg, 0.0)
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
            raise self.too_short(state, cfg, step_seconds)
        return state.step + n

    def too_short(self, state, cfg, step_seconds):
        need = self.spent() + state.eval_seconds + self.sample_seconds + 2 * cfg.warmup_steps * step_seconds
        return TinyLLMError(
            f"--time_budget {cfg.time_budget} is too short here: {self.spent():.1f}s are gone, an evaluation takes "
            f"{state.eval_seconds:.1f}s, a step {1000 * step_seconds:.0f}ms and the closing sample "
            f"{self.sample_seconds:.1f}s, which leaves no time after the warmup ({cfg.warmup_steps} steps); give at "
            f"least {need / (1 - SAFETY):.0f}s")

    def aim(self, state, cfg, step_seconds):
        """At a progress line or an evaluation: aim the run's progress at the step where the
        budget runs out, from where it is now, in a straight line (rank 0 estimates, every rank
        follows; an error on rank 0 is the same one-line error on every rank). During the warmup
        the line starts at the warmup's end."""
        end = None
        if self.master:
            try:
                end = self.end_step(state, cfg, step_seconds)
            except TinyLLMError as e:
                end = str(e)
        end = broadcast_from_master(end, self.world)
        if isinstance(end, str):
            raise TinyLLMError(end)
        if end is not None:
            if state.step >= cfg.warmup_steps:
                state.progress_from = [state.step, run_progress(state, cfg)]
            state.end_step = end
