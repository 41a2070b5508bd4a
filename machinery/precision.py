"""The forward pass's precision (float32, or bfloat16 or float16 under autocast): what a device computes natively,
--dtype auto's timing, float16's loss scaling. What the machine has is asked of device.py (tests stand in there)."""

import contextlib
import copy
import statistics
import time
import warnings

import torch
import torch.distributed as dist

from config import TinyLLMError

from machinery import device as hardware
from machinery.cli import warn


def has_native_bf16(device):
    """bfloat16 computed natively: torch.cuda.is_bf16_supported() also counts a T4, which emulates it slowly; a CPU
    without AVX512-BF16 or AMX converts it, slower than float32. MPS is counted out: its bfloat16 needs macOS 14."""
    if device.type == "cuda":
        return hardware.gpu(device)[1] >= (8, 0)
    has = hardware.machine()
    return device.type == "cpu" and (has.avx512_bf16 or has.amx)


def measured_on(device):
    """Whether --dtype auto times both precisions here (measure_dtype): native bfloat16 can still lose on a CPU."""
    return device.type == "cpu" and has_native_bf16(device)


def resolve_dtype(name, device):
    """The autocast precision; auto's bfloat16 on a CPU is provisional: measure_dtype keeps the faster."""
    native = has_native_bf16(device)
    if name == "auto":
        return "bfloat16" if native else "float16" if device.type == "cuda" else "float32"
    if name == "bfloat16" and not native and device.type != "mps":
        warn(f"{hardware.describe(device)} has no native bfloat16: it is emulated and slower than "
             f"{'float16' if device.type == 'cuda' else 'float32'}")
    if device.type == "mps" and name != "float32" and not hardware.autocast_works("mps", name):
        warn(f"torch {torch.__version__} cannot autocast to {name} on this Mac (bfloat16 needs torch 2.6 and "
             f"macOS 14): training in float32")
        return "float32"
    return name


def explain_dtype(asked, dtype):
    if asked != "auto":
        return dtype
    why = {"bfloat16": "native on this chip", "float16": "no native bfloat16: loss scaling on",
           "float32": "no native bfloat16 here"}[dtype]
    return f"{dtype} auto: {why}"


def autocast(device, dtype):
    """Run the forward pass in dtype (the weights stay float32)."""
    return contextlib.nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))


# ----------------------------------------------------------------------------- float16's loss scaling

def make_scaler(device, dtype):
    """float16's gradients underflow without the device's loss scaler: refused where none works. Others: None."""
    if dtype != "float16":
        return None
    version = hardware.machine().torch
    if device.type == "mps" and version < (2, 8):  # its unscale_ makes a float64 tensor there
        raise TinyLLMError(f"--dtype float16 on a Mac needs torch 2.8 or later, whose gradient scaler works on MPS "
                           f"(this is {'.'.join(map(str, version))}); use --dtype float32, or upgrade torch")
    with warnings.catch_warnings():  # a scaler that disables itself warns; we say it better below
        warnings.simplefilter("ignore")
        scaler = hardware.gradient_scaler(device.type)
    if not scaler.is_enabled():
        raise TinyLLMError(f"--dtype float16 needs a gradient scaler, which torch does not provide on "
                           f"{device}; use --dtype bfloat16 or float32")
    return scaler


# ----------------------------------------------------------------------------- --dtype auto, measured

# bfloat16 must beat float32 by this much: at equal steps it ends about 0.012 higher in val loss
# (docs/recipe_search.md), which about a quarter more steps win back in a five-minute run
BF16_MARGIN = 1.25
UNTIMED_STEPS = 2        # per candidate precision: the first steps pay for allocations and kernel choices
TIMED_STEPS = 8          # per candidate precision, after those


def measure_dtype(run, train_step):
    """{"dtype", "dtype_note"}: float32 and bfloat16 timed on this machine (rank 0's choice, every rank follows)."""
    seconds = time_steps(run, train_step, ["float32", "bfloat16"])  # {dtype: seconds per step}
    ratio = seconds["float32"] / seconds["bfloat16"]  # bfloat16's speed, in float32's
    plan = (dict(dtype="bfloat16", dtype_note=f"bfloat16: {ratio:.2f}x float32 here, measured") if ratio >= BF16_MARGIN
            else dict(dtype="float32", dtype_note=f"float32: bfloat16 was {ratio:.2f}x here, measured"))
    if run.world > 1:
        holder = [plan]
        dist.broadcast_object_list(holder, src=0)
        plan = holder[0]
    return plan


@contextlib.contextmanager
def trial(run):
    """Train for measurement only: weights, optimizer state, loss scale and every RNG are put back after."""
    weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    optimizer = copy.deepcopy(run.optimizer.state_dict())
    scaler = copy.deepcopy(run.scaler.state_dict()) if run.scaler else None
    rng = hardware.rng_state()
    try:
        yield
    finally:
        run.model.load_state_dict(weights)
        run.optimizer.load_state_dict(optimizer)
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler:
            run.scaler.load_state_dict(scaler)
        hardware.set_rng_state(rng)


def interleaved(calls, untimed, timed):
    """Seconds of each timed call of each function, interleaved so that drift slows them alike."""
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
    return train_step(run.train_model, run.optimizer, run.next_batch, run.cfg.lr, run.cfg.grad_accum_steps,
                      run.cfg.grad_clip, ctx, scaler)


def time_steps(run, train_step, dtypes):
    """Mean seconds of a step in each dtype (no loss scaler): a run's length is a sum of skewed step times."""
    def step_in(dtype):
        ctx = autocast(run.device, dtype)
        return lambda: trial_step(run, train_step, ctx)["loss"].item()  # .item(): the device has finished the step

    with trial(run):
        times = interleaved([step_in(dtype) for dtype in dtypes], UNTIMED_STEPS, TIMED_STEPS)
    return {dtype: statistics.mean(t) for dtype, t in zip(dtypes, times)}
