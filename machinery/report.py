"""Prints what a run reports, and keeps its history.

A run prints its opening lines, a progress line every log_interval steps, a line for each
evaluation, and its closing lines with a sample. Each progress line and evaluation line is also a
row of the history (history.csv, loss.png). Lines are flushed as they come, and only rank 0 prints
and writes."""

import math
import time
from statistics import fmean

import torch

from config import SamplerConfig
from machinery import cli, devices, sources
from utils import bits_per_char


class Report:
    def __init__(self, settings, process, corpus, stage, say):
        self.settings = settings
        self.cfg = settings.cfg
        self.process = process
        self.corpus = corpus
        self.stage = stage
        self.say = say  # prints a line; Signals.say stops the run if the reader has gone
        self.line_step = 0  # the pace of the next progress line counts from here
        self.line_seconds = 0.0

    def opening(self, state, schedule):
        """Prints the opening lines: device and precision, model, batch, loss, and how it ends.

        `schedule` says in words what the learning rate does."""
        cfg = self.cfg
        model = self.stage.model
        m = model.config
        why = f": {self.process.why}" if cfg.dtype == "auto" else ""
        threads = f"{torch.get_num_threads()} threads"
        device = f"{devices.name(self.process.device)} ({self.process.dtype}{why}, {threads})"
        device += f" x {self.process.world} processes" if self.process.world > 1 else ""
        self.say(f"device {device} | preset {self.settings.preset} | data {cfg.data}")
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        part = f" ({trained:,} trained: {100 * trained / model.num_params():.2f}%)"
        shape = f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}"
        shown = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # the rest are variants
        parts = ", ".join(f"{k} {v}" for k, v in vars(m).items() if k not in shown)
        params = f"{model.num_params():,} parameters{part if trained < model.num_params() else ''}"
        model_line = f"model {params}: {shape}, vocab {m.vocab_size} | {parts}"
        self.say(f"{model_line} | optimizer {cfg.optimizer}")
        micro = self.process.world * cfg.grad_accum_steps
        split = f" ({self.process.world} processes x {cfg.grad_accum_steps} micro-batches)"
        if self.stage.batch:  # the stage makes batches of its own
            self.say(f"batch {cfg.batch_size} {self.stage.batch}{split if micro > 1 else ''}")
        else:
            tokens = f"train {len(self.corpus.train):,} tokens, val {len(self.corpus.val):,} tokens"
            batch = f"batch {cfg.batch_size} x block {m.block_size}{split if micro > 1 else ''}"
            self.say(f"tokens per step {cfg.batch_size * m.block_size:,} = {batch} | {tokens}")
        self.say(f"loss: {self.stage.loss} | evaluation: {self.stage.evaluation}")
        if cfg.time_budget:
            self.say(f"time budget {cfg.time_budget}: the {schedule} ends as the time does")
        elif state.step:  # a resumed run: say where it is in the schedule of its --max_steps
            where = f"{schedule} to step {state.max_steps}, the last step's LR {state.lr:.3g}"
            self.say(f"from step {state.step}: {where}")
        self.line_step = state.step
        self.line_seconds = time.perf_counter()

    def progress(self, state, aside):
        """Prints a progress line, adds its history row, and returns the means of the figures.

        The line shows the mean of each figure since the last line, the time per step, tokens per
        second and the ETA. The saved rows of a resumed run may lack a figure added since. `aside`
        is the seconds this process spent on evaluations, which are no part of a step's time."""
        now = time.perf_counter() - aside
        seconds = (now - self.line_seconds) / (state.step - self.line_step)
        rows = state.read_window(self.process.scaler.is_enabled())
        tokens = sum(row.pop("tokens", 0.0) for row in rows) * self.process.world
        figures = {name: fmean(row[name] for row in rows if name in row) for name in rows[-1]}
        tokens_per_s = tokens / len(rows) / seconds if seconds else 0.0
        eta = cli.format_seconds((state.max_steps - state.step) * seconds)
        shown = " | ".join(f"{name} {value:.4g}" for name, value in figures.items())
        pace = f"{1000 * seconds:.1f} ms/step | {tokens_per_s:,.0f} tok/s | ETA {eta}"
        self.say(f"step {state.step:>6}/{state.max_steps} | {shown} | {pace}")
        row = {"kind": "train", "step": state.step, **figures, "ms_per_step": 1000 * seconds}
        elapsed = state.elapsed(self.settings.started)
        state.history.append(row | {"tok_per_s": tokens_per_s, "seconds": elapsed})
        state.window = []
        self.line_step = state.step
        self.line_seconds = now
        return figures

    def evaluation(self, state, train_loss, val_loss, improved):
        """Prints the line of an evaluation and adds its history row.

        The line shows the mean losses over every rank, the figures of the stage, and whether val
        is the lowest yet."""
        own = self.stage.figures() if self.stage.figures else {}
        row = dict(kind="eval", step=state.step, train_loss=train_loss, val_loss=val_loss, **own)
        state.history.append(row | dict(lr=state.lr, seconds=state.elapsed(self.settings.started)))
        baseline = state.step == 0  # before any step: nothing to keep yet
        end = "?" if baseline and self.cfg.time_budget else state.max_steps  # no pace yet
        line = f"eval {state.step:>6}/{end} | train {train_loss:.4f} | val {val_loss:.4f}"
        if own:
            line += "".join(f" | {k} {v:.4g}" for k, v in own.items())
        else:  # a language model: bits per character, and the loss of a uniform guess
            line += f" ({bits_per_char(val_loss, self.corpus.chars_per_token):.3f} bits/char)"
            if baseline:
                uniform = math.log(self.stage.model.config.vocab_size)
                line += f" | uniform baseline ln(V) = {uniform:.4f}"
        self.say(line + (" | new best" if improved else ""))

    def history(self, state, writes):
        """Writes history.csv again, and loss.png unless --plots false.

        Only rank 0 writes, and only once the run has taken a step."""
        if writes and self.process.rank == 0 and state.step:
            from machinery.plots import write_history  # imported once there is a step to draw

            vocab_size = self.stage.model.config.vocab_size
            write_history(self.cfg.out_dir, state.history, self.cfg.plots, vocab_size)

    def stopped(self, state, writes):
        """Prints where last.pt is and the command that resumes the run, after a signal."""
        if writes:
            last = f"{self.cfg.out_dir}/last.pt"
            resume = cli.resume_command(self.settings.stage, self.cfg.out_dir)
            self.say(f"saved {last} at step {state.step}. Resume with: {resume}")

    def closing(self, state, stop_reason, schedule_end, writes):
        """Prints the closing lines of the run.

        They say why the run stopped early, if it did, and list its files. Under a time budget they
        say how the time was used and show the last LR beside the end of the schedule. Last comes
        a sample, drawn as generate.py draws it."""
        cfg = self.cfg
        if stop_reason:
            self.say(stop_reason)
        files = "best.pt, last.pt, history.csv" + (", loss.png" if cfg.plots else "")
        files = f" | {cfg.out_dir}/: {files}" if writes else ""
        elapsed = cli.format_seconds(state.elapsed(self.settings.started))
        done = f"done: {state.step} steps | best val loss {state.best_val_loss:.4f}"
        self.say(f"{done} | total time {elapsed}{files}")
        if cfg.time_budget:
            last_lr = f"the last at LR {state.lr:.4g} (the schedule's end: {schedule_end:.4g})"
            self.say(
                f"time budget {cfg.time_budget}: {elapsed} used, {state.step:,} steps, {last_lr}"
            )
        if cfg.sample_tokens and self.process.rank == 0:
            self.say("sample:\n" + self.sample(cfg.sample_tokens))

    def sample(self, tokens):
        """Returns a sample drawn as generate.py draws it, with the seed of the run, in float32.

        A chat model answers the first question of the validation split, in the chat template."""
        from sampling import sample_text  # the next chapter of the lesson, used at the run's end

        tokenizer = self.corpus.tokenizer
        model = self.stage.model
        question = sources.first_question(self.corpus.val[: 4 * model.config.block_size], tokenizer)
        ids = question or sources.start_ids(tokenizer)
        stop = tokenizer.eot_id if question else None
        new = sample_text(model, ids, tokens, SamplerConfig(), stop, self.cfg.seed)
        return tokenizer.decode(ids + new)
