"""The data path of the lesson: text -> token ids -> a contiguous train/val split -> random
(x, y) batches, where y is x shifted by one token. train.py batches with get_batch.

Where the text comes from (a file, a folder, JSONL, a Q&A list, or a corpus tokenized to disk
by machinery/prepare.py) is machinery/sources.py's business."""

from dataclasses import dataclass

import numpy as np
import torch

from config import TinyLLMError, TrainConfig
from tokenizer import make_tokenizer

from machinery.checkpoint import extend_tokenizer
from machinery.sources import is_prepared, prepared_streams, read_text


# ----------------------------------------------------------------------------- token streams

@dataclass
class Corpus:
    """A source, tokenized: the tokenizer and the two token streams."""
    tokenizer: object
    train: object              # 1-D token ids: a LongTensor, or a read-only np.memmap
    val: object
    chars_per_token: float     # of the val split, to report bits per character
    added: list                # characters a given char tokenizer lacked and now has
    old_ids: list = None       # with added: the id each token had before (None for new ones)


def tokenize(path, kind="char", vocab_size=0, tokenizer=None, clean=False, extensions=".txt", extend=False):
    """The source as train and val token streams. The tokenizer is reused when given (resume,
    fine-tuning) or built: char from the whole text, BPE learned from the training split only.
    A given char tokenizer that lacks some of the text's characters is extended with them when
    extend is True, and refused otherwise. The split is contiguous, 90/10."""
    if is_prepared(path):  # a folder from prepare.py: the tokens are on disk already
        return Corpus(*prepared_streams(path, tokenizer), added=[])
    text = read_text(path, clean, extensions)
    if tokenizer is None:  # a fresh run: the tokenizer is learned from the text
        tokenizer = make_tokenizer(kind, text if kind == "char" else text[:int(len(text) * 0.9)], vocab_size)
        old_ids, added = None, []
    else:  # a resumed or fine-tuned run's: fine-tuning may add characters it lacks
        tokenizer, old_ids, added = extend_tokenizer(tokenizer, text, extend, path)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = split_train_val(ids)
    chars_per_token = len(tokenizer.decode(val_ids.tolist())) / max(1, len(val_ids))
    return Corpus(tokenizer, train_ids, val_ids, chars_per_token, added, old_ids)


def split_train_val(ids, train_fraction=0.9):
    """Contiguous split: the first 90% trains, the rest validates. Tokens are never
    shuffled, since next-token prediction needs them in order."""
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]


def validation_split(checkpoint, tokenizer, data=None):
    """(corpus, data): the source a checkpoint's run was validated on, tokenized and split as
    it was then (its data, clean and data_ext), or another source given as data."""
    saved = checkpoint.get("train_config", {})
    data = data or saved.get("data", TrainConfig.data)
    corpus = tokenize(data, tokenizer=tokenizer, clean=saved.get("clean", False), extensions=saved.get("data_ext", ".txt"))
    check_long_enough(corpus.val, 1, "validation", data)
    return corpus, data


def check_long_enough(ids, block_size, name, path):
    if len(ids) < block_size + 1:
        raise TinyLLMError(f"{path}: the {name} split has {len(ids)} tokens but block_size {block_size} "
                           f"needs at least {block_size + 1}; use more text or a smaller --block_size")


# ----------------------------------------------------------------------------- batches

def get_batch(data, batch_size, block_size, device, generator=None):
    """Random windows from a 1-D token stream: x (B, T) and y (B, T), where
    y[b, t] is the token right after x[b, t] in the corpus. data is a tensor, or a
    NumPy memmap of which only the B windows are read from disk."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    if isinstance(data, np.ndarray):
        windows = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix.tolist()]).astype(np.int64))
    else:
        windows = data.unfold(0, block_size + 1, 1)[ix]  # every window of T+1 tokens (a view), pick B: (B, T+1)
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
