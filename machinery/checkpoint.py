"""Checkpoint files: written atomically, read without running code (a file that would run code
is refused); the model and tokenizer every one holds (a run's own entries: train.py's save).
Then the run folder: a fresh run never writes over another's; last, a resumed optimizer."""

import contextlib
import dataclasses
import os
import pickle
import time
import warnings
from collections import namedtuple

import torch

from config import GPTConfig, TinyLLMError, require
from machinery.cli import check_writable, first_line
from model import GPT
from tokenizer import from_dict


def save(path, checkpoint):
    """Written to a temp file, then renamed over path: a crash leaves the old file. A LoRA
    adapter names its base relative to itself, so the two can move together."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if checkpoint.get("lora"):
        base = os.path.abspath(checkpoint["lora"]["base"])
        with contextlib.suppress(ValueError):  # Windows: no relative path to another drive
            base = os.path.relpath(base, folder)
        checkpoint = checkpoint | {"lora": checkpoint["lora"] | {"base": base}}
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, said with the file's name
        error = e if isinstance(e, OSError) else e.__context__  # torch's error wraps it
        if not isinstance(error, OSError):
            raise
        raise OSError(error.errno, error.strerror, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # the rename itself made durable
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def replace_file(src, dst):
    """os.replace, retried for seconds: Windows cannot replace a file another process holds open."""
    for wait in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0):
        try:
            return os.replace(src, dst)
        except PermissionError:
            time.sleep(wait)
    os.replace(src, dst)


def load(path):
    """A checkpoint read onto the CPU without running code from it, checked to be ours."""
    require(os.path.isfile(path), f"checkpoint {path} not found (train one with: python train.py)")
    try:
        with warnings.catch_warnings():  # torch warns at length about old pickle protocols
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, random bytes, an empty file...
        if isinstance(e, pickle.UnpicklingError) and refused_as_unsafe(e):
            raise unsafe_file(f"checkpoint {path}") from None
        raise TinyLLMError(
            f"checkpoint {path} could not be loaded (truncated or corrupt): {first_line(e)}"
        ) from None
    parts = ("model", "model_config", "tokenizer")
    ours = isinstance(checkpoint, dict) and all(isinstance(checkpoint.get(k), dict) for k in parts)
    weights = checkpoint["model"].items() if ours else ()
    if not ours or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights):
        raise TinyLLMError(f"checkpoint {path} is not a tinyllm checkpoint")
    if "kind" not in checkpoint["tokenizer"]:
        raise TinyLLMError(f"checkpoint {path} was written by another version of tinyllm")
    if checkpoint.get("lora"):  # its base, as a path from here
        base = os.path.join(os.path.dirname(os.path.abspath(path)), checkpoint["lora"]["base"])
        checkpoint["lora"]["base"] = os.path.normpath(base)
    return checkpoint


def refused_as_unsafe(error):
    """Whether weights_only=True refused the file, anywhere in the chain: transformers wraps it."""
    chain = []
    while error is not None and error not in chain:  # a chain can loop
        chain.append(error)
        error = error.__cause__ or error.__context__
    return any("weights only" in str(e).lower() for e in chain)


def unsafe_file(what):
    return TinyLLMError(f"{what} holds more than tensors and plain data: loading it could run code")


def model_of(checkpoint, path="checkpoint"):
    """The GPT a checkpoint holds, weights checked; a LoRA run's: its base and the adapter."""
    lora = checkpoint.get("lora")
    if lora:
        from lora import adapter_state, add_adapters  # a LoRA run's files alone need it

        base = load(lora["base"])  # its dropout the run's: a fine-tune may change it
        base["model_config"] |= {"dropout": checkpoint["model_config"]["dropout"]}
        model = model_of(base, lora["base"])
        weights = dict(checkpoint["model"])
        new_rows = weights.pop("new_rows")
        if lora["rows"]:  # the base's rows and new tokens', in the order of the run's tokenizer
            with_embedding(model, lora["rows"], new_rows)
        add_adapters(model, lora["rank"], lora["alpha"], lora["mlp"])
        vocab_size = checkpoint["model_config"]["vocab_size"]
        if sorted(weights) != sorted(adapter_state(model)) or model.config.vocab_size != vocab_size:
            raise TinyLLMError(f"{path}: its adapter does not fit its base, {lora['base']}")
        model.load_state_dict(weights, strict=False)
        return model
    model = GPT(from_saved(GPTConfig, checkpoint["model_config"], path))
    state = checkpoint["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise TinyLLMError(f"{path}: its weights do not fit its config ({first_line(e)})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    require(not bad, f"{path}: non-finite weights (NaN or inf) in {', '.join(bad[:3])}")
    return model


def from_saved(cls, saved, path):
    """cls from a checkpoint's settings, each of its type (n_head 2.0 would fail in a traceback)
    or None where its default is None (off); a setting the checkpoint lacks takes its default."""
    unknown = ", ".join(k for k in saved if k not in {f.name for f in dataclasses.fields(cls)})
    why = f"{path} has settings this version of tinyllm does not know ({unknown})"
    require(not unknown, f"{why}: it was made by another version")
    for f in dataclasses.fields(cls):
        kind = (int, float) if f.type is float else f.type  # an int is a float setting too
        off = f.default is None and saved.get(f.name) is None
        if f.name in saved and not off and not isinstance(saved[f.name], kind):
            raise TinyLLMError(f"{path}: unreadable settings ({f.name} is {saved[f.name]!r})")
    try:
        return cls(**saved)
    except TinyLLMError as e:
        raise TinyLLMError(f"{path}: invalid settings: {e}") from None


def tokenizer_of(checkpoint, path):
    """The tokenizer a checkpoint holds, checked to fit its model."""
    tokenizer = from_dict(checkpoint["tokenizer"])
    tokens = tokenizer.vocab_size
    vocab = checkpoint["model_config"]["vocab_size"]
    require(tokens <= vocab, f"{path}: its tokenizer has {tokens} tokens, the model {vocab}")
    return tokenizer


# a checkpoint's model in eval mode, its tokenizer, and the rest of it (not the optimizer)
Trained = namedtuple("Trained", "model tokenizer checkpoint")


def load_model(path, device="cpu"):
    checkpoint = load(path)
    checkpoint.pop("optimizer", None)
    model = model_of(checkpoint, path).to(device).eval()
    return Trained(model, tokenizer_of(checkpoint, path), checkpoint)


def create(model, tokenizer, **extra):
    """A checkpoint: the model's weights and settings, the tokenizer, and the extra entries. A LoRA
    model's (lora.py): the adapter and its base's path, not the base's weights."""
    weights = model.state_dict()
    settings = dataclasses.asdict(model.config)
    if getattr(model, "lora", None):  # the adapter and the embedding rows its base lacks: kilobytes
        from lora import adapter_state

        new = [i for i, r in enumerate(model.lora["rows"] or ()) if r is None]
        weights = adapter_state(model) | {"new_rows": weights["wte.weight"][new]}
        extra = extra | {"lora": model.lora}
    return dict(model=weights, model_config=settings, tokenizer=tokenizer, **extra)


def with_embedding(model, rows, new_rows):
    """Rebuild model's token embedding: row i its old row rows[i], or where that is None the next
    of new_rows; the output layer tied to it."""
    old = model.wte.weight.detach()
    new_rows = iter(new_rows)  # a new token takes the next new row
    weights = torch.stack([old[i] if i is not None else next(new_rows) for i in rows])  # (V, C)
    model.config = dataclasses.replace(model.config, vocab_size=len(rows))
    model.wte = torch.nn.Embedding.from_pretrained(weights, freeze=False)
    model.lm_head = torch.nn.Linear(model.config.n_embd, len(rows), bias=False)
    model.lm_head.weight = model.wte.weight


def summary(checkpoint):
    """'step 900, best val 1.5123': where a checkpoint's run stood."""
    val = checkpoint.get("best_val_loss")
    best = f", best val {val:.4f}" if isinstance(val, float) else ""
    return f"step {checkpoint.get('step', '?')}{best}"


# ------------------------------------------------------------------ the run folder that holds them


def run_files(out_dir):
    """The checkpoints of a run folder, the periodic ones oldest first."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    periodic = sorted(n for n in names if n.startswith("ckpt_") and n.endswith(".pt"))
    return [n for n in ("best.pt", "last.pt") if n in names] + periodic


def claim_out_dir(out_dir, overwrite, keep):
    """Refuse a fresh run over another run's checkpoints; check it can write before training."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TinyLLMError(f"--out_dir {out_dir} is a file, not a folder")
    existing = run_files(out_dir)
    if existing and not overwrite:
        last = os.path.join(out_dir, "last.pt" if "last.pt" in existing else existing[-1])
        with contextlib.suppress(TinyLLMError):
            last = f"{last} at {summary(load(last))}"
        raise TinyLLMError(
            f"{out_dir} already holds a run ({last}); continue it with --resume, "
            f"pick another --out_dir (or --tag NAME), or replace it: --overwrite"
        )
    if keep and os.path.realpath(keep) in {os.path.realpath(f"{out_dir}/{n}") for n in existing}:
        raise TinyLLMError(f"--overwrite would delete --init_from's {keep}; use another --out_dir")
    check_writable(os.path.join(out_dir, f".test.{os.getpid()}"), "--out_dir", make_folder=True)


def clear_out_dir(out_dir):
    """--overwrite: the old run's files go once the new one is set up (bad input refused first)."""
    for name in run_files(out_dir) + ["history.csv"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))


def keep_newest(out_dir, keep_last):
    for name in [n for n in run_files(out_dir) if n.startswith("ckpt_")][:-keep_last]:
        os.remove(os.path.join(out_dir, name))


def load_optimizer(optimizer, saved, path):
    """The saved optimizer state, each group matched to this optimizer's by the parameters it
    holds (or refused), keeping this machine's kernel (fused, foreach)."""
    by_names = {tuple(group.get("names", ())): group for group in saved["param_groups"]}
    groups = []
    for group in optimizer.param_groups:
        match = by_names.get(tuple(group["names"]))
        if match is None:
            raise TinyLLMError(
                f"{path}: its optimizer groups the parameters otherwise than this code does "
                f"(no group of {', '.join(group['names'][:2])}...): resume it with the code "
                f"that trained it, or fine-tune from it with finetune.py --init_from"
            )
        groups.append(match | {k: group[k] for k in ("fused", "foreach") if k in group})
    optimizer.load_state_dict({**saved, "param_groups": groups})
