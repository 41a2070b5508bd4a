"""Where the numbers are computed and in what format: the device, the random generators, the precision, and peak
FLOP/s for MFU. The first section is the one place tinyllm asks torch what the machine has: tests
replace those functions, never torch's own (which torch's internals read too); plain functions decide from the facts."""

import contextlib
import copy
import random
import statistics
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch

from config import DEVICES, TinyLLMError

from machinery.cli import log, warn


# ----------------------------------------------------------------------------- what the machine has

# torch's CPU probes are private: a test checks this torch has them, lest a renamed one quietly answer "no bfloat16"
AVX512_BF16_PROBE, AMX_PROBE = "_is_avx512_bf16_supported", "_is_amx_tile_supported"


def machine():
    """What this machine has (torch's version as (major, minor)); asking costs nothing and starts no GPU."""
    cuda = torch.cuda.is_available()
    return SimpleNamespace(cuda=cuda, mps=torch.backends.mps.is_available(),
                           gpus=torch.cuda.device_count() if cuda else 0,
                           avx512_bf16=getattr(torch.cpu, AVX512_BF16_PROBE, lambda: False)(),
                           amx=getattr(torch.cpu, AMX_PROBE, lambda: False)(),
                           torch=tuple(int(x) for x in torch.__version__.split(".")[:2]))


def gpu(device=None):
    """A CUDA GPU's (name, (major, minor) compute capability); asking starts CUDA, so only a run on the GPU asks."""
    return torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)


def autocast_works(device_type, dtype):
    """Whether autocast runs dtype here or turns itself off (MPS's bfloat16 needs torch 2.6 and macOS 14)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type, dtype=getattr(torch, dtype)):
            return torch.is_autocast_enabled(device_type)


# ----------------------------------------------------------------------------- the device

def choose_device(name="auto"):
    has = machine()
    if name == "auto":
        return torch.device("cuda" if has.cuda else "mps" if has.mps else "cpu")
    if name.split(":")[0] not in DEVICES or name.startswith("auto"):  # ("auto:1" is no device either)
        raise TinyLLMError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if name.startswith("cuda") and not has.cuda:
        raise TinyLLMError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    if name == "mps" and not has.mps:
        raise TinyLLMError("--device mps asked for, but MPS is not available here; use --device cpu")
    return torch.device(name)


def describe(device):
    """The device in words, for the start-up line: 'cuda (Tesla T4)', 'cpu'."""
    return f"{device} ({gpu(device)[0]})" if device.type == "cuda" else str(device)


@contextlib.contextmanager
def out_of_memory_as_error(hint):
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError on CUDA; a RuntimeError saying so on MPS and CPUs
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() or "CPUAllocator" in str(e):
            raise TinyLLMError(hint) from None
        raise


def configure_matmul(device):
    """TF32 matmuls for float32 on GPUs (Ampere and later); never on a CPU, where some got ten times slower."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores ('highest', torch's default, has none)


def set_threads(n=0):
    """Use n CPU threads for torch's kernels (0: torch's default, one per physical core); returns how many."""
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- random numbers

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator too


def rng_state():
    """Every RNG a run draws from, as plain data and tensors (safe for weights_only loads)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's key is uint32, which torch before 2.6 cannot save: kept as int64, every value exact
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],  # a CPU run never starts CUDA
        "mps": torch.mps.get_rng_state() if machine().mps else None,  # dropout on a Mac's GPU draws from it
    }


def set_rng_state(state):
    """Restore what rng_state saved; on fewer GPUs than saved, those it has, with a note about the rest."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    gpus, mps, note = device_states(state, machine())
    if mps is not None:
        torch.mps.set_rng_state(mps)
    for index, gpu_state in enumerate(gpus):
        torch.cuda.set_rng_state(gpu_state, device=index)
    if note:
        log(note)


def device_states(state, has):
    """(the GPUs' states to restore, the Mac GPU's or None, a note or None) of a saved rng_state on a machine `has`."""
    saved = list(state.get("cuda", []))
    note = None if len(saved) <= has.gpus else (
        f"note: the checkpoint holds the CUDA random state of {len(saved)} GPU(s), this machine has {has.gpus}; "
        f"restored {has.gpus}, so dropout on the rest continues from a fresh seed")
    return saved[:has.gpus], state.get("mps") if has.mps else None, note


# ----------------------------------------------------------------------------- peak FLOPs, for MFU

# Dense tensor-core peaks in TFLOP/s per autocast dtype, by the GPU's exact name; float32 means TF32 where the GPU
# has it (configure_matmul turns it on). A name not here gets no MFU rather than a wrong one (mfu_note says so).
_A100 = {"bfloat16": 312, "float16": 312, "float32": 156}
_H100_SXM = {"bfloat16": 989, "float16": 989, "float32": 495}
_V100_SXM = {"float16": 125, "float32": 15.7}
_V100_PCIE = {"float16": 112, "float32": 14}
PEAK_TFLOPS = {
    "Tesla T4": {"float16": 65, "float32": 8.1},
    "Tesla V100-SXM2-16GB": _V100_SXM, "Tesla V100-SXM2-32GB": _V100_SXM,
    "Tesla V100-PCIE-16GB": _V100_PCIE, "Tesla V100-PCIE-32GB": _V100_PCIE,
    "NVIDIA A100-SXM4-40GB": _A100, "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100, "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A10": {"bfloat16": 125, "float16": 125, "float32": 62.5},
    "NVIDIA L4": {"bfloat16": 121, "float16": 121, "float32": 60},
    "NVIDIA L40": {"bfloat16": 181, "float16": 181, "float32": 90.5},
    "NVIDIA L40S": {"bfloat16": 362, "float16": 362, "float32": 183},
    "NVIDIA H100 80GB HBM3": _H100_SXM, "NVIDIA H200": _H100_SXM,
    "NVIDIA H100 PCIe": {"bfloat16": 756, "float16": 756, "float32": 378},
    "NVIDIA GeForce RTX 3090": {"bfloat16": 71, "float16": 71, "float32": 35.6},
    "NVIDIA GeForce RTX 4090": {"bfloat16": 165, "float16": 165, "float32": 82.6},
}


def peak_flops(device, dtype):
    """The chip's peak FLOP/s at dtype, None where unknown (a CPU, a Mac, a GPU or dtype not in the table)."""
    peak = PEAK_TFLOPS.get(gpu(device)[0], {}).get(dtype) if device.type == "cuda" else None
    return peak and peak * 1e12


def mfu_note(device, dtype):
    """A start-up line where a GPU's progress lines will show no MFU (its peak at dtype unknown), else None."""
    if device.type == "cuda" and not peak_flops(device, dtype):
        return f"note: MFU is not shown: the {dtype} peak of {gpu(device)[0]!r} is not in device.PEAK_TFLOPS"


def flops_per_token(model):
    """Forward + backward FLOPs per token at full context (the PaLM appendix estimate)."""
    return 6 * model.num_params() + 12 * model.config.n_layer * model.config.n_embd * model.config.block_size


# ----------------------------------------------------------------------------- the precision

def has_native_bf16(device):
    """bfloat16 computed natively: torch.cuda.is_bf16_supported() also counts a T4, which emulates it slowly; a CPU
    without AVX512-BF16 or AMX converts it, slower than float32. MPS is counted out: its bfloat16 needs macOS 14."""
    if device.type == "cuda":
        return gpu(device)[1] >= (8, 0)
    has = machine()
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
        warn(f"{describe(device)} has no native bfloat16: it is emulated and slower than "
             f"{'float16' if device.type == 'cuda' else 'float32'}")
    if device.type == "mps" and name != "float32" and not autocast_works("mps", name):
        warn(f"torch {torch.__version__} cannot autocast to {name} on this Mac (bfloat16 needs torch 2.6 and "
             f"macOS 14): training in float32")
        return "float32"
    return name


def auto_meanings(device):
    """{setting: (default, what it is here)} of the settings whose "auto" this machine decides, for --help. (A GPU is
    not asked: that would start CUDA in every process, --device cpu or not.)"""
    dtype = ("bfloat16 from compute capability 8.0, else float16" if device.type == "cuda" else "measured at start-up "
             "here" if measured_on(device) else f"{resolve_dtype('auto', device)} here")
    threads = (0, f"{set_threads(0)} here")
    return {"device": ("auto", f"{device.type} here"), "dtype": ("auto", dtype), "threads": threads}


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
    version = machine().torch
    if device.type == "mps" and version < (2, 8):  # its unscale_ makes a float64 tensor there
        raise TinyLLMError(f"--dtype float16 on a Mac needs torch 2.8 or later, whose gradient scaler works on MPS "
                           f"(this is {'.'.join(map(str, version))}); use --dtype float32, or upgrade torch")
    with warnings.catch_warnings():  # a scaler that disables itself warns; we say it better below
        warnings.simplefilter("ignore")
        scaler = torch.amp.GradScaler(device.type)  # is_enabled() False where torch has none for it
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


def measure_dtype(step, model, optimizer, device):
    """{"dtype", "dtype_note"}: float32 and bfloat16 timed on this machine (under torchrun the caller sends rank 0's).
    step(ctx): one training step of the run's in the forward precision ctx, as trial steps that leave no trace."""
    seconds = time_steps(step, model, optimizer, device, ["float32", "bfloat16"])  # {dtype: seconds per step}
    ratio = seconds["float32"] / seconds["bfloat16"]  # bfloat16's speed, in float32's
    if ratio >= BF16_MARGIN:
        return dict(dtype="bfloat16", dtype_note=f"bfloat16: {ratio:.2f}x float32 here, measured")
    return dict(dtype="float32", dtype_note=f"float32: bfloat16 was {ratio:.2f}x here, measured")


@contextlib.contextmanager
def trial(model, optimizer, scaler=None):
    """Train for measurement only: weights, optimizer state, loss scale and every RNG are put back after."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    scaler_state = copy.deepcopy(scaler.state_dict()) if scaler else None
    rng = rng_state()
    try:
        yield
    finally:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.load_state_dict(scaler_state)
        set_rng_state(rng)


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


def time_steps(step, model, optimizer, device, dtypes):
    """Mean seconds of a step(ctx) in each dtype (no loss scaler): a run's length is a sum of skewed step times."""
    def step_in(dtype):
        ctx = autocast(device, dtype)
        return lambda: step(ctx)["loss"].item()  # .item(): the device has finished the step

    with trial(model, optimizer):
        times = interleaved([step_in(dtype) for dtype in dtypes], UNTIMED_STEPS, TIMED_STEPS)
    return {dtype: statistics.mean(t) for dtype, t in zip(dtypes, times)}
