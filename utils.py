"""The data path, in the order it runs: text -> token ids (tokenizer.py) -> a train/val split ->
random (x, y) batches, y being x shifted by one token; and a loss in bits per character. Where
the text comes from is machinery/sources.py's business."""

import math

import numpy as np
import torch

from config import SPECIAL_TOKENS, TRAIN_FRACTION
from tokenizer import split_special


def split_train_val(text):
    """The first 90% trains, the rest validates, unshuffled: the model learns text in order."""
    n = whole_special(text, int(len(text) * TRAIN_FRACTION))
    return text[:n], text[n:]


def whole_special(text, n):
    """n, or the start of the special token (<|endoftext|>, a role) that n falls inside: a cut
    never splits one."""
    for s in SPECIAL_TOKENS:
        start = text.find(s, max(0, n - len(s) + 1), n + len(s) - 1)  # one that holds n
        if 0 <= start < n:
            return start
    return n


def get_batch(data, batch_size, block_size, device, targets=None):
    """Random windows of a 1-D token stream: x (B, T) and y (B, T), y[b, t] being the token after
    x[b, t]. data: a tensor, or a NumPy memmap of which only the B windows are read from disk.
    targets: None, or a bool tensor as long as data, False where a token is context only."""
    starts = torch.randint(len(data) - block_size, (batch_size,)).tolist()
    windows = torch.stack(
        [torch.from_numpy(np.asarray(data[i : i + block_size + 1], dtype=np.int64)) for i in starts]
    )  # (B, T + 1)
    x, y = windows[:, :-1], windows[:, 1:]  # each (B, T)
    if targets is not None:  # a target of -100 counts for nothing in the loss (model.lm_loss)
        y = y.masked_fill(~torch.stack([targets[i + 1 : i + block_size + 1] for i in starts]), -100)
    if device.type == "cuda":  # pinned memory: the copy overlaps the GPU's work
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (x, y))
    return x.to(device), y.to(device)


def chars_per_token(tokenizer, ids):
    return text_length(tokenizer.decode(list(ids)), tokenizer.special_tokens) / max(1, len(ids))


def text_length(text, special_tokens):
    """Characters of text, a special token (<|endoftext|>, a role) one, like a line end."""
    return len("\n".join(split_special(text, special_tokens)[::2]))


def bits_per_char(loss, chars_per_token):
    """A loss in nats per token as bits per character: comparable between tokenizers."""
    return loss / chars_per_token / math.log(2)
