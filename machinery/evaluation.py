"""A trained checkpoint's loss on every position of its val split, each token once (python train.py --eval_only),
and each token's loss, which tools/pictures.py draws."""

import math

import numpy as np
import torch

from model import lm_loss
from utils import bits_per_char

from machinery.checkpoint import load_model
from machinery.cli import log
from machinery.device import choose_device, set_threads
from machinery.sources import validation_split


def evaluate_checkpoint(path, data, device_name, batch_size, threads=0):
    """Loss, perplexity and bits per character on every position of the checkpoint's val split (or data's)."""
    device = choose_device(device_name)
    set_threads(threads)
    model, tokenizer, checkpoint = load_model(path, device)
    corpus, data = validation_split(checkpoint, tokenizer, data)
    val_ids = torch.as_tensor(np.asarray(corpus.val, dtype=np.int64))
    loss = token_losses(model, val_ids, batch_size).mean().item()
    bpc = bits_per_char(loss, corpus.chars_per_token)
    log(f"{path} on the val split of {data} ({len(val_ids):,} tokens, every position once):")
    log(f"loss {loss:.4f} nats/token | perplexity {math.exp(loss):.3f} | {bpc:.4f} bits per character")
    return {"loss": loss, "perplexity": math.exp(loss), "bpc": bpc}


@torch.no_grad()
def token_losses(model, ids, batch_size=1):
    """The loss (nats) of every token of ids (n,) but the first, (n - 1,), each once (estimate_loss samples windows)."""
    model.eval()
    T, device = model.config.block_size, model.wte.weight.device
    n = (len(ids) - 1) // T  # whole windows; a split shorter than one is all tail
    windows = ids[:n * T + 1].unfold(0, T + 1, T) if n else ids[:0].view(0, T + 1)  # (n, T + 1)
    chunks = [windows[i:i + batch_size] for i in range(0, n, batch_size)]
    tail = len(ids) - 1 - n * T
    chunks += [ids[-tail - 1:][None]] if tail > 0 else []
    losses = []
    for rows in chunks:  # (b, t + 1): t inputs, each with its next token
        logits, _ = model(rows[:, :-1].to(device))  # (b, t, V)
        losses.append(lm_loss(logits, rows[:, 1:].to(device), reduction="none").cpu())  # (b * t,)
    return torch.cat(losses)
