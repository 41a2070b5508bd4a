"""A time budget (--time_budget 5m): the step a run ends at, planned again before every step from
the time left and the pace so far, so that the learning-rate schedule ends as the time does."""

import math

from config import TinyLLMError


def time_left(state, budget, now):
    """The seconds left for steps, now seconds into a budget of seconds. That is 99% of the
    budget (the last 1% is for the closing sample and the exit), less the last evaluation's
    time. None without a budget (--max_steps)."""
    return None if budget is None else 0.99 * budget - state.eval_seconds - now


def budget_end(state, cfg, left, pace):
    """The step a --time_budget run ends at: as many steps as fit in the seconds left, at pace
    (a step's seconds in this process so far; 0 before its first step). It is planned again
    before every step, so a machine that slows down still ends on time, its schedule with it.
    The end is never within the warmup. A run whose time ran out before its planned end takes
    one more step, its last."""
    if state.step <= cfg.warmup_steps and left <= 0:
        raise TinyLLMError(
            f"--time_budget {cfg.time_budget} is too short here: it was spent before the "
            f"warmup's {cfg.warmup_steps} steps; give more time or fewer --warmup_steps"
        )
    if not pace:  # no step yet: the plan a resume saved, or the warmup's
        return max(state.max_steps, cfg.warmup_steps + 1)
    planned = state.step + math.floor(left / pace)
    if planned <= state.step:  # out of time: the step before was the last, or this one is
        planned = min(state.max_steps, state.step + 1)
    return max(cfg.warmup_steps + 1, planned)
