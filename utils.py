"""The data, in the order it runs: a text split into train and val, each tokenized
(tokenizer.py) into the corpus; a conversation in the chat template, which learns from its answers
alone; then random (x, y) batches, y being x shifted by one token; and a loss in bits per
character. Where the text comes from (files, folders, JSON records) is machinery/sources.py's."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from config import ASSISTANT, EOT, NO_TARGET, SPECIAL_TOKENS, TRAIN_FRACTION, USER
from tokenizer import ordinary


def split_train_val(text):
    """The first 90% trains, the rest validates, unshuffled: the model learns text in order."""
    n = whole_special(text, int(len(text) * TRAIN_FRACTION))
    return text[:n], text[n:]


def whole_special(text, n):
    """n, or the start of the special token that n falls inside: a cut never splits one."""
    for s in SPECIAL_TOKENS:
        start = text.find(s, max(0, n - len(s) + 1), n + len(s) - 1)  # one that holds n
        if 0 <= start < n:
            return start
    return n


@dataclass
class Corpus:
    tokenizer: object
    train: object  # 1-D token ids: a LongTensor, or a read-only np.memmap
    val: object
    chars_per_token: float  # of the val split: a loss in bits per character
    train_targets: object = None  # conversations: True where a token is a target (None: all are)
    val_targets: object = None
    old_ids: list = None  # a tokenizer grown for it: each token's id before (None: a new one)


def make_corpus(text, tokenizer, answers_only=True):
    """text split 90/10 and tokenized; with answers_only, a chat's answers are its targets."""
    ids = [torch.tensor(tokenizer.encode(part), dtype=torch.long) for part in split_train_val(text)]
    targets = [answer_targets(i, tokenizer) if answers_only else None for i in ids]
    return Corpus(tokenizer, *ids, chars_per_token(tokenizer, ids[1].tolist()), *targets)


def turn(role, content):
    """One turn of a conversation in the chat template: <|user|>question\n, or
    <|assistant|>answer<|endoftext|>. An answer ends with EOT: the model learns to end its turn."""
    if role == "user":
        return f"{USER}{content.strip()}\n"
    return f"{ASSISTANT}{content.strip()}{EOT}"


def question(text):
    """A question in the chat template, up to where its answer begins: what a chat model answers."""
    return turn("user", text) + ASSISTANT


# the same template in Jinja, as a Hugging Face tokenizer holds it (tools.export)
CHAT_TEMPLATE = (
    "<|endoftext|>{% for m in messages %}{% if m.role == 'user' %}<|user|>{{ m.content | trim }}\n"
    "{% else %}<|assistant|>{{ m.content | trim }}<|endoftext|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def answer_targets(ids, tokenizer):
    """True at each answer's tokens and the <|endoftext|> ending it: what a chat model learns.
    None without answers: every token is a target."""
    start = tokenizer.special_tokens.get(ASSISTANT)
    if start is None or not (ids == start).any():  # plain text, a chat model's tokenizer or not
        return None
    targets = []
    inside = False
    for token in ids.tolist():
        targets.append(inside)  # after <|assistant|>, up to its <|endoftext|> included
        if token == start:
            inside = True
        elif token == tokenizer.eot_id:
            inside = False
    return torch.tensor(targets)


def get_batch(data, batch_size, block_size, device, targets=None):
    """Random windows of a 1-D token stream: x (B, T) and y (B, T), y[b, t] being the token after
    x[b, t]. data: a tensor, or a NumPy memmap of which only the B windows are read from disk.
    targets: None, or a bool tensor as long as data, False where a token is context only."""
    starts = torch.randint(len(data) - block_size, (batch_size,)).tolist()
    windows = [np.asarray(data[i : i + block_size + 1], dtype=np.int64) for i in starts]
    windows = torch.from_numpy(np.stack(windows))  # (B, T + 1)
    x = windows[:, :-1]  # (B, T)
    y = windows[:, 1:]  # (B, T)
    if targets is not None:  # a question's tokens are context, no target (model.lm_loss)
        answers = torch.stack([targets[i + 1 : i + block_size + 1] for i in starts])  # (B, T)
        y = y.masked_fill(~answers, NO_TARGET)
    if device.type == "cuda":  # pinned memory: the copy overlaps the GPU's work
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (x, y))
    return x.to(device), y.to(device)


def make_batches(corpus, block_size, micro_batch, data_fraction, device):
    """{split: () -> (x, y)}: micro_batch random windows of block_size tokens, the train split cut
    to its first data_fraction."""
    n = max(block_size + 1, int(len(corpus.train) * data_fraction))
    train = (corpus.train[:n], micro_batch, block_size, device, corpus.train_targets)
    val = (corpus.val, micro_batch, block_size, device, corpus.val_targets)
    return {"train": lambda: get_batch(*train), "val": lambda: get_batch(*val)}


def chars_per_token(tokenizer, ids):
    return text_length(tokenizer.decode(list(ids)), tokenizer.special_tokens) / max(1, len(ids))


def text_length(text, special_tokens):
    """Characters of text, a special token (<|endoftext|>, a role) one, like a line end."""
    return len("\n".join(ordinary(text, special_tokens)))


def bits_per_char(loss, chars_per_token):
    """A loss in nats per token as bits per character: comparable between tokenizers."""
    return loss / chars_per_token / math.log(2)
