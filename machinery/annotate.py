"""generate.py --show_probs: each new token with its probability under the distribution it was drawn
from, that distribution's entropy in bits and, with --show_top K, the K likeliest tokens."""

import math
import unicodedata
from collections import namedtuple

import torch

from sampling import Context

from deep_dives.bpe import ByteLevelTokenizer

# probability bands, most likely first: (lowest p in the band, ANSI colour, what the legend says)
BANDS = ((0.5, "32", "p >= 0.5"), (0.2, "33", "0.2 to 0.5"), (0.05, "35", "0.05 to 0.2"), (0.0, "31", "below 0.05"))
RESET = "\033[0m"
LABEL_WIDTH = 12  # a row's token column; longer BPE tokens push their row's numbers right
# a sample's step: its token, p (its probability under the distribution it was drawn from), that distribution's
# entropy in bits, and top: [(token id, probability)], most likely first (empty without --show_top)
Step = namedtuple("Step", "token p entropy top")


def entropy_bits(probs):
    """H = -sum p log2 p over each row of probs (B, V), where p = 0 adds nothing."""
    p = probs.float()  # (torch.special.entr is missing on a Mac's GPU in older torch: written out instead)
    return -(p * p.clamp_min(1e-30).log()).sum(dim=-1) / math.log(2)  # (B,)


def paint(text, p):
    """text in the colour of p's band, line ends outside the codes (some terminals carry colour over them)."""
    code = next(code for low, code, _ in BANDS if p >= low)
    return "\n".join(f"\033[{code}m{part}{RESET}" if part else "" for part in text.split("\n"))


@torch.inference_mode()
def forced_steps(model, idx, new_tokens, use_cache=True):
    """(token (B, 1), logits (B, V)) per token of new_tokens (B, n) after idx (B, T), as generation computes them."""
    context = Context(model, use_cache)
    for t in range(new_tokens.size(1)):
        logits = context.next_logits(idx)  # (B, V)
        token = new_tokens[:, t:t + 1]  # (B, 1)
        yield token, logits
        idx = torch.cat((idx, token), dim=1)


def model_odds(model, idx, new_tokens, use_cache=True):
    """forced_steps with the model's own distribution (temperature 1): yields (token (B, 1), probs (B, V))."""
    for token, logits in forced_steps(model, idx, new_tokens, use_cache):
        yield token, torch.softmax(logits.float(), dim=-1)


def token_piece(tokenizer, token):
    """One token's text, or its bytes where it is only part of a UTF-8 character (which has no text)."""
    text = tokenizer.decode([token])
    if "\ufffd" in text and isinstance(tokenizer, ByteLevelTokenizer):
        raw = tokenizer.enc.decode_single_token_bytes(token)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    return text


def token_label(tokenizer, token):
    """A row's token: its text quoted, line ends and tabs escaped ('\\n'), or its bytes, b'\\xe2\\x80'."""
    return repr(token_piece(tokenizer, token))


class WholeCharacters:
    """Sampled tokens to whole characters with their joint probability: a byte-level token can end mid-character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.p = tokenizer, [], 1.0

    def add(self, token, p):
        """(text, probability) once the tokens so far make whole characters, else None."""
        self.ids.append(token)
        self.p *= p
        text = self.tokenizer.decode(self.ids)
        return None if text.endswith("\ufffd") else self.take(text)

    def flush(self):
        """What is left at the end, whole characters or not (None if nothing)."""
        return self.take(self.tokenizer.decode(self.ids)) if self.ids else None

    def take(self, text):
        piece, self.ids, self.p = (text, self.p), [], 1.0
        return piece


def summary(steps):
    """A sample's mean and total log-probability (nats), perplexity exp(-mean) and mean entropy."""
    total = sum(math.log(s.p) for s in steps)
    mean_logp, mean_h = total / len(steps), sum(s.entropy for s in steps) / len(steps)
    return (f"{len(steps)} tokens: mean log-probability {mean_logp:.3f} nats | perplexity {math.exp(-mean_logp):.3f} "
            f"| mean entropy {mean_h:.3f} bits | total log-probability {total:.3f} nats")


class Annotator:
    """Every sample's Steps as drawn (begin, add, end): the first written live, any one later by report."""

    def __init__(self, tokenizer, top=0, colour=False):
        self.tokenizer, self.top, self.colour = tokenizer, top, colour
        self.rows_mode = top > 0 or not colour  # alternatives need a row per token; colours need a terminal

    def begin(self, prompt_ids, n_samples, stop=None, live=False):
        """A new batch of n_samples continuations of prompt_ids, each ending at stop (None: at max_new_tokens)."""
        self.samples, self.prompt, self.stop, self.live = [[] for _ in range(n_samples)], prompt_ids, stop, live
        self.pieces = WholeCharacters(self.tokenizer)
        if self.colour:
            self.write("probability of each new token: " + "  ".join(paint(w, low) for low, _, w in BANDS) + "\n")
        if live and not self.rows_mode:
            self.write(self.tokenizer.decode(prompt_ids))

    def add(self, token, probs):
        """Note one step of every sample: token (B, 1) drawn from probs (B, V)."""
        p = probs.gather(1, token)[:, 0].tolist()  # (B,)
        entropy = entropy_bits(probs).tolist()  # (B,)
        top = probs.topk(min(self.top, probs.size(-1)), dim=-1) if self.top else None
        for b, steps in enumerate(self.samples):
            if steps and steps[-1].token == self.stop:
                continue  # this sample has ended; the batch goes on for the others
            alternatives = list(zip(top.indices[b].tolist(), top.values[b].tolist())) if top is not None else []
            steps.append(Step(token[b, 0].item(), p[b], entropy[b], alternatives))
            if self.live and b == 0:
                self.show(steps[-1])

    def show(self, step):
        if self.rows_mode:
            self.write(self.row(step) + "\n")
        elif step.token != self.stop and (piece := self.pieces.add(step.token, step.p)):
            self.write(paint(*piece))

    def end(self):
        if not self.live:
            return
        if self.rows_mode:
            self.write(self.text(0) + "\n")
        elif piece := self.pieces.flush():
            self.write(paint(*piece))
        self.write(("" if self.rows_mode else "\n") + summary(self.samples[0]) + "\n")

    def text(self, i):
        return self.tokenizer.decode(self.prompt + [s.token for s in self.samples[i] if s.token != self.stop])

    def report(self, i):
        steps = self.samples[i]
        if self.rows_mode:
            return self.text(i) + "\n" + "\n".join(self.row(s) for s in steps) + "\n" + summary(steps)
        pieces = WholeCharacters(self.tokenizer)
        found = [pieces.add(s.token, s.p) for s in steps if s.token != self.stop] + [pieces.flush()]
        return self.tokenizer.decode(self.prompt) + "".join(paint(*p) for p in found if p) + "\n" + summary(steps)

    def row(self, step):
        """token  p=0.731  H=1.20 bits  top: 'e' 0.73, 'a' 0.10"""
        label = token_label(self.tokenizer, step.token)
        columns = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in label)  # CJK, most emoji: two
        shown = paint(label, step.p) if self.colour else label
        line = f"{shown}{' ' * max(0, LABEL_WIDTH - columns)} p={step.p:.3f}  H={step.entropy:.2f} bits"
        if step.top:
            line += "  top: " + ", ".join(f"{token_label(self.tokenizer, t)} {p:.3f}" for t, p in step.top)
        return line

    def write(self, text):
        print(text, end="", flush=True)
