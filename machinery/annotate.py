"""generate.py --show_probs: each new token with its probability under the distribution it was drawn
from, that distribution's entropy in bits and, with --show_top K, the K likeliest tokens."""

import math
import unicodedata
from collections import namedtuple

import torch

from bpe import ByteLevelTokenizer
from sampling import Context

# probability bands, most likely first: (lowest p, ANSI colour, the legend's words)
BANDS = ((0.5, "32", "p >= 0.5"), (0.2, "33", "0.2 to 0.5"), (0.05, "35", "0.05 to 0.2"), (0.0, "31", "below 0.05"))
Step = namedtuple("Step", "token p entropy top")  # top: [(token id, probability)], most likely first


def entropy_bits(probs):
    """H = -sum p log2 p over each row of probs (B, V) (written out: older torch on a Mac lacks entr)."""
    p = probs.float()
    return -(p * p.clamp_min(1e-30).log()).sum(dim=-1) / math.log(2)  # (B,)


def paint(text, p):
    """text in the colour of p's band, line ends outside the codes (some terminals carry colour over them)."""
    code = next(code for low, code, _ in BANDS if p >= low)
    return "\n".join(f"\033[{code}m{part}\033[0m" if part else "" for part in text.split("\n"))


@torch.inference_mode()
def model_odds(model, idx, new_tokens, use_cache=True):
    """(token (B, 1), the model's own distribution (B, V)) for each of new_tokens (B, n) after idx (B, T)."""
    context = Context(model, use_cache)
    for t in range(new_tokens.size(1)):
        probs = torch.softmax(context.next_logits(idx).float(), dim=-1)
        token = new_tokens[:, t:t + 1]
        yield token, probs
        idx = torch.cat((idx, token), dim=1)


def token_piece(tokenizer, token):
    """One token's text, or its bytes where it is only part of a UTF-8 character."""
    text = tokenizer.decode([token])
    if "\ufffd" in text and isinstance(tokenizer, ByteLevelTokenizer):
        raw = tokenizer.enc.decode_single_token_bytes(token)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    return text


class WholeCharacters:
    """Tokens to whole characters, with their joint probability: a byte-level token can end mid-character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.p = tokenizer, [], 1.0

    def add(self, token, p):
        """(text, probability) once the tokens so far make whole characters, else None."""
        self.ids.append(token)
        self.p *= p
        text = self.tokenizer.decode(self.ids)
        return None if text.endswith("\ufffd") else self.take(text)

    def flush(self):
        """What is left at the end, whole characters or not (None: nothing)."""
        return self.take(self.tokenizer.decode(self.ids)) if self.ids else None

    def take(self, text):
        piece, self.ids, self.p = (text, self.p), [], 1.0
        return piece


def summary(steps):
    total = sum(math.log(s.p) for s in steps)
    mean, entropy = total / len(steps), sum(s.entropy for s in steps) / len(steps)
    return (f"{len(steps)} tokens: mean log-probability {mean:.3f} nats | perplexity {math.exp(-mean):.3f} "
            f"| mean entropy {entropy:.3f} bits | total log-probability {total:.3f} nats")


class Annotator:
    """Every sample's Steps as drawn (begin, add, end): the first written as it comes (live), any one later
    by report. A terminal gets colours; a file, a pipe or --show_top a row per token."""

    def __init__(self, tokenizer, top=0, colour=False):
        self.tokenizer, self.top, self.colour = tokenizer, top, colour and not top

    def begin(self, prompt_ids, n_samples, stop, live):
        self.samples, self.prompt, self.stop, self.live = [[] for _ in range(n_samples)], prompt_ids, stop, live
        self.pieces = WholeCharacters(self.tokenizer)
        if self.colour:
            print("probability of each new token: " + "  ".join(paint(w, low) for low, _, w in BANDS))
            if live:
                print(self.tokenizer.decode(prompt_ids), end="", flush=True)

    def add(self, token, probs):
        """One step of every sample: token (B, 1) drawn from probs (B, V)."""
        p, entropy = probs.gather(1, token)[:, 0].tolist(), entropy_bits(probs).tolist()  # each (B,)
        top = probs.topk(min(self.top, probs.size(-1)), dim=-1) if self.top else None
        for b, steps in enumerate(self.samples):
            if steps and steps[-1].token == self.stop:
                continue  # this sample has ended; the batch goes on for the others
            alternatives = list(zip(top.indices[b].tolist(), top.values[b].tolist())) if top else []
            steps.append(Step(token[b, 0].item(), p[b], entropy[b], alternatives))
            if self.live and b == 0:
                print(self.row(steps[-1]) if not self.colour else self.painted([steps[-1]], flush=False),
                      end="" if self.colour else "\n", flush=True)

    def end(self):
        if self.live:
            tail = self.painted([], flush=True) if self.colour else self.text(0)
            print(tail + "\n" + summary(self.samples[0]), flush=True)

    def text(self, i):
        return self.tokenizer.decode(self.prompt + [s.token for s in self.samples[i] if s.token != self.stop])

    def painted(self, steps, flush):
        """The steps' whole characters in colour (flush: and what is left)."""
        found = [self.pieces.add(s.token, s.p) for s in steps if s.token != self.stop]
        return "".join(paint(*p) for p in found + [self.pieces.flush() if flush else None] if p)

    def report(self, i):
        steps = self.samples[i]
        if not self.colour:
            return self.text(i) + "\n" + "\n".join(self.row(s) for s in steps) + "\n" + summary(steps)
        self.pieces = WholeCharacters(self.tokenizer)
        return self.tokenizer.decode(self.prompt) + self.painted(steps, flush=True) + "\n" + summary(steps)

    def row(self, step):
        """token  p=0.731  H=1.20 bits  top: 'e' 0.731, 'a' 0.100"""
        label = repr(token_piece(self.tokenizer, step.token))
        columns = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in label)  # CJK: two
        line = f"{label}{' ' * max(0, 12 - columns)} p={step.p:.3f}  H={step.entropy:.2f} bits"
        if step.top:
            line += "  top: " + ", ".join(f"{token_piece(self.tokenizer, t)!r} {p:.3f}" for t, p in step.top)
        return line
