"""The one place tinyllm asks torch about the hardware or changes how it works. Callers use the module
(hardware.cuda_available(), never imported by name), so a test stands in for a machine here rather than in
torch, whose own functions torch's internals (compiler, optimizers) read too."""

import warnings

import torch
import torch.distributed


def cuda_available():
    return torch.cuda.is_available()


def mps_available():
    return torch.backends.mps.is_available()


def gpu_count():
    return torch.cuda.device_count() if cuda_available() else 0


def gpu_name(device=None):
    return torch.cuda.get_device_name(device)


def gpu_capability(device=None):
    """(major, minor): 8.0 and up (Ampere) compute bfloat16 natively."""
    return torch.cuda.get_device_capability(device)


# torch's own probes of the CPU's instructions are private: a test checks that this torch has them,
# so that a renamed probe fails a test instead of quietly answering "no bfloat16"
AVX512_BF16_PROBE, AMX_PROBE = "_is_avx512_bf16_supported", "_is_amx_tile_supported"


def cpu_has_avx512_bf16():
    return getattr(torch.cpu, AVX512_BF16_PROBE, lambda: False)()


def cpu_has_amx():
    return getattr(torch.cpu, AMX_PROBE, lambda: False)()


def torch_version():
    """(major, minor) of the torch running, e.g. (2, 5)."""
    return tuple(int(x) for x in torch.__version__.split(".")[:2])


def autocast_works(device_type, dtype):
    """Whether torch's autocast runs dtype on this kind of device, or turns itself off (with a
    warning) and leaves the model in float32: MPS's bfloat16 needs torch 2.6 and macOS 14."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type, dtype=getattr(torch, dtype)):
            return torch.is_autocast_enabled(device_type)


def gradient_scaler(device_type):
    """torch's loss scaler for float16 on this kind of device. It turns itself off (is_enabled()
    False) where that device is missing, or where torch has no scaler for it."""
    return torch.amp.GradScaler(device_type)


def use_gpu(device):
    torch.cuda.set_device(device)


def join_processes(backend, **options):
    """Join torchrun's other processes: Gloo (CPUs) or NCCL (GPUs)."""
    torch.distributed.init_process_group(backend, **options)


def set_gpu_rng_state(state, index):
    torch.cuda.set_rng_state(state, device=index)


def mps_rng_state():
    """A Mac GPU's generator (dropout there draws from it), or None without one."""
    return torch.mps.get_rng_state() if mps_available() else None


def set_mps_rng_state(state):
    torch.mps.set_rng_state(state)


def set_matmul_precision(precision):
    """'high' lets float32 matmuls use TF32 tensor cores; 'highest' is torch's default."""
    torch.set_float32_matmul_precision(precision)
