"""Plans the step a run ends at under a time budget (--time_budget 5m).

Before every step, the end is planned again from the pace so far. So a run on a machine that slows
down still ends on time, and its last step is at the end of its learning-rate schedule. The time
of evaluations is set aside: the budget keeps as much for the last evaluation, and the pace counts
steps alone. The ranks plan by their mean clock."""

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
        self.first_step = state.step  # the pace of this process counts from here
        self.first_seconds = state.elapsed(settings.started)
        self.aside = 0.0  # seconds this process spent on evaluations, left out of the pace

    def plan(self, state, warmup):
        """Returns the step the run ends at.

        Without a time budget, that is --max_steps. With one, it is the last step that fits in the
        time left at the pace so far, and never a step within the warmup of the schedule.
        `warmup` is the number of warmup steps."""
        if not self.seconds:
            return state.max_steps
        now = self.process.mean([state.elapsed(self.settings.started)])[0]
        # 1% of the budget is kept for the closing sample and the exit
        self.left = 0.99 * self.seconds - state.eval_seconds - now
        steps = state.step - self.first_step
        pace = (now - self.first_seconds - self.aside) / steps if steps else 0.0
        # before the first step of this process there is no pace: keep the saved or warmup plan
        planned = state.step + math.floor(self.left / pace) if pace else state.max_steps
        if planned <= state.step:  # out of time: the previous step was the last, or this one is
            planned = min(state.max_steps, state.step + 1)
        return max(warmup + 1, planned)

    def spent_in_warmup(self, state, warmup):
        """Returns whether the time ran out before the warmup of the schedule ended.

        The run cannot end there, because its LR never decayed."""
        return self.left is not None and self.left <= 0 and state.step <= warmup

    def too_short(self, state, warmup, saved):
        """Returns the error that stops a run whose budget ran out within the warmup.

        `saved` says whether its steps are in last.pt, so that the run can go on from there with a
        longer budget."""
        cfg = self.settings.cfg
        spent = f"--time_budget {cfg.time_budget} is too short here: it was spent within the"
        spent += f" schedule's warmup ({warmup} steps); give more time or a shorter warmup"
        if not saved:
            return TinyLLMError(spent)
        resume = cli.resume_command(self.settings.stage, cfg.out_dir)
        went = f"{spent}. Its {state.step} steps are in {os.path.join(cfg.out_dir, 'last.pt')}"
        return TinyLLMError(f"{went}; go on: {resume} --time_budget {2 * self.seconds:g}s")

    def room_to_evaluate(self, state):
        """Returns whether time is left for steps after an evaluation as long as the last one.

        Under a time budget, a periodic evaluation needs that time; the last evaluation does not."""
        return self.left is None or self.left > state.eval_seconds

    @contextlib.contextmanager
    def set_aside(self, state):
        """Times an evaluation and keeps the mean over the ranks as state.eval_seconds.

        That time is left out of the pace."""
        started = time.perf_counter()
        yield
        state.eval_seconds = self.process.mean([time.perf_counter() - started])[0]
        self.aside += state.eval_seconds
