"""A time budget (--time_budget 5m): the run's end step, planned again before every step from the
pace so far, so that a run on a machine that slows down still ends on time, its last step at the
end of its learning-rate schedule. An evaluation's time is set aside: the budget keeps as much for
the last one, and the pace counts steps alone. The ranks plan by their mean clock."""

import contextlib
import math
import os
import time

from config import TinyLLMError, parse_duration
from machinery import cli


class Budget:
    def __init__(self, settings, process, state):
        self.settings = settings
        self.process = process
        self.seconds = parse_duration(settings.cfg.time_budget)  # None: --max_steps ends the run
        self.left = None  # the seconds left for steps
        self.first_step = state.step  # this process's pace counts from here
        self.first_seconds = state.elapsed(settings.started)
        self.aside = 0.0  # the seconds of this process's evaluations: no part of the pace

    def plan(self, state, warmup):
        """The step the run ends at: --max_steps; or under a time budget, the steps that fit in the
        time left at the pace so far, never within the schedule's warmup (warmup: its steps)."""
        if not self.seconds:
            return state.max_steps
        now = self.process.mean([state.elapsed(self.settings.started)])[0]
        # 1% of the budget is kept for the closing sample and the exit
        self.left = 0.99 * self.seconds - state.eval_seconds - now
        steps = state.step - self.first_step
        pace = (now - self.first_seconds - self.aside) / steps if steps else 0.0
        # no pace before this process's first step: the plan a resume saved, or the warmup's
        planned = state.step + math.floor(self.left / pace) if pace else state.max_steps
        if planned <= state.step:  # out of time: the step before was the last, or this one is
            planned = min(state.max_steps, state.step + 1)
        return max(warmup + 1, planned)

    def spent_in_warmup(self, state, warmup):
        """Whether the time ran out before the schedule's warmup ended: the run cannot end there,
        its LR never decayed."""
        return self.left is not None and self.left <= 0 and state.step <= warmup

    def too_short(self, state, warmup, saved):
        """The error that stops a run whose budget was spent within the warmup; saved: whether its
        steps are in last.pt, to go on from with a longer budget."""
        cfg = self.settings.cfg
        spent = f"--time_budget {cfg.time_budget} is too short here: it was spent within the"
        spent += f" schedule's warmup ({warmup} steps); give more time or a shorter warmup"
        if not saved:
            return TinyLLMError(spent)
        resume = cli.resume_command(self.settings.stage, cfg.out_dir)
        went = f"{spent}. Its {state.step} steps are in {os.path.join(cfg.out_dir, 'last.pt')}"
        return TinyLLMError(f"{went}; go on: {resume} --time_budget {2 * self.seconds:g}s")

    def room_to_evaluate(self, state):
        """Whether time is left for steps after an evaluation as long as the last one: under a time
        budget, a periodic evaluation needs it (the last one does not)."""
        return self.left is None or self.left > state.eval_seconds

    @contextlib.contextmanager
    def set_aside(self, state):
        """An evaluation's time (the ranks' mean): kept as state.eval_seconds, out of the pace."""
        started = time.perf_counter()
        yield
        state.eval_seconds = self.process.mean([time.perf_counter() - started])[0]
        self.aside += state.eval_seconds
