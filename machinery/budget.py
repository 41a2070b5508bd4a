"""When a run ends: after max_steps steps (Steps), or as its --time_budget runs out (TimeBudget).
The loop asks either one the same questions: how far the run is at a step (the schedule's
progress, optim.get_lr), whether it is over, whether an evaluation fits, and at which step it will
end. What a budget must remember across a resume is its state_dict, saved in every checkpoint."""

import math

from config import TinyLLMError, parse_duration
from optim import progress


class Steps:
    """A run of max_steps steps."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.eval_seconds = 0.0  # the latest evaluation's (a time budget keeps as much)

    def progress(self, state):  # of the step about to be taken
        return progress(state.step, self.cfg)

    def over(self, state):
        return state.step >= self.cfg.max_steps

    def room_for_eval(self, state):
        return True

    def end_step(self, state, step_seconds=None):
        return self.cfg.max_steps

    def state_dict(self):
        return {"eval_seconds": self.eval_seconds}

    def load_state_dict(self, saved):
        self.eval_seconds = saved["eval_seconds"]


class TimeBudget(Steps):
    """A run of --time_budget. clock() gives this process's seconds so far; state.seconds are
    those before it (a resume's). After the warmup, progress is the share spent of the time from
    the warmup's end to the steps' end, 99% of the budget (1% is kept for the closing evaluation's
    time, the sample and the exit): the schedule's decay ends as the time does."""

    def __init__(self, cfg, clock):
        super().__init__(cfg)
        self.clock, self.seconds = clock, parse_duration(cfg.time_budget)
        self.decay_start = None  # the seconds at the warmup's end
        self.first = None  # (step, seconds) where this process's pace counts from

    def now(self, state):
        return state.seconds + self.clock()

    def end(self):
        """When the steps must end: the budget less room for the closing evaluation and 1%."""
        return self.seconds * 0.99 - self.eval_seconds

    def progress(self, state):
        """0 through the warmup, then the share of the time spent, counted at the end of the step
        about to be taken (so the step that crosses the end is at 1)."""
        seconds = self.now(state)
        if self.first is None:
            self.first = (state.step, seconds)
        if state.step <= self.cfg.warmup_steps or self.decay_start is None:  # None: a resumed run
            if seconds >= self.end():
                raise TinyLLMError(
                    f"--time_budget {self.cfg.time_budget} is too short here: {seconds:.1f}s "
                    f"were gone before the warmup's {self.cfg.warmup_steps} steps; give more "
                    f"time or fewer --warmup_steps"
                )
            self.decay_start = seconds
            return 0.0
        span = max(1e-9, self.end() - self.decay_start)
        return min(1.0, (seconds + self.pace(state, seconds) - self.decay_start) / span)

    def over(self, state):
        return state.progress >= 1.0

    def room_for_eval(self, state):
        """Whether an evaluation now still leaves time for steps after it."""
        return self.now(state) + self.eval_seconds < self.end()

    def pace(self, state, seconds):
        """A step's seconds in this process so far, evaluations included; 0 before its first."""
        steps = state.step - self.first[0] if self.first else 0
        return (seconds - self.first[1]) / steps if steps else 0.0

    def end_step(self, state, step_seconds=None):
        """The step the run will end at, at its pace so far (or at step_seconds before a step of
        this process); None before either."""
        seconds = self.now(state)
        step_seconds = self.pace(state, seconds) or step_seconds
        if not step_seconds:
            return None
        return state.step + max(0, math.ceil((self.end() - seconds) / step_seconds))

    def state_dict(self):
        return super().state_dict() | {"decay_start": self.decay_start}

    def load_state_dict(self, saved):  # a run of max_steps given a time budget: decays from now
        super().load_state_dict(saved)
        self.decay_start = saved.get("decay_start")


def budget_of(cfg, clock):
    """The run's end: its time budget, by the clock given, or its step count."""
    return TimeBudget(cfg, clock) if cfg.time_budget else Steps(cfg)
