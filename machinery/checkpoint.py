"""Checkpoints, written atomically and read without running code; the run folder (--out_dir);
--eval_only, a checkpoint scored on its val split."""

import contextlib
import dataclasses
import math
import os
import pickle
import time
import warnings

import numpy as np
import torch

from config import GPTConfig, TinyLLMError, from_saved
from lora import adapter, add_adapters
from machinery import device as devices
from machinery import sources
from machinery.cli import check_writable, first_line, log
from model import GPT, lm_loss
from tokenizer import from_dict
from utils import bits_per_char


def save(path, checkpoint):
    """Written to a temp file, then renamed over path: a crash leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
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
    if not os.path.isfile(path):
        raise TinyLLMError(f"checkpoint {path} not found (train one with: python train.py)")
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
    ours = isinstance(checkpoint, dict) and all(
        isinstance(checkpoint.get(k), dict) for k in ("model", "model_config", "tokenizer")
    )
    if not ours or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in checkpoint["model"].items()
    ):
        raise TinyLLMError(f"checkpoint {path} is not a tinyllm checkpoint")
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
    """The GPT a checkpoint holds, weights checked; a LoRA adapter's: its base and the adapter."""
    lora = checkpoint.get("lora")
    if lora:
        model, weights = model_of(load(lora["base"]), lora["base"]), dict(checkpoint["model"])
        base, new = model.wte.weight.detach(), iter(weights.pop("new_rows"))
        if lora["rows"]:  # the base's rows and new tokens', in the order of the run's tokenizer
            rows = [base[r] if r is not None else next(new) for r in lora["rows"]]
            with_embedding(model, torch.stack(rows))
        add_adapters(model, lora["rank"], lora["alpha"], lora["mlp"])
        vocab_size = checkpoint["model_config"]["vocab_size"]
        if sorted(weights) != sorted(adapter(model)) or model.config.vocab_size != vocab_size:
            raise TinyLLMError(f"{path}: its adapter does not fit its base, {lora['base']}")
        model.load_state_dict(weights, strict=False)
        return model
    model = GPT(from_saved(GPTConfig, checkpoint["model_config"], path))
    state = {
        k.removeprefix("_orig_mod.").removeprefix("module."): v  # as compiled, or under DDP
        for k, v in checkpoint["model"].items()
    }
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise TinyLLMError(f"{path}: its weights do not fit its config ({first_line(e)})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TinyLLMError(f"{path}: non-finite weights (NaN or inf) in {', '.join(bad[:3])}")
    return model


def tokenizer_of(checkpoint, vocab_size, path):
    tokenizer = from_dict(checkpoint["tokenizer"])
    if tokenizer.vocab_size > vocab_size:
        raise TinyLLMError(
            f"{path}: its tokenizer has {tokenizer.vocab_size} tokens, the model {vocab_size}"
        )
    return tokenizer


def load_model(path, device="cpu"):
    """(the model in eval mode on device, its tokenizer, the checkpoint without its optimizer)"""
    checkpoint = load(path)
    checkpoint.pop("optimizer", None)
    model = model_of(checkpoint, path).to(device).eval()
    return model, tokenizer_of(checkpoint, model.config.vocab_size, path), checkpoint


def contents(model, tokenizer, lora=None, **extra):
    """A checkpoint. A LoRA run's holds the adapter and the embedding rows its base lacks: kB."""
    weights = model.state_dict()
    if lora:
        new = [i for i, r in enumerate(lora["rows"] or ()) if r is None]
        weights = adapter(model) | {"new_rows": weights["wte.weight"][new]}
    return dict(
        model=weights,
        model_config=dataclasses.asdict(model.config),
        tokenizer=tokenizer,
        lora=lora,
        **extra,
    )


def with_embedding(model, rows):
    """model with a new token embedding, rows (V, C), and the output layer tied to it."""
    model.config = dataclasses.replace(model.config, vocab_size=len(rows))
    model.wte = torch.nn.Embedding.from_pretrained(rows, freeze=False)
    model.lm_head = torch.nn.Linear(model.config.n_embd, len(rows), bias=False)
    model.lm_head.weight = model.wte.weight
    return model


def describe(checkpoint):
    """'step 900, best val 1.5123': where a checkpoint's run stood."""
    val = checkpoint.get("best_val_loss")
    best = f", best val {val:.4f}" if isinstance(val, float) else ""
    return f"step {checkpoint.get('step', '?')}{best}"


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
            last = f"{last} at {describe(load(last))}"
        raise TinyLLMError(
            f"{out_dir} already holds a run ({last}); continue it with --resume, "
            f"pick another --out_dir (or --tag NAME), or replace it: --overwrite"
        )
    if keep and os.path.realpath(keep) in {os.path.realpath(f"{out_dir}/{n}") for n in existing}:
        raise TinyLLMError(f"--overwrite would delete --init_from's {keep}; use another --out_dir")
    check_writable(os.path.join(out_dir, f".test.{os.getpid()}"), "--out_dir", make_folder=True)


def clear_out_dir(out_dir):
    """--overwrite: the old run's files go once the new one is set up (bad input refused first)."""
    for name in run_files(out_dir) + ["history.csv", "history.json"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))


def keep_newest(out_dir, keep_last):
    for name in [n for n in run_files(out_dir) if n.startswith("ckpt_")][:-keep_last]:
        os.remove(os.path.join(out_dir, name))


# ---------------------------------------------------------------- --eval_only: a checkpoint scored


def evaluate_checkpoint(path, data, device, batch_size, threads):
    """Loss, perplexity and bits per character on every position of a checkpoint's val split (or
    data's): a conversation's answers alone, as its run was trained."""
    devices.set_threads(threads)
    model, tokenizer, saved = load_model(path, devices.choose_device(device))
    corpus, data = sources.validation_split(saved, tokenizer, data)
    val = torch.as_tensor(np.asarray(corpus.val, dtype=np.int64))
    losses = token_losses(model, val, batch_size)  # of tokens 1..n-1
    if corpus.val_targets is not None:
        losses = losses[corpus.val_targets[1:]]
    loss = losses.mean().item()
    log(
        f"{path} on the val split of {data} ({len(val):,} tokens, every position once):\n"
        f"loss {loss:.4f} nats/token | perplexity {math.exp(loss):.3f} | "
        f"{bits_per_char(loss, corpus.chars_per_token):.4f} bits per character"
    )


@torch.no_grad()
def token_losses(model, ids, batch_size=1):
    """The loss (nats) of every token of ids (n,) but the first, (n - 1,), each once, in windows
    of block_size."""
    model.eval()
    T, device = model.config.block_size, model.wte.weight.device
    n = (len(ids) - 1) // T  # whole windows, then the tail
    windows = ids[: n * T + 1].unfold(0, T + 1, T) if n else ids[:0].view(0, T + 1)  # (n, T + 1)
    chunks = [windows[i : i + batch_size] for i in range(0, n, batch_size)]
    tail = len(ids) - 1 - n * T
    if tail > 0:
        chunks.append(ids[-tail - 1 :][None])
    losses = []
    for rows in chunks:  # (b, t + 1): t inputs, each with its next token
        logits, _ = model(rows[:, :-1].to(device))  # (b, t, V)
        losses.append(lm_loss(logits, rows[:, 1:].to(device), reduction="none").cpu())  # (b * t,)
    return torch.cat(losses)
