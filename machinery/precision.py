"""Number formats: which precision a run computes in (float32, bfloat16, or float16 with loss scaling),
and an optimizer.step() that skips a step whose gradients are not finite."""

import contextlib
import warnings

import torch

from config import TinyLLMError

from machinery import hardware
from machinery.cli import warn
from machinery.device import describe


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
    """Whether --dtype auto times both precisions here (calibrate.py): on a CPU with bfloat16 instructions."""
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_dtype(name, device):
    """The autocast precision. auto: bfloat16 where native (about 0.01 higher loss at equal steps, for faster
    steps; on a CPU provisionally, as calibrate.py keeps the faster), float16 with a gradient scaler on older
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


# ----------------------------------------------------------------------------- a step that is not finite

def finite_steps_only(optimizer):
    """The optimizer, hooked so that a step with non-finite gradients leaves weights and state exactly as
    they were, in every precision. Fused AdamW is told by a flag on the device (found_inf, as GradScaler
    does), so no step waits for a GPU; another optimizer by removing its gradients, a read on the host."""
    ours = []  # holds True while the flag on the optimizer is this function's

    def before_step(opt, args, kwargs):
        if hasattr(opt, "found_inf") and not ours:
            return  # float16's GradScaler set it: the scaler has decided
        ours.clear()
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        finite = torch.stack(torch._foreach_norm(grads)).isfinite().all()  # on the device: no wait
        if getattr(opt, "_step_supports_amp_scaling", False):
            opt.grad_scale, opt.found_inf = None, (~finite).float()
            ours.append(True)
        elif not finite.item():
            for group in opt.param_groups:  # a parameter without a gradient is not updated
                for p in group["params"]:
                    p.grad = None

    def after_step(opt, args, kwargs):
        if ours:
            del opt.grad_scale, opt.found_inf
            ours.clear()

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)
    return optimizer
