"""A --time_budget: how far the run is by seconds of the time usable (what get_lr's decay follows in place of
optim.progress's steps), so that the last step's LR is at its floor; when it ends; its ETA."""

import math
import time

from config import TinyLLMError, parse_duration

from machinery.cli import format_seconds
from machinery.ddp import all_ranks_mean


def now():
    """The clock every duration of a run is read from."""
    return time.perf_counter()


SAFETY = 0.01     # of a time budget: for the process's exit and the device's last queued steps


class Clock:
    """How far the loop is: steps to max_steps, or a --time_budget's time spent (with resumes); it writes nothing."""

    def __init__(self, cfg, state, started, world, device, sample_seconds=0.0):  # started: this process's start
        self.cfg, self.state, self.started, self.world, self.device = cfg, state, started, world, device
        self.seconds = parse_duration(cfg.time_budget) if cfg.time_budget else None
        self.read_at = None  # the (step, last evaluation) of the latest reading of the clock
        self.sample_seconds = self.ranks_mean(sample_seconds) if self.seconds else 0.0
        self.spent_at_start = self.spent_at_last_step = self.spent() if self.seconds else 0.0  # of this process
        self.first_step = state.step

    def elapsed(self):
        """The run's wall time so far, set-up included: this process's, and those it resumes (state.seconds)."""
        return self.state.seconds + now() - self.started

    def ranks_mean(self, seconds):
        """Several processes read their clocks a little apart: every one takes their mean, so all decide alike."""
        return all_ranks_mean([seconds], self.world, self.device)[0]

    def spent(self):
        """The run's seconds, every process's mean: read once a step and again after an evaluation, for a mean
        waits for every process (and a GPU's queued steps)."""
        at = (self.state.step, self.state.last_eval_step)
        if self.read_at != at:
            self.read_at, self.spent_then = at, self.ranks_mean(self.elapsed())
        return self.spent_then

    def usable_seconds(self):
        return self.seconds * (1 - SAFETY) - self.state.eval_seconds - self.sample_seconds

    def at_end(self):
        """max_steps taken, or a budget's end (room kept for the last evaluation and sample; in the warmup: an error)"""
        if not self.seconds:
            return self.state.step >= self.cfg.max_steps
        spent = self.spent()
        if spent >= self.usable_seconds() and self.state.step <= self.cfg.warmup_steps:
            raise TinyLLMError(f"--time_budget {self.cfg.time_budget} is too short here: {spent:.1f}s were gone "
                               f"before the warmup's {self.cfg.warmup_steps} steps were done (an evaluation takes "
                               f"{self.state.eval_seconds:.1f}s and the closing sample {self.sample_seconds:.1f}s); "
                               f"give a longer budget, or fewer --warmup_steps")
        return spent >= self.usable_seconds()

    def progress_by_time(self, progress):
        """Under a --time_budget, how far the run is at this step (optim.progress by steps): 0 through the warmup, then
        on toward 1 by the share the last step used of the seconds left less two steps' (a slow last one still at 1)."""
        spent = self.spent()
        used = spent - self.spent_at_last_step
        left = self.usable_seconds() - 2 * self.pace(spent) - self.spent_at_last_step
        self.spent_at_last_step = spent
        if self.state.step <= self.cfg.warmup_steps:
            return progress
        return 1.0 if used >= left else progress + (1.0 - progress) * used / left

    def pace(self, spent):
        """Seconds a step in this process, evaluations included (0 before its first)."""
        steps = self.state.step - self.first_step
        return (spent - self.spent_at_start) / steps if steps > 0 else 0.0

    def room_for_evaluation(self):
        """False where an evaluation would leave a budget no time for steps: the last step's LR would miss the floor."""
        return not self.seconds or self.spent() + self.state.eval_seconds < self.usable_seconds()

    def end_step(self):
        """The step the run ends at: max_steps, or a budget's estimate at its pace so far (None before it has one)."""
        if not self.seconds:
            return self.cfg.max_steps
        spent = self.spent()
        pace = self.pace(spent)
        return self.state.step + max(0, math.ceil((self.usable_seconds() - spent) / pace)) if pace > 0 else None

    def summary(self):
        """A time budget's closing line: the time used, and the --max_steps that trains as many steps (else None)."""
        if self.seconds:
            return (f"time budget {self.cfg.time_budget}: {format_seconds(self.spent())} used, {self.state.step:,} "
                    f"steps, the last at LR {self.state.lr:.4g} (floor {self.cfg.min_lr:g}) (python train.py "
                    f"--max_steps {self.state.step} trains as many, decaying by steps)")

