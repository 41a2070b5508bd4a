"""Helpers shared by train.py and generate.py: data and batches,
device choice, the learning-rate schedule, the optimizer, and checkpoints."""

import contextlib
import hashlib
import json
import math
import os
import random
import re
import sys

import numpy as np
import torch

from config import GPTConfig, TinyLLMError
from model import GPT
from tokenizer import EOT


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
    except BrokenPipeError:  # output piped into a reader that stopped, e.g. `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(141)


# ----------------------------------------------------------------------------- data

def iter_pieces(path, clean=False, chunk_chars=1 << 20):
    """Stream a text source as (text, document_ends) pieces, never holding it all in memory:
    a .txt file (one document, read in chunks cut at line ends), a folder of .txt files
    (a document each), a .jsonl file (the "text" field of each line), or a .json list of
    {"question": ..., "answer": ...} records (a Question/Answer document each).
    clean=True normalises whitespace and drops exact duplicate documents."""
    if not os.path.exists(path):
        raise TinyLLMError(f"data file {path} not found")
    seen = set()

    def document(text):
        if clean:
            text = clean_text(text)
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in seen:
                return None
            seen.add(key)
        return text if text else None

    try:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
            if not names:
                raise TinyLLMError(f"folder {path} has no .txt files")
            for name in names:
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    text = document(f.read())
                if text:
                    yield text, True
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                            raise TinyLLMError(f"{path} line {n}: expected an object with a \"text\" string")
                        text = document(record["text"])
                        if text:
                            yield text, True
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
            if not isinstance(records, list):
                raise TinyLLMError(f"{path}: expected a JSON list of {{\"question\": ..., \"answer\": ...}} records")
            for n, record in enumerate(records):
                text = document(qa_document(record, n, path))
                if text:
                    yield text, True
        else:
            with open(path, encoding="utf-8") as f:
                while True:
                    chunk = f.read(chunk_chars)
                    if not chunk:
                        break
                    chunk += f.readline()  # end the piece at a line end
                    yield clean_text(chunk) if clean else chunk, False
            yield "", True
    except UnicodeDecodeError:
        raise TinyLLMError(f"data file {path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise TinyLLMError(f"{path} is not valid JSON: {e}") from None


def qa_document(record, n, path="data"):
    """One Q&A record as the text the model learns from."""
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "answer")):
        rid = record.get("id", n) if isinstance(record, dict) else n
        raise TinyLLMError(f"{path}: record {rid} needs string fields \"question\" and \"answer\"")
    return qa_prompt(record["question"]) + " " + record["answer"].strip()


def qa_prompt(question):
    return f"Question: {question.strip()}\nAnswer:"


def clean_text(text):
    """Light curation: unify line ends, trim trailing spaces, squeeze runs of spaces and blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def iter_stream(path, clean=False):
    """The source as a stream of text pieces. A plain text file flows as it is; a source of
    several documents has each one wrapped in "<|endoftext|>", so the model learns where
    a document (or an answer) ends."""
    multi_doc = os.path.isdir(path) or path.endswith((".json", ".jsonl"))
    if multi_doc:
        yield EOT
    for text, ends in iter_pieces(path, clean):
        yield text + EOT if multi_doc and ends else text


def load_corpus(path, clean=False):
    """The whole source as one string."""
    text = "".join(iter_stream(path, clean))
    if not text.replace(EOT, "").strip():
        raise TinyLLMError(f"data file {path} is empty")
    return text


def is_prepared(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json"))


def load_prepared(path):
    """A folder written by prepare.py: (meta, train tokens, val tokens), the tokens as
    read-only memory maps, so a corpus larger than memory trains without loading it."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    dtype = np.dtype(meta["dtype"])
    splits = []
    for name in ("train", "val"):
        file = os.path.join(path, f"{name}.bin")
        if not os.path.isfile(file) or os.path.getsize(file) == 0:
            raise TinyLLMError(f"{file} is missing or empty; run prepare.py again")
        splits.append(np.memmap(file, dtype=dtype, mode="r"))
    return meta, splits[0], splits[1]


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
    y[b, t] is the token right after x[b, t] in the corpus. data is a tensor, or a
    NumPy memmap of which only the B windows are read from disk."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    if isinstance(data, np.ndarray):
        windows = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix.tolist()]).astype(np.int64))
    else:
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


def make_optimizer(model, lr, weight_decay, betas, device, name="adamw", muon_lr=0.02):
    """AdamW that decays matrices (embeddings, linear weights) but not biases or norm gains.
    With name="muon", the hidden matrices of the blocks get Muon instead (see below).
    Each group carries lr_scale: its learning rate is the scheduled lr times lr_scale."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "adamw":
        groups = [
            {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
        ]
        # the fused kernel does the whole update in one pass per tensor: measurably faster on CPU too
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))
    hidden = [p for n, p in params if p.dim() == 2 and n.startswith("blocks.")]
    groups = [
        {"params": hidden, "use_muon": True, "lr_scale": muon_lr / lr, "weight_decay": 0.0},
        {"params": [p for n, p in params if p.dim() >= 2 and not any(p is h for h in hidden)],
         "use_muon": False, "lr_scale": 1.0, "weight_decay": weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "use_muon": False, "lr_scale": 1.0, "weight_decay": 0.0},
    ]
    return Muon(groups, lr=lr, betas=betas)


def orthogonalize(g, steps=5):
    """Approximate U V^T of g = U S V^T (all singular values pushed towards 1) with a
    quintic Newton-Schulz iteration; its coefficients trade exactness for speed."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.size(0) > g.size(1)
    x = g.T if tall else g
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1, where the iteration converges
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for the hidden matrices, AdamW for everything else (embeddings, norms, biases).
    Muon takes SGD momentum and replaces the update by its nearest orthogonal matrix, so
    every direction of the weight moves by the same amount, however small its gradient."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), momentum=0.95, eps=1e-8):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["use_muon"]:
                    buf = state.setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = orthogonalize(p.grad.add(buf, alpha=group["momentum"]))  # Nesterov
                    p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)
                    continue
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                beta1, beta2 = group["betas"]
                state["step"] += 1
                state["m"].lerp_(p.grad, 1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = state["m"] / (1 - beta1 ** state["step"])
                v_hat = state["v"] / (1 - beta2 ** state["step"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m_hat, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])


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


# ----------------------------------------------------------------------------- plots and progress

def new_plot(height=3):
    """A figure and axes from matplotlib's file-only backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(7, height), dpi=90)


def save_plot(fig, ax, path):
    import matplotlib.pyplot as plt
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def format_seconds(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
