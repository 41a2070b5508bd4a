"""Picks the device and the precision, and runs several processes under torchrun (DDP).

A Process holds the rank and device of one process and lets the processes agree on values.
machine() and gpu() are the only places where tinyllm asks torch what the machine has, so tests
can stand in for other machines there."""

import contextlib
import functools
import os
import platform
import random
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import TinyLLMError, require
from machinery import cli


@functools.cache  # the machine does not change, so each process asks once
def machine():
    """Returns what this machine has. Asking starts no GPU."""
    cpu = torch.cpu  # the _is_*_supported probes are private, and an older torch lacks them
    return SimpleNamespace(
        cuda=torch.cuda.is_available(),
        mps=torch.backends.mps.is_available(),
        gpus=torch.cuda.device_count(),
        vendor=cpu_vendor(),
        amx=hasattr(cpu, "_is_amx_tile_supported") and cpu._is_amx_tile_supported(),
        avx512_bf16=hasattr(cpu, "_is_avx512_bf16_supported") and cpu._is_avx512_bf16_supported(),
        torch=tuple(int(x) for x in torch.__version__.split(".")[:2]),
    )


def cpu_vendor():
    """Returns 'AMD' or 'Intel', read from /proc/cpuinfo (Linux) or the processor name (Windows).

    Returns '' for any other CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(4096)
    except OSError:
        text = platform.processor()  # Windows: "... Family 25 Model 97 ..., AuthenticAMD"
    return "AMD" if "AuthenticAMD" in text else "Intel" if "GenuineIntel" in text else ""


def gpu(device):
    """Returns the name and (major, minor) compute capability of a CUDA GPU. Asking starts CUDA."""
    return torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)


def autocast_works(device_type, dtype):
    """Returns whether autocast runs `dtype` here or turns itself off.

    On MPS, bfloat16 needs torch 2.6 and macOS 14."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type, dtype=getattr(torch, dtype)):
            return torch.is_autocast_enabled(device_type)


def choose_device(name):
    has = machine()
    if name == "auto":
        name = "cuda" if has.cuda else "mps" if has.mps else "cpu"
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda", "mps") or (kind != "cuda" and name != kind):
        raise TinyLLMError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if not {"cpu": True, "cuda": has.cuda, "mps": has.mps}[kind]:
        raise TinyLLMError(f"no {kind.upper()} here for --device {name}; use --device cpu")
    if kind == "cuda":  # float32 matmuls use TF32 tensor cores; not on CPUs, some got 10x slower
        torch.set_float32_matmul_precision("high")
    return torch.device(name)


def name(device):
    return f"{device} ({gpu(device)[0]})" if device.type == "cuda" else str(device)


def set_threads(n):
    if n:
        torch.set_num_threads(n)


def use(name, threads):
    """Returns the device that --device names, and sets torch to --threads CPU threads.

    0 threads means one per physical core."""
    set_threads(threads)
    return choose_device(name)


@contextlib.contextmanager
def out_of_memory_as_error(hint):
    try:
        yield
    except RuntimeError as e:  # CUDA raises torch.OutOfMemoryError; MPS and CPUs a RuntimeError
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        if oom or "CPUAllocator" in str(e):
            raise TinyLLMError(hint) from None
        raise


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the generator of every device too


def native_bf16(device):
    """Returns whether the device runs bfloat16 natively.

    That is a GPU of compute capability 8.0 or more (a T4 emulates it), or a CPU with AVX512-BF16
    or AMX."""
    if device.type == "cuda":
        return gpu(device)[1] >= (8, 0)
    has = machine()
    return device.type == "cpu" and (has.amx or has.avx512_bf16)


def auto_dtype(device):
    """Returns (dtype, reason) for --dtype auto, decided by what the device is.

    On a CPU the rule follows what one step of the default model measured, bfloat16 against
    float32 (2 threads, 2026-11). AMD Zen 4 was 1.50-1.59x faster and Zen 5 1.79-1.86x faster.
    Intel with AMX was 1.50-1.58x faster. Intel with AVX512-BF16 but no AMX was slower, at
    0.76-0.86x."""
    has = machine()
    if device.type == "cuda" and native_bf16(device):
        return "bfloat16", "compute capability 8.0+"
    if device.type == "cuda":
        return "float16", "below compute capability 8.0"
    if not native_bf16(device):
        return "float32", "no native bfloat16"
    if has.amx:
        return "bfloat16", "Intel with AMX"
    if has.vendor == "AMD":
        return "bfloat16", "AMD with AVX512-BF16"
    return "float32", "AVX512-BF16 without AMX is slower"


def resolve_dtype(dtype, device):
    """Returns (the precision of the forward pass, the reason).

    The precision follows the rule of --dtype auto, or is the dtype given."""
    if dtype == "auto":
        return auto_dtype(device)
    if dtype == "bfloat16" and device.type != "mps" and not native_bf16(device):
        cli.warn(f"{name(device)} has no native bfloat16: it is emulated and slower")
    if device.type == "mps" and dtype != "float32" and not autocast_works("mps", dtype):
        cli.warn(
            f"torch {torch.__version__} cannot autocast to {dtype} on this Mac (bfloat16 needs "
            f"torch 2.6 and macOS 14): training in float32"
        )
        return "float32", "autocast cannot run it here"
    return dtype, "given"


def autocast(device, dtype):
    """Returns a context that runs the forward pass in `dtype`. The weights stay float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def make_scaler(device, dtype):
    """Returns the loss scaler for float16, whose gradients underflow without one.

    It refuses float16 where no scaler works. For any other dtype it returns a disabled scaler,
    whose calls do nothing."""
    if dtype != "float16":
        return torch.amp.GradScaler(enabled=False)
    if device.type == "mps" and machine().torch < (2, 8):  # there, unscale_ makes float64
        raise TinyLLMError(
            f"--dtype float16 on a Mac needs torch 2.8 or later (this is "
            f"{torch.__version__}); use --dtype float32, or upgrade torch"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaler = torch.amp.GradScaler(device.type)
    if not scaler.is_enabled():
        raise TinyLLMError(
            f"--dtype float16 needs a gradient scaler, which torch lacks on "
            f"{device}; use --dtype bfloat16 or float32"
        )
    return scaler


def auto_meanings(device):
    """Returns {setting: (default, what it means here)} for --help.

    It asks no GPU, because that would start CUDA."""
    dtype = "bfloat16 from compute capability 8.0, else float16"
    if device.type != "cuda":
        dtype = "{} here: {}".format(*auto_dtype(device))
    return {
        "device": ("auto", f"{device.type} here"),
        "dtype": ("auto", dtype),
        "threads": (0, f"{torch.get_num_threads()} here"),
    }


# ----------------------------------------------------------- several processes, under torchrun


@dataclass
class Process:
    """One training process: its rank among `world` processes, its device, and its precision.

    Without torchrun the rank is 0 of 1. `dtype` is the precision of the forward pass, and `why`
    says how --dtype auto chose it. __post_init__ adds the autocast context and the scaler."""

    rank: int
    world: int
    device: torch.device
    dtype: str = "float32"
    why: str = "given"

    def __post_init__(self):
        self.scaler = make_scaler(self.device, self.dtype)
        self.autocast = autocast(self.device, self.dtype)  # a context that every step enters

    def leave_together(self):
        """Waits here until every rank arrives.

        torchrun ends all ranks as soon as one exits, even while rank 0 is still saving."""
        if self.world > 1:
            dist.barrier()

    def wrap(self, model):  # DDP averages the gradients over the ranks during backward
        if self.world == 1:
            return model
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def mean(self, values):
        """Returns the mean over the ranks of each of `values`, the same on every rank."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def every_rank(self, value):
        """Returns the `value` of each rank as a list in rank order, on every rank.

        Every rank must call it."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def check_processes(device, cfg):
    """Refuses torchrun processes that cannot work here or cannot share the batch.

    It runs before anything is written."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise TinyLLMError(
            f"batch_size ({cfg.batch_size}) is not divisible by grad_accum_steps "
            f"({cfg.grad_accum_steps}) times the processes ({world})"
        )
    one_mac = "torch cannot join several processes on a Mac's GPU; give torchrun --device cpu"
    require(device.type != "mps" or world == 1, one_mac)  # Gloo, the only backend, can't use MPS
    gpus = machine().gpus
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type == "cuda" and processes > gpus:  # NCCL would hang with two processes on a GPU
        raise TinyLLMError(
            f"{processes} processes on this machine but {gpus} GPU(s): give "
            f"torchrun --nproc_per_node={gpus} or less, or --device cpu"
        )


def setup_process(device, dtype="float32"):
    """Returns this Process, joined to its group under torchrun (check_processes has passed).

    The process trains on its device in the precision of --dtype (resolve_dtype). A process joins
    its group only once, however many runs it trains (tools.ablation)."""
    rank = 0
    world = 1
    if "RANK" in os.environ:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device.type == "cuda":
            device = torch.device(f"cuda:{local_rank}")
            torch.cuda.set_device(device)
        if not dist.is_initialized() and device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        elif not dist.is_initialized():
            dist.init_process_group("gloo")
    return Process(rank, world, device, *resolve_dtype(dtype, device))


def rng_state():
    """Returns the state of every random generator a run draws from.

    The state is plain data and tensors, so that a weights_only load can read it. A CPU run does
    not start CUDA to ask. On a Mac, dropout draws from the MPS generator."""
    kind, key, *rest = np.random.get_state()
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), *rest],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "mps": torch.mps.get_rng_state() if machine().mps else None,
    }


def set_rng_state(state):
    """Restores what rng_state saved.

    On a machine with fewer GPUs, it restores the GPUs there are and prints a note."""
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    has = machine()
    if has.mps and state.get("mps") is not None:
        torch.mps.set_rng_state(state["mps"])
    for index, gpu_state in enumerate(state["cuda"][: has.gpus]):
        torch.cuda.set_rng_state(gpu_state, device=index)
    if len(state["cuda"]) > has.gpus:
        cli.log(
            f"note: the checkpoint holds the random state of {len(state['cuda'])} GPU(s), this "
            f"machine has {has.gpus}; dropout on the rest continues from a fresh seed"
        )


def start_process(settings):
    """Returns this Process with its rank (under torchrun) and precision; sets threads and seed."""
    process = setup_process(settings.device, settings.cfg.dtype)
    set_threads(settings.cfg.threads)
    seed_everything(settings.cfg.seed)  # the same initial weights on every rank
    return process


def compile_first(model, step_model, next_batch, process):
    """Runs the first forward and backward pass of --compile now.

    Running it early turns a missing compiler into one error line before anything is written.
    It leaves no trace: no gradient is kept, and every generator is as it was, as if the batch
    had not been drawn."""
    rngs = rng_state()
    try:
        with process.autocast:
            process.scaler.scale(step_model(*next_batch())[1]).backward()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # torch 2.5 raises a missing compiler as a plain RuntimeError
        failed = f"--compile failed on this machine ({cli.first_line(e)})"
        raise TinyLLMError(f"{failed}; run without it") from None
    finally:
        set_rng_state(rngs)
    model.zero_grad(set_to_none=True)
