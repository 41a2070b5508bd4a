"""Shows each new token of generate.py --show_probs with its probability.

The probability is under the distribution the token was drawn from. Each token also shows the
entropy of that distribution in bits and, with --show_top K, the K likeliest tokens."""

import math
import sys
import unicodedata
from collections import namedtuple

import torch

from config import SamplerConfig
from sampling import next_token_probs
from tokenizer import ByteLevelTokenizer

# probability bands, most likely first: (lowest p, ANSI colour, words for the legend)
BANDS = (
    (0.5, "32", "p >= 0.5"),
    (0.2, "33", "0.2 to 0.5"),
    (0.05, "35", "0.05 to 0.2"),
    (0.0, "31", "below 0.05"),
)
Step = namedtuple("Step", "token p entropy top")  # top: [(token id, probability)], likeliest first
MODELS_OWN = SamplerConfig(temperature=1.0)  # the raw distribution of the model, nothing filtered


def entropy_bits(probs):
    """Returns the entropy H = -sum p log2 p of each row of probs (B, V), in bits.

    It does not use entr, which older torch on a Mac lacks."""
    p = probs.float()
    return -(p * p.clamp_min(1e-30).log()).sum(dim=-1) / math.log(2)  # (B,)


def paint(text, p):
    """Returns `text` in the colour of the band of `p`.

    Line ends stay outside the colour codes, because terminals carry colour over them."""
    code = next(code for low, code, _ in BANDS if p >= low)
    return "\n".join(f"\033[{code}m{part}\033[0m" if part else "" for part in text.split("\n"))


@torch.inference_mode()
def model_odds(context, idx, new_tokens):
    """Yields (token (B, 1), probs of the model (B, V)) for each of new_tokens (B, n) after idx."""
    for t in range(new_tokens.size(1)):
        token = new_tokens[:, t : t + 1]
        yield token, next_token_probs(context.next_logits(idx), MODELS_OWN, idx)
        idx = torch.cat((idx, token), dim=1)


def token_piece(tokenizer, token):
    """Returns the text of one token, or its bytes where it is only part of a UTF-8 character."""
    text = tokenizer.decode([token])
    if "\ufffd" in text and isinstance(tokenizer, ByteLevelTokenizer):
        raw = tokenizer.enc.decode_single_token_bytes(token)
        if text.encode("utf-8") != raw:  # not UTF-8: the U+FFFD in text replaced some bytes
            return raw
    return text


class WholeCharacters:
    """Joins tokens into whole characters, with their joint probability.

    A token can end in the middle of a character."""

    def __init__(self, tokenizer, stop=None):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids = []
        self.p = 1.0

    def add(self, token, p=1.0):
        """Returns (text, probability) once the tokens so far make whole characters, else None."""
        if token == self.stop:
            return None
        self.ids.append(token)
        self.p *= p
        return None if self.tokenizer.decode(self.ids).endswith("\ufffd") else self.flush()

    def flush(self):  # returns what is held, whole characters or not
        piece = (self.tokenizer.decode(self.ids), self.p)
        self.ids = []
        self.p = 1.0
        return piece


class Printer(WholeCharacters):
    """Prints the first sample as it is drawn, in whole characters (generate.py, chat.py)."""

    def begin(self, prompt_ids, n_samples=1):
        print(self.tokenizer.decode(prompt_ids), end="", flush=True)

    def add(self, token, probs=None):  # token is (B, 1); only the first row is printed
        piece = super().add(token[0, 0].item())
        if piece:
            print(piece[0], end="", flush=True)

    def end(self, tail=""):
        print(self.flush()[0] + tail, flush=True)


def summary(steps):
    total = sum(math.log(s.p) for s in steps)
    mean = total / len(steps)
    entropy = sum(s.entropy for s in steps) / len(steps)
    return (
        f"{len(steps)} tokens: mean log-probability {mean:.3f} nats "
        f"| perplexity {math.exp(-mean):.3f} | mean entropy {entropy:.3f} bits "
        f"| total log-probability {total:.3f} nats"
    )


class Annotator:
    """Records the Steps of every sample as they are drawn (begin, add, end).

    With `live`, the first sample is written as it comes; report returns any sample later. A
    terminal gets colours; a file, a pipe or --show_top gets a row per token."""

    def __init__(self, tokenizer, top, to_file, stop, live):
        self.tokenizer = tokenizer
        self.top = top
        self.stop = stop
        self.live = live
        self.colour = sys.stdout.isatty() and not to_file and not top
        self.pieces = WholeCharacters(tokenizer, stop)  # used by painted; a flush empties it

    def begin(self, prompt_ids, n_samples):
        self.samples = [[] for _ in range(n_samples)]
        self.prompt = prompt_ids
        if self.colour:
            print("probability of each new token: " + "  ".join(paint(w, p) for p, _, w in BANDS))
            if self.live:
                print(self.tokenizer.decode(prompt_ids), end="", flush=True)

    def add(self, token, probs):
        """Records one step of every sample: token (B, 1) drawn from probs (B, V)."""
        p = probs.gather(1, token)[:, 0].tolist()
        entropy = entropy_bits(probs).tolist()
        top = probs.topk(min(self.top, probs.size(-1)), dim=-1) if self.top else None
        for b, steps in enumerate(self.samples):
            if steps and steps[-1].token == self.stop:
                continue  # this sample has ended; the batch goes on for the others
            alternatives = list(zip(top.indices[b].tolist(), top.values[b].tolist())) if top else []
            steps.append(Step(token[b, 0].item(), p[b], entropy[b], alternatives))
            if self.live and b == 0 and self.colour:
                print(self.painted(steps[-1:], flush=False), end="", flush=True)
            elif self.live and b == 0:
                print(self.row(steps[-1]), flush=True)

    def end(self):
        if self.live:
            tail = self.painted([], flush=True) if self.colour else self.text(0)
            print(tail + "\n" + summary(self.samples[0]), flush=True)

    def text(self, i):
        tokens = [s.token for s in self.samples[i] if s.token != self.stop]
        return self.tokenizer.decode(self.prompt + tokens)

    def painted(self, steps, flush):
        """Returns the whole characters of `steps` in colour; with `flush`, also what is left."""
        found = [self.pieces.add(s.token, s.p) for s in steps]
        found.append(self.pieces.flush() if flush else None)
        return "".join(paint(*piece) for piece in found if piece)

    def report(self, i):
        steps = self.samples[i]
        if not self.colour:
            return "\n".join([self.text(i), *map(self.row, steps), summary(steps)])
        text = self.tokenizer.decode(self.prompt) + self.painted(steps, flush=True)
        return text + "\n" + summary(steps)

    def row(self, step):
        """Returns the row of one token: 'e'  p=0.731  H=1.20 bits  top: 'e' 0.731, 'a' 0.100"""
        label = repr(token_piece(self.tokenizer, step.token))
        # a wide (CJK) character takes two columns
        columns = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in label)
        line = f"{label}{' ' * max(0, 12 - columns)} p={step.p:.3f}  H={step.entropy:.2f} bits"
        if step.top:
            pieces = (f"{token_piece(self.tokenizer, t)!r} {p:.3f}" for t, p in step.top)
            line += "  top: " + ", ".join(pieces)
        return line
