"""What a run reports around train.py's loop: its progress and evaluation lines (a step's figures are one dict, so
a new figure is one more entry), the history files (their pictures: plots.py), the closing sample; and --eval_only's
loss of a checkpoint on every position of its val split."""

import contextlib
import csv
import json
import math
import os

import numpy as np
import torch

from config import Sampler, TinyLLMError
import sampling
from deep_dives import graphs
from model import lm_loss
from utils import bits_per_char

from machinery import budget
from machinery.checkpoint import load_model
from machinery.cli import format_seconds, log
from machinery.device import choose_device, describe, flops_per_token, out_of_memory_as_error, peak_flops, set_threads
from machinery.plots import plot_history
from machinery.sources import start_ids, validation_split


class Meter:
    """This process's step time, and the steps' figures kept on the device until read (a read waits)."""

    def __init__(self, cfg, scaled, writes_files):  # scaled: float16's scaler skips an overflowing step (its norm inf)
        self.cfg, self.scaled, self.writes_files, self.pending, self.steps = cfg, scaled, writes_files, [], 0
        self.seconds, self.mark = 0.0, budget.now()

    def add(self, step, figures):
        self.pending.append((step, figures))  # step: the count after it (its loss is step - 1's)

    def read(self):
        """The figures of the steps since the last read, as floats, in one device read; raises on a non-finite one."""
        if not self.pending:
            return []
        tensors = [v.detach().float().reshape(()) for _, f in self.pending for v in f.values() if torch.is_tensor(v)]
        values = iter(torch.stack(tensors).tolist() if tensors else [])  # one wait for the device
        self.seconds += budget.now() - self.mark  # the device has finished these steps only now
        self.steps += len(self.pending)
        read = []
        for step, f in self.pending:
            figures = {k: next(values) if torch.is_tensor(v) else float(v) for k, v in f.items()}
            if not math.isfinite(figures.get("loss", 0.0)) or (
                    not self.scaled and not math.isfinite(figures.get("grad_norm", 0.0))):
                last = os.path.join(self.cfg.out_dir, "last.pt")
                raise TinyLLMError(  # (step: the count after it)
                    f"step {step - 1}: non-finite values (loss {figures.get('loss')}, grad norm "
                    f"{figures.get('grad_norm')}); the run stops here. Likely causes: learning rate too high (--lr "
                    f"{self.cfg.lr:g}), clipping off (--grad_clip {self.cfg.grad_clip:g}), float16 overflow (--dtype "
                    f"bfloat16 or float32). Nothing non-finite was saved; last good checkpoint: "
                    f"{last if self.writes_files and os.path.isfile(last) else 'none'}")
            read.append(figures)
        self.pending, self.mark = [], budget.now()
        return read

    @contextlib.contextmanager
    def paused(self):
        """Time inside (an evaluation, a save) is not step time; its seconds are kept in self.last_pause."""
        if self.pending:  # the steps' time ends when the device has done them: read them first
            raise RuntimeError("Meter.paused(): read the figures first")
        start = budget.now()
        try:
            yield
        finally:
            self.mark = budget.now()
            self.last_pause = self.mark - start

    def ms_per_step(self):
        """Milliseconds a step since the last call (steps read so far); starts counting again."""
        ms = 1000 * self.seconds / max(1, self.steps)
        self.seconds, self.steps = 0.0, 0
        return ms


def average(window):
    """Each figure's mean over the window's rows (a list of dicts), over its finite values (None where none is)."""
    finite = {k: [row[k] for row in window if row.get(k) is not None and math.isfinite(row[k])]
              for k in dict.fromkeys(k for row in window for k in row)}
    return {k: sum(v) / len(v) if v else None for k, v in finite.items()}


# ----------------------------------------------------------------------------- the lines a run prints, its history

def progress_line(step, end_step, figures, ms, tokens_per_s, mfu, formats):
    eta = "?" if end_step is None else format_seconds((end_step - step) * ms / 1000)
    shown = " | ".join(f"{k} {'-' if v is None else format(v, formats.get(k, '.4g'))}" for k, v in figures.items())
    line = f"step {step:>6}/{end_step or '?'} | {shown} | {ms:.1f} ms/step | {tokens_per_s:,.0f} tok/s | ETA {eta}"
    return line + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")


def speed(ms, batch_size, model, device, dtype, world):
    """(tokens per second, MFU: the share of the chips' peak FLOP/s used, None if unknown) at ms per step."""
    tokens_per_s = batch_size * model.config.block_size / ms * 1000 if ms else 0.0
    peak = peak_flops(device, dtype)
    return tokens_per_s, flops_per_token(model) * tokens_per_s / (peak * world) if peak else None


def evaluation_line(step, end_step, train_loss, val_loss, chars_per_token, vocab_size, improved):
    bits = bits_per_char(val_loss, chars_per_token)
    line = f"eval {step:>6}/{end_step or '?'} | train {train_loss:.4f} | val {val_loss:.4f} ({bits:.3f} bits/char)"
    baseline = f" | uniform baseline ln(V) = {math.log(vocab_size):.4f}" if step == 0 else ""
    return line + baseline + (" | new best" if improved else "")


def write_history(cfg, state, vocab_size):
    history, out_dir = state.history, cfg.out_dir
    fields = list(dict.fromkeys(k for row in history for k in row))
    with open(os.path.join(out_dir, "history.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    with open(os.path.join(out_dir, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
    if cfg.plots:
        plot_history(history, out_dir, vocab_size, cfg, state)


# ----------------------------------------------------------------------------- the end of a run

def done_line(step, best_val_loss, seconds, out_dir, plots):
    files = f" | {out_dir}/: best.pt, last.pt, history.csv" + (", loss.png" if plots else "") if out_dir else ""
    return f"done: {step} steps | best val loss {best_val_loss:.4f} | total time {format_seconds(seconds)}" + files


def closing_sample(model, tokenizer, tokens, seed):
    """The closing sample as generate.py draws it, in float32: bfloat16 is no faster."""
    model.eval()
    device = next(model.parameters()).device
    start = torch.tensor([start_ids(tokenizer)], device=device)
    with out_of_memory_as_error(f"out of memory on {describe(device)} while sampling: try --sample_tokens 0"):
        out = sampling.generate(model, start, tokens, Sampler(), replay=graphs.replayable,
                                generator=torch.Generator(device).manual_seed(seed))
    model.train()
    return tokenizer.decode(out[0].tolist())


def sample_seconds(model, tokenizer, tokens, seed):
    """Seconds a closing sample of tokens will take, from 16 timed tokens (0 for none), for a time budget to keep."""
    if not tokens:
        return 0.0
    closing_sample(model, tokenizer, 2, seed)  # once untimed
    t0 = budget.now()
    closing_sample(model, tokenizer, 16, seed)  # (decoded: a GPU has finished these tokens)
    return (budget.now() - t0) / 16 * tokens * 1.2  # longer contexts cost a little more per token


# ----------------------------------------------------------------------------- --eval_only: the whole val split

def evaluate_checkpoint(path, data, device_name, batch_size, threads=0):
    """Loss, perplexity and bits per character on every position of the checkpoint's val split (or data's)."""
    device = choose_device(device_name)
    set_threads(threads)
    model, tokenizer, checkpoint = load_model(path, device)
    corpus, data = validation_split(checkpoint, tokenizer, data)
    val_ids = torch.as_tensor(np.asarray(corpus.val, dtype=np.int64))
    loss = token_losses(model, val_ids, batch_size).mean().item()
    bpc = bits_per_char(loss, corpus.chars_per_token)
    log(f"{path} on the val split of {data} ({len(val_ids):,} tokens, every position once):")
    log(f"loss {loss:.4f} nats/token | perplexity {math.exp(loss):.3f} | {bpc:.4f} bits per character")
    return {"loss": loss, "perplexity": math.exp(loss), "bpc": bpc}


@torch.no_grad()
def token_losses(model, ids, batch_size=1):
    """The loss (nats) of every token of ids (n,) but the first, (n - 1,), each once (estimate_loss samples windows)."""
    model.eval()
    T, device = model.config.block_size, model.wte.weight.device
    n = (len(ids) - 1) // T  # whole windows; a split shorter than one is all tail
    windows = ids[:n * T + 1].unfold(0, T + 1, T) if n else ids[:0].view(0, T + 1)  # (n, T + 1)
    chunks = [windows[i:i + batch_size] for i in range(0, n, batch_size)]
    tail = len(ids) - 1 - n * T
    chunks += [ids[-tail - 1:][None]] if tail > 0 else []
    losses = []
    for rows in chunks:  # (b, t + 1): t inputs, each with its next token
        logits, _ = model(rows[:, :-1].to(device))  # (b, t, V)
        losses.append(lm_loss(logits, rows[:, 1:].to(device), reduction="none").cpu())  # (b * t,)
    return torch.cat(losses)
