"""Number formats: which precision a run computes in (float32, bfloat16, or float16 with loss scaling), and
--dtype auto on a CPU with bfloat16 instructions, where bfloat16 can be faster or slower than float32: trial
steps time both, and bfloat16 is taken only if clearly faster (a resume keeps TrainState.plan)."""

import contextlib
import copy
import statistics
import time
import warnings

import torch

from config import TinyLLMError

from machinery import hardware
from machinery.cli import warn
from machinery.device import describe, rng_state, set_rng_state
from machinery.distributed import broadcast_from_master


# ----------------------------------------------------------------------------- which precision

def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: the CPU multiplies bfloat16 matrices in hardware. Without them
    torch still runs bfloat16, by converting, which is slower than float32."""
    return hardware.cpu_has_avx512_bf16() or hardware.cpu_has_amx()


def has_native_bf16(device):
    """bfloat16 that the chip computes natively. torch.cuda.is_bf16_supported() also counts a
    T4 (compute capability 7.5), which only emulates it: slowly, and without flash attention.
    MPS is counted out: its bfloat16 needs macOS 14 and is not needed for a tiny model."""
    if device.type == "cuda":
        return hardware.gpu_capability(device) >= (8, 0)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def measured_on(device):
    """Whether --dtype auto times both precisions here (measure_dtype, below): on a CPU with bfloat16 instructions."""
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_dtype(name, device):
    """The autocast precision. auto: bfloat16 where native (about 0.01 higher loss at equal steps, for faster
    steps; on a CPU provisionally, as measure_dtype keeps the faster), float16 with a gradient scaler on older
    GPUs, float32 elsewhere."""
    native = has_native_bf16(device)
    if name == "auto":
        if native:
            return "bfloat16"
        return "float16" if device.type == "cuda" else "float32"
    if name == "bfloat16" and not native and device.type != "mps":
        warn(f"{describe(device)} has no native bfloat16: it is emulated and slower than "
             f"{'float16' if device.type == 'cuda' else 'float32'}")
    if device.type == "mps" and name != "float32" and not hardware.autocast_works("mps", name):
        warn(f"torch {torch.__version__} cannot autocast to {name} on this Mac (bfloat16 needs torch 2.6 and "
             f"macOS 14): training in float32")
        return "float32"
    return name


def explain_dtype(asked, dtype):
    """For the start-up line: the dtype, and why when --dtype auto chose it."""
    if asked != "auto":
        return dtype
    why = {"bfloat16": "native on this chip", "float16": "no native bfloat16: loss scaling on",
           "float32": "no native bfloat16 here"}[dtype]
    return f"{dtype} auto: {why}"


def autocast(device, dtype):
    """Run the forward pass in dtype (the weights stay float32); a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


# ----------------------------------------------------------------------------- float16's loss scaling

def make_scaler(device, dtype):
    """float16 gradients underflow without loss scaling, so float16 training needs the
    device's gradient scaler; refuse where torch has none that works. Other dtypes: None."""
    if dtype != "float16":
        return None
    if device.type == "mps" and hardware.torch_version() < (2, 8):  # its unscale_ makes a float64 tensor there
        raise TinyLLMError(f"--dtype float16 on a Mac needs torch 2.8 or later, whose gradient scaler works on MPS "
                           f"(this is {'.'.join(map(str, hardware.torch_version()))}); use --dtype float32, or upgrade torch")
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
