"""The data, in the order it runs. A text is split into train and val, and each part is tokenized
(tokenizer.py) into the corpus. A conversation uses the chat template, and the model learns from
its answers alone. Then come random (x, y) batches, where y is x shifted by one token, and a loss
in bits per character. machinery/sources.py reads the text (files, folders, JSON records)."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from config import ASSISTANT, EOT, NO_TARGET, SPECIAL_TOKENS, TRAIN_FRACTION, USER
from tokenizer import ordinary


def split_train_val(text):
    """Splits text into train and val. The first 90% trains the model and the rest validates it.
    There is no shuffle, so the model learns text in order."""
    n = whole_special(text, int(len(text) * TRAIN_FRACTION))
    return text[:n], text[n:]


def whole_special(text, n):
    """Returns n, or the start of the special token that n falls inside. That way a cut never
    splits a special token."""
    for s in SPECIAL_TOKENS:
        start = text.find(s, max(0, n - len(s) + 1), n + len(s) - 1)  # a token that contains n
        if 0 <= start < n:
            return start
    return n


@dataclass
class Corpus:
    tokenizer: object
    train: object  # 1-D token ids: a LongTensor, or a read-only np.memmap
    val: object
    chars_per_token: float  # measured on the val split; turns a loss into bits per character
    train_targets: object = None  # in a chat, True at target tokens; None means all are targets
    val_targets: object = None
    old_ids: list = None  # for a grown tokenizer, each token's old id; None for a new tokenizer


def make_corpus(text, tokenizer, answers_only=True):
    """Splits text 90/10 and tokenizes both parts. With answers_only, the answers of a chat are the
    targets."""
    ids = [torch.tensor(tokenizer.encode(part), dtype=torch.long) for part in split_train_val(text)]
    targets = [answer_targets(i, tokenizer) if answers_only else None for i in ids]
    return Corpus(tokenizer, *ids, chars_per_token(tokenizer, ids[1].tolist()), *targets)


def turn(role, content):
    """Returns one turn of a conversation in the chat template: <|user|>question\n, or
    <|assistant|>answer<|endoftext|>. An answer ends with EOT, so the model learns to end its
    turn."""
    if role == "user":
        return f"{USER}{content.strip()}\n"
    return f"{ASSISTANT}{content.strip()}{EOT}"


def question(text):
    """Returns a question in the chat template, up to where its answer begins. A chat model answers
    from there."""
    return turn("user", text) + ASSISTANT


# the same template in Jinja, as a Hugging Face tokenizer holds it (tools.export)
CHAT_TEMPLATE = (
    "<|endoftext|>{% for m in messages %}{% if m.role == 'user' %}<|user|>{{ m.content | trim }}\n"
    "{% else %}<|assistant|>{{ m.content | trim }}<|endoftext|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def answer_targets(ids, tokenizer):
    """Returns a bool tensor, True at the tokens of each answer and the <|endoftext|> that ends it.
    These are the tokens a chat model learns. Returns None if there are no answers: then every
    token is a target."""
    start = tokenizer.special_tokens.get(ASSISTANT)
    if start is None or not (ids == start).any():  # plain text, with a chat tokenizer or not
        return None
    targets = []
    inside = False
    for token in ids.tolist():
        targets.append(inside)  # True after <|assistant|>, up to and including <|endoftext|>
        if token == start:
            inside = True
        elif token == tokenizer.eot_id:
            inside = False
    return torch.tensor(targets)


def get_batch(data, batch_size, block_size, device, targets=None):
    """Returns random windows of a 1-D token stream: x (B, T) and y (B, T), where y[b, t] is the
    token after x[b, t]. data is a tensor, or a NumPy memmap; only the B windows are read from disk.
    targets is None, or a bool tensor as long as data, False where a token is only context."""
    starts = torch.randint(len(data) - block_size, (batch_size,)).tolist()
    windows = [np.asarray(data[i : i + block_size + 1], dtype=np.int64) for i in starts]
    windows = torch.from_numpy(np.stack(windows))  # (B, T + 1)
    x = windows[:, :-1]  # (B, T)
    y = windows[:, 1:]  # (B, T)
    if targets is not None:  # the tokens of a question are context, not targets (model.lm_loss)
        answers = torch.stack([targets[i + 1 : i + block_size + 1] for i in starts])  # (B, T)
        y = y.masked_fill(~answers, NO_TARGET)
    if device.type == "cuda":  # pinned memory lets the copy overlap the GPU's work
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (x, y))
    return x.to(device), y.to(device)


def make_batches(corpus, block_size, micro_batch, data_fraction, device):
    """Returns {split: () -> (x, y)}. A batch holds micro_batch random windows of block_size
    tokens. The train split is cut to its first data_fraction."""
    n = max(block_size + 1, int(len(corpus.train) * data_fraction))
    train = (corpus.train[:n], micro_batch, block_size, device, corpus.train_targets)
    val = (corpus.val, micro_batch, block_size, device, corpus.val_targets)
    return {"train": lambda: get_batch(*train), "val": lambda: get_batch(*val)}


def chars_per_token(tokenizer, ids):
    return text_length(tokenizer.decode(list(ids)), tokenizer.special_tokens) / max(1, len(ids))


def text_length(text, special_tokens):
    """Returns the number of characters in text. A special token (<|endoftext|>, a role) counts as
    one character, like a line end."""
    return len("\n".join(ordinary(text, special_tokens)))


def bits_per_char(loss, chars_per_token):
    """Converts a loss in nats per token to bits per character, which compares across tokenizers."""
    return loss / chars_per_token / math.log(2)
