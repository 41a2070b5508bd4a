"""Where the numbers are computed: the device (a CUDA GPU, an Apple-silicon Mac, the CPU), its threads,
the random number generators (seeded, and saved for an exact resume) and the chip's peak FLOP/s (MFU)."""

import contextlib
import random

import numpy as np
import torch

from config import TinyLLMError

from machinery import hardware
from machinery.cli import log


# ----------------------------------------------------------------------------- the device

def choose_device(name="auto"):
    if name == "auto":
        if hardware.cuda_available():
            return torch.device("cuda")
        if hardware.mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise TinyLLMError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if name.startswith("cuda") and not hardware.cuda_available():
        raise TinyLLMError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    if name == "mps" and not hardware.mps_available():
        raise TinyLLMError("--device mps asked for, but MPS is not available here; use --device cpu")
    return torch.device(name)


def describe(device):
    """The device in words, for the start-up line: 'cuda (Tesla T4)', 'cpu'."""
    if device.type == "cuda":
        return f"{device} ({hardware.gpu_name(device)})"
    return str(device)


# ----------------------------------------------------------------------------- errors and speed

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
        hardware.set_matmul_precision("high")


# ----------------------------------------------------------------------------- threads

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
        "mps": hardware.mps_rng_state(),
    }


def set_rng_state(state):
    """Restore what rng_state saved; on fewer GPUs than saved, those it has, with a note about the rest."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("mps") is not None and hardware.mps_available():
        hardware.set_mps_rng_state(state["mps"])
    saved = list(state.get("cuda", []))
    here = hardware.gpu_count()
    for i, cuda_state in enumerate(saved[:here]):
        hardware.set_gpu_rng_state(cuda_state, i)
    if len(saved) > here:
        log(f"note: the checkpoint holds the CUDA random state of {len(saved)} GPU(s), this machine has {here}; "
            f"restored {min(here, len(saved))}, so dropout on the rest continues from a fresh seed")


# ----------------------------------------------------------------------------- peak FLOPs, for MFU

# Dense tensor-core peaks in TFLOP/s per autocast dtype, by the GPU's exact name; float32 means TF32 where
# the GPU has it (configure_matmul turns it on). A name not here gets no MFU rather than a wrong one.
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
    name = hardware.gpu_name(device)
    peak = PEAK_TFLOPS.get(name, {}).get(dtype)
    if peak is None:
        log(f"note: MFU is not shown: the {dtype} peak of {name!r} is not in device.PEAK_TFLOPS")
        return None
    return peak * 1e12


def flops_per_token(model):
    """Forward + backward FLOPs per token at full context (the PaLM appendix estimate)."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.n_embd * c.block_size
