"""The data path, in the order it runs: text -> token ids (the tokenizer) -> a contiguous
train/val split -> random (x, y) batches, y being x shifted by one token.

A model only ever sees integers: the tokenizer turns text into ids and ids back into text. The
one to read is CharTokenizer, one token per character. The byte-level ones (--tokenizer bpe,
gpt2) have the same methods and are a deep dive (deep_dives/bpe.py). Where the text comes from
(a file, a folder, JSONL, a corpus tokenized to disk) is machinery/sources.py's business."""

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from config import BPE_VOCAB_SIZE, EOT, TRAIN_FRACTION, TinyLLMError
from deep_dives import bpe  # the byte-level tokenizers: a deep dive


# ----------------------------------------------------------------------------- text to token ids and back

class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters seen, plus
    "<|endoftext|>" as one extra id after them, so a char model can learn where a document ends
    (fine-tuned on Q&A data, say). to_dict: the tokenizer as plain data, for checkpoints."""

    def __init__(self, chars, special_tokens=()):
        self.chars = list(chars)                              # id -> character
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}  # character -> id
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(special_tokens)}
        self.vocab_size = len(self.chars) + len(self.special_tokens)
        self.eot_id = self.special_tokens.get(EOT)

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text.replace(EOT, ""))), [EOT])  # "<|endoftext|>" is one token, not 13 characters

    def encode(self, text):
        ids = []
        for part in self.split_special(text):  # plain text and special tokens, in order
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            else:
                ids.extend(self.stoi[ch] for ch in part)
        return ids

    def decode(self, ids):
        names = {i: s for s, i in self.special_tokens.items()}
        return "".join(self.chars[i] if i < len(self.chars) else names[i] for i in ids)

    def split_special(self, text):
        """text cut around its special tokens: [text, special, text, special, ..., text] (re.split
        keeps what its pattern's group matched: the special tokens)."""
        if not self.special_tokens:
            return [text]
        return re.split("(" + "|".join(map(re.escape, self.special_tokens)) + ")", text)

    def unknown_chars(self, text):
        """The characters of text this vocabulary has no token for, sorted."""
        return sorted(set("".join(self.split_special(text)[::2])) - set(self.stoi))

    def to_dict(self):
        return {"kind": "char", "chars": self.chars, "special_tokens": list(self.special_tokens)}


def make_tokenizer(kind, text, vocab_size, verbose=False):
    """A new tokenizer of the given kind; text and vocab_size are used where they apply (bpe:
    vocab_size 0 means BPE_VOCAB_SIZE)."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "bpe":
        return bpe.BPETokenizer.train(text, vocab_size or BPE_VOCAB_SIZE, verbose=verbose)
    if kind == "gpt2":
        return bpe.GPT2Tokenizer()
    raise TinyLLMError(f"unknown tokenizer {kind!r}: choose char, bpe or gpt2")


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


def chars_per_token(tokenizer, ids):
    """Characters per token of ids; <|endoftext|> counts as one, a boundary like a line end (not its 13 letters)."""
    return len(tokenizer.decode(list(ids)).replace(EOT, "\n")) / max(1, len(ids))


def bits_per_char(loss, chars_per_token):
    """A loss in nats per token as bits per character: comparable between tokenizers."""
    return loss / chars_per_token / math.log(2)


def tokenize(text, tokenizer=None, kind="char", vocab_size=0):
    """text -> a contiguous 90/10 train/val split of its characters -> each part's token ids. A fresh
    run learns its tokenizer from the text (BPE from the training part only, so that validation is
    text it never learned from); a resumed or fine-tuned run brings its own."""
    train_text, val_text = split_train_val(text)
    if tokenizer is None:
        tokenizer = make_tokenizer(kind, text if kind == "char" else train_text, vocab_size)
    train_ids, val_ids = (torch.tensor(tokenizer.encode(part), dtype=torch.long) for part in (train_text, val_text))
    return Corpus(tokenizer, train_ids, val_ids, chars_per_token(tokenizer, val_ids.tolist()))  # ids: (N,)


def split_train_val(text):
    """Contiguous split: the first 90% trains, the rest validates. Text is never
    shuffled, since next-token prediction needs it in order."""
    n = whole_eot(text, int(len(text) * TRAIN_FRACTION))  # never inside an <|endoftext|>: one token
    return text[:n], text[n:]


def whole_eot(text, n):
    """n, or where n falls inside an <|endoftext|>, that marker's start (it goes whole to the part after)."""
    eot = text.find(EOT, max(0, n - len(EOT) + 1), n + len(EOT) - 1)
    return eot if -1 < eot < n else n


# ----------------------------------------------------------------------------- batches

def get_batch(data, batch_size, block_size, device, generator=None):
    """Random windows from a 1-D token stream: x (B, T) and y (B, T), where
    y[b, t] is the token right after x[b, t] in the corpus. data is a tensor, or a
    NumPy memmap of which only the B windows are read from disk."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    # B windows of T+1 tokens (from a memmap only these are read from disk); np.asarray is
    # the one way in for both a tensor and a memmap
    windows = torch.stack([torch.from_numpy(np.asarray(data[i:i + block_size + 1], dtype=np.int64))
                           for i in ix.tolist()])  # (B, T+1)
    x, y = windows[:, :-1], windows[:, 1:]  # each (B, T): y[b, t] is the token after x[b, t]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
