"""Where and how the numbers are computed: the device, the precision, CPU threads, the random
number generators, several processes under torchrun, and how fast the chip could go (for
MFU). Every decision a platform needs (a Colab T4, an L4 or A100, an Apple-silicon Mac, a
laptop CPU, a multi-GPU node) is made here once, for train.py, generate.py and bench.py.

What `python train.py` picks with no flags (the README's per-platform table):
    CUDA, compute capability 8.0+ (A100, L4, H100, RTX 30xx+)  small, bfloat16 autocast, TF32 matmuls
    CUDA, older (T4, V100)                                    small, float16 autocast + gradient scaler
    Apple silicon (MPS)                                       tiny, float32
    CPU with AVX512-BF16 or AMX (recent Xeon, EPYC, Ryzen)    tiny, bfloat16 autocast
    other CPUs                                                tiny, float32
"""

import contextlib
import os
import random
import warnings

import numpy as np
import torch
import torch.distributed as dist

from config import TinyLLMError, log, warn


# ----------------------------------------------------------------------------- the device

def choose_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise TinyLLMError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TinyLLMError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TinyLLMError("--device mps asked for, but MPS is not available here; use --device cpu")
    return torch.device(name)


def describe(device):
    """The device in words, for the start-up line: 'cuda (Tesla T4)', 'cpu'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# ----------------------------------------------------------------------------- precision

def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: the CPU multiplies bfloat16 matrices in hardware. Without them
    torch still runs bfloat16, by converting, which is slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def has_native_bf16(device):
    """bfloat16 that the chip computes natively. torch.cuda.is_bf16_supported() also counts a
    T4 (compute capability 7.5), which only emulates it: slowly, and without flash attention.
    MPS is counted out: its bfloat16 needs macOS 14 and is not needed for a tiny model."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_dtype(name, device):
    """The autocast precision: auto means bfloat16 where it is native (its matmuls ran 3-5x
    faster than float32 on an AVX512-BF16 CPU, for about 0.01 higher loss at equal steps),
    float16 with a gradient scaler on older GPUs, float32 elsewhere."""
    native = has_native_bf16(device)
    if name == "auto":
        if native:
            return "bfloat16"
        return "float16" if device.type == "cuda" else "float32"
    if name == "bfloat16" and not native and device.type != "mps":
        warn(f"{describe(device)} has no native bfloat16: it is emulated and slower than "
             f"{'float16' if device.type == 'cuda' else 'float32'}")
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


def make_scaler(device, dtype):
    """float16 gradients underflow without loss scaling, so float16 training needs the
    device's gradient scaler; refuse where torch has none that works. Other dtypes: None."""
    if dtype != "float16":
        return None
    with warnings.catch_warnings():  # a scaler that disables itself warns; we say it better below
        warnings.simplefilter("ignore")
        scaler = torch.amp.GradScaler(device.type)
    if not scaler.is_enabled():
        raise TinyLLMError(f"--dtype float16 needs a gradient scaler, which torch does not provide on "
                           f"{device}; use --dtype bfloat16 or float32")
    return scaler


@contextlib.contextmanager
def out_of_memory_as_error(hint):
    """The device running out of memory becomes one line saying what to try, not a traceback."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError on CUDA; a RuntimeError saying so on MPS
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            raise TinyLLMError(hint) from None
        raise


def configure_matmul(device):
    """TF32 matmuls for float32 work on GPUs that have them (Ampere and later). Never on a CPU,
    where 'high' precision made some matmuls ten times slower."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


# ----------------------------------------------------------------------------- threads

def set_threads(n=0):
    """Use n CPU threads for torch's kernels; 0 keeps torch's default, one per physical core.
    Returns the count in use. train.py, generate.py and bench.py also shorten how long an idle
    OpenMP thread spins before it sleeps (GOMP_SPINCOUNT, which must be set before torch loads):
    with the default spin, a second busy process on a 2-core machine made a training step of
    2 threads 2 to 9 times slower; with the short spin, about as fast as 1 thread, and on an
    idle machine as fast as the default (README: Threads)."""
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
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    """Restore what rng_state saved. A run resumed on fewer GPUs than it was saved on gets
    the states of the GPUs it has, and is told which could not be restored."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    saved = list(state.get("cuda", []))
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i, cuda_state in enumerate(saved[:here]):
        torch.cuda.set_rng_state(cuda_state, device=i)
    if len(saved) > here:
        log(f"note: the checkpoint holds the CUDA random state of {len(saved)} GPU(s), this machine has {here}; "
            f"restored {min(here, len(saved))}, so dropout on the rest continues from a fresh seed")


# ----------------------------------------------------------------------------- several processes

def setup_distributed(device):
    """(rank, world size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them
    this is a plain single process. Each GPU process binds its own GPU at init, so NCCL knows
    its device from the start."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return rank, world, device


def teardown_distributed(world):
    if world > 1:  # leave together: a rank that tears down early can abort the others
        dist.barrier()
        dist.destroy_process_group()


def all_ranks_mean(values, world, device):
    """Average a list of floats over the ranks (no-op for one process)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def all_ranks_max(value, world, device):
    """The largest of an int over the ranks (no-op for one process)."""
    if world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ----------------------------------------------------------------------------- peak FLOPs, for MFU

# Dense (no sparsity) tensor-core peaks in TFLOP/s, by the exact name torch.cuda.get_device_name()
# gives, per autocast dtype. float32 means TF32 where the GPU has it (configure_matmul turns it on).
# A name that is not here gets no MFU rather than a wrong one.
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
    """The GPU's peak FLOP/s for this dtype, or None (with one notice) when we do not know it."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = PEAK_TFLOPS.get(name, {}).get(dtype)
    if peak is None:
        log(f"note: MFU is not shown: the {dtype} peak of {name!r} is not in device.PEAK_TFLOPS")
        return None
    return peak * 1e12
