"""The data path of the lesson: text -> token ids -> a contiguous train/val split -> random
(x, y) batches, where y is x shifted by one token. train.py batches with get_batch.

Where the text comes from (a file, a folder, JSONL, a Q&A list, or a corpus tokenized to disk
by machinery/prepare.py), and the new characters a fine-tune brings, are machinery/sources.py's
business (load_corpus), which then calls tokenize here."""

from dataclasses import dataclass

import numpy as np
import torch

from tokenizer import make_tokenizer


# ----------------------------------------------------------------------------- token streams

@dataclass
class Corpus:
    """A source, tokenized: the tokenizer and the two token streams."""
    tokenizer: object
    train: object              # 1-D token ids: a LongTensor, or a read-only np.memmap
    val: object
    chars_per_token: float     # of the val split, to report bits per character
    added: list = None         # fine-tuning: characters the checkpoint's char tokenizer lacked and now has
    old_ids: list = None       # with added: the id each token had before (None for new ones)


def tokenize(text, tokenizer=None, kind="char", vocab_size=0):
    """text -> token ids -> a contiguous 90/10 train/val split. A fresh run learns its tokenizer
    from the text (char: every character in it; BPE: merges learned from the training split
    only, so validation stays unseen); a resumed or fine-tuned run brings its own."""
    if tokenizer is None:
        tokenizer = make_tokenizer(kind, text if kind == "char" else text[:int(len(text) * 0.9)], vocab_size)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)  # (N,)
    train_ids, val_ids = split_train_val(ids)
    chars_per_token = len(tokenizer.decode(val_ids.tolist())) / max(1, len(val_ids))
    return Corpus(tokenizer, train_ids, val_ids, chars_per_token)


def split_train_val(ids, train_fraction=0.9):
    """Contiguous split: the first 90% trains, the rest validates. Tokens are never
    shuffled, since next-token prediction needs them in order."""
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]


# ----------------------------------------------------------------------------- batches

def get_batch(data, batch_size, block_size, device, generator=None):
    """Random windows from a 1-D token stream: x (B, T) and y (B, T), where
    y[b, t] is the token right after x[b, t] in the corpus. data is a tensor, or a
    NumPy memmap of which only the B windows are read from disk."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    # B windows of T+1 tokens (from a memmap only these are read from disk)
    windows = torch.stack([torch.from_numpy(np.asarray(data[i:i + block_size + 1], dtype=np.int64))
                           for i in ix.tolist()])  # (B, T+1)
    x, y = windows[:, :-1], windows[:, 1:]  # each (B, T): y[b, t] is the token after x[b, t]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
