"""Helpers shared by train.py and generate.py: data and batches,
device choice, the learning-rate schedule, the optimizer, and checkpoints."""

import contextlib
import math
import os
import random
import sys
import time

import numpy as np
import torch

from config import GPTConfig, TinyLLMError
from model import GPT


def log(*args):
    """Print one flushed line, so output reads well in a Colab cell and in a log file."""
    print(*args, flush=True)


def run_cli(main):
    """Run a script's main(): user errors become one line on stderr and exit status 2."""
    try:
        main()
    except TinyLLMError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


# ----------------------------------------------------------------------------- data

def load_text(path):
    if not os.path.isfile(path):
        raise TinyLLMError(f"data file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise TinyLLMError(f"data file {path} is not UTF-8 text") from None
    if not text:
        raise TinyLLMError(f"data file {path} is empty")
    return text


def split_train_val(ids, train_fraction=0.9):
    """Contiguous split: the first 90% trains, the rest validates. Tokens are never
    shuffled, since next-token prediction needs them in order."""
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]


def check_long_enough(ids, block_size, name, path):
    if len(ids) < block_size + 1:
        raise TinyLLMError(f"{path}: the {name} split has {len(ids)} tokens but block_size {block_size} "
                           f"needs at least {block_size + 1}; use more text or a smaller --block_size")


def get_batch(data, batch_size, block_size, device, generator=None):
    """Random windows from a 1-D token stream: x (B, T) and y (B, T), where
    y[b, t] is the token right after x[b, t] in the corpus."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    windows = data.unfold(0, block_size + 1, 1)[ix]  # (B, T+1), one gather, no Python loop
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- device and precision

def choose_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TinyLLMError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TinyLLMError("--device mps asked for, but MPS is not available here; use --device cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise TinyLLMError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def resolve_dtype(name, device):
    """float32 on CPU; bfloat16 on a GPU that supports it, else float16."""
    if name == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if name != "float32" and device.type == "cpu":
        raise TinyLLMError(f"--dtype {name} is for GPUs; use float32 on CPU")
    return name


def autocast(device, dtype):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- optimization

def get_lr(step, lr, min_lr, warmup_steps, max_steps):
    """Linear warmup from lr/warmup_steps up to lr, cosine decay to min_lr at
    max_steps, then hold min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, lr, weight_decay, betas, device):
    """AdamW that decays matrices (embeddings, linear weights) but not biases or norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_KEYS = ("model", "model_config", "tokenizer")


def save_checkpoint(path, checkpoint):
    """Write atomically: a temp file in the same folder, flushed and fsynced, then
    renamed over the target. A crash at any moment leaves the old file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint without ever running code from it (weights_only=True)."""
    if not os.path.isfile(path):
        raise TinyLLMError(f"checkpoint {path} not found (train one with: python train.py)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TinyLLMError(f"checkpoint {path} could not be loaded (truncated, corrupt or unsafe): "
                           f"{reason[:200]}") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        raise TinyLLMError(f"checkpoint {path} is not a tinyllm checkpoint (missing model, config or tokenizer)")
    return checkpoint


def model_from_checkpoint(checkpoint, path="checkpoint"):
    """Build the GPT a checkpoint describes and load its weights."""
    try:
        config = GPTConfig(**checkpoint["model_config"])
    except TypeError as e:
        raise TinyLLMError(f"{path}: unreadable model config ({e})") from None
    model = GPT(config)
    # weights saved from torch.compile or DDP wrappers carry a prefix; drop it
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in checkpoint["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise TinyLLMError(f"{path}: weights do not fit the model config ({str(e).splitlines()[0]})") from None
    return model


# ----------------------------------------------------------------------------- progress

def format_seconds(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start
