"""The data path, in the order it runs: text -> token ids (the tokenizer) -> a train/val split ->
random (x, y) batches, y being x shifted by one token.

A model only ever sees integers. CharTokenizer is one token per character; bpe.py's tokenizers have
the same methods. Where the text comes from is machinery/sources.py's business."""

import math
import re

import numpy as np
import torch

from config import EOT, TRAIN_FRACTION


class CharTokenizer:
    """One token per character: the sorted characters of the text, then "<|endoftext|>" as one more
    id, so that a model can learn where a document ends."""

    def __init__(self, chars, special_tokens=(EOT,)):
        self.chars = list(chars)  # id -> character
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}  # character -> id
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(special_tokens)}
        self.vocab_size = len(self.chars) + len(self.special_tokens)
        self.eot_id = self.special_tokens.get(EOT)

    @classmethod
    def from_text(cls, text, special_tokens=(EOT,)):
        return cls(sorted(set("".join(split_special(text, special_tokens)[::2]))), special_tokens)

    def encode(self, text):
        ids = []
        for part in split_special(text, self.special_tokens):  # text and special tokens, in turn
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            else:
                ids += [self.stoi[ch] for ch in part]
        return ids

    def decode(self, ids):
        names = {i: s for s, i in self.special_tokens.items()}
        return "".join(self.chars[i] if i < len(self.chars) else names[i] for i in ids)

    def unknown_chars(self, text):
        return sorted(set("".join(split_special(text, self.special_tokens)[::2])) - set(self.stoi))

    def to_dict(self):
        return {"kind": "char", "chars": self.chars, "special_tokens": list(self.special_tokens)}


def split_special(text, special_tokens):
    """[text, special, text, ...]: re.split keeps what its pattern's group matched."""
    if not special_tokens:
        return [text]
    return re.split("(" + "|".join(map(re.escape, special_tokens)) + ")", text)


def split_train_val(text):
    """The first 90% trains, the rest validates, unshuffled: the model learns text in order.
    The cut never falls inside a special token like <|endoftext|>."""
    n = whole_eot(text, int(len(text) * TRAIN_FRACTION))
    return text[:n], text[n:]


def whole_eot(text, n):
    """n, or the start of the special token (<|endoftext|>, <|user|>, ...) that n falls inside."""
    start = text.rfind("<|", max(0, n - 20), n + 1)
    return start if start != -1 and text.find("|>", start) + 2 > n else n


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
