"""--dtype auto on a CPU with bfloat16 instructions, where bfloat16 can be faster or slower than float32:
trial steps time both, and bfloat16 is taken only if clearly faster (a resume keeps TrainState.plan)."""

import contextlib
import copy
import statistics
import time

from machinery.device import rng_state, set_rng_state
from machinery.distributed import broadcast_from_master
from machinery.precision import autocast


# bfloat16 must beat float32 by this much: at equal steps it ends about 0.012 higher in val loss
# (docs/recipe_search.md), which about a quarter more steps win back in a five-minute run
BF16_MARGIN = 1.25
UNTIMED_STEPS = 2        # per candidate precision: the first steps pay for allocations and kernel choices
TIMED_STEPS = 8          # per candidate precision, after those


def measure_dtype(run, train_step):
    """{"dtype", "dtype_note"}: float32 and bfloat16 timed on this machine (rank 0's choice, every rank follows)."""
    seconds = time_steps(run, train_step, ["float32", "bfloat16"])  # {dtype: seconds per step}
    return broadcast_from_master(choose_dtype(seconds), run.world)


def choose_dtype(seconds):
    ratio = seconds["float32"] / seconds["bfloat16"]  # bfloat16's speed, in float32's
    if ratio >= BF16_MARGIN:
        return {"dtype": "bfloat16", "dtype_note": f"bfloat16: {ratio:.2f}x float32 here, measured"}
    return {"dtype": "float32", "dtype_note": f"float32: bfloat16 was {ratio:.2f}x here, measured"}


@contextlib.contextmanager
def trial(run):
    """Train for measurement only: weights, optimizer state, loss scale and every RNG are put back after."""
    weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    optimizer = copy.deepcopy(run.optimizer.state_dict())
    scaler = copy.deepcopy(run.scaler.state_dict()) if run.scaler else None
    rng = rng_state()
    try:
        yield
    finally:
        run.model.load_state_dict(weights)
        run.optimizer.load_state_dict(optimizer)
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler:
            run.scaler.load_state_dict(scaler)
        set_rng_state(rng)


def interleaved(calls, untimed, timed):
    """Seconds of each timed call of each function, interleaved so that drift slows them alike; the first
    untimed calls pay one-time costs (allocations, kernel choices, compilation)."""
    times = [[] for _ in calls]
    for i in range(untimed + timed):
        for call, seconds in zip(calls, times):
            t0 = time.perf_counter()
            call()
            if i >= untimed:
                seconds.append(time.perf_counter() - t0)
    return times


def trial_step(run, train_step, ctx, scaler=None):
    """One of the run's training steps at its peak learning rate, for measuring (within trial())."""
    cfg = run.cfg
    return train_step(run.train_model, run.optimizer, run.next_batch, cfg.lr, cfg.grad_accum_steps, cfg.grad_clip,
                      ctx, scaler)


def time_steps(run, train_step, dtypes):
    """Mean seconds of one optimizer step in each dtype (float32 or bfloat16: no loss scaler).
    A run's length is a sum of steps, and step times are skewed: the mean, not the median."""
    def step_in(dtype):
        ctx = autocast(run.device, dtype)

        def step():
            loss, _ = trial_step(run, train_step, ctx)
            loss.item()  # wait for the device to finish the step
        return step

    with trial(run):
        times = interleaved([step_in(dtype) for dtype in dtypes], UNTIMED_STEPS, TIMED_STEPS)
    return {dtype: statistics.mean(t) for dtype, t in zip(dtypes, times)}
