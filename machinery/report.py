"""What a run prints and keeps of itself: its opening lines; a progress line every log_interval
steps and an evaluation's line, each a row of its history (history.csv, loss.png); and its closing
lines and sample. Lines are flushed as they come; rank 0 alone prints and writes."""

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
        self.say = say  # prints a line: Signals.say, where a reader gone stops the run
        self.line_step = 0  # a progress line's pace counts from here
        self.line_seconds = 0.0

    def opening(self, state, schedule):
        """The run's opening lines: device and precision, model, batch, loss, and how it ends.
        schedule: what the learning rate does, in words."""
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
        shown = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # the rest: variants
        parts = ", ".join(f"{k} {v}" for k, v in vars(m).items() if k not in shown)
        params = f"{model.num_params():,} parameters{part if trained < model.num_params() else ''}"
        model_line = f"model {params}: {shape}, vocab {m.vocab_size} | {parts}"
        self.say(f"{model_line} | optimizer {cfg.optimizer}")
        micro = self.process.world * cfg.grad_accum_steps
        split = f" ({self.process.world} processes x {cfg.grad_accum_steps} micro-batches)"
        if self.stage.batch:  # a stage's own batches
            self.say(f"batch {cfg.batch_size} {self.stage.batch}{split if micro > 1 else ''}")
        else:
            tokens = f"train {len(self.corpus.train):,} tokens, val {len(self.corpus.val):,} tokens"
            batch = f"batch {cfg.batch_size} x block {m.block_size}{split if micro > 1 else ''}"
            self.say(f"tokens per step {cfg.batch_size * m.block_size:,} = {batch} | {tokens}")
        self.say(f"loss: {self.stage.loss} | evaluation: {self.stage.evaluation}")
        if cfg.time_budget:
            self.say(f"time budget {cfg.time_budget}: the {schedule} ends as the time does")
        elif state.step:  # a resumed run: where it is in the schedule of its --max_steps
            where = f"{schedule} to step {state.max_steps}, the last step's LR {state.lr:.3g}"
            self.say(f"from step {state.step}: {where}")
        self.line_step = state.step
        self.line_seconds = time.perf_counter()

    def progress(self, state, aside):
        """A progress line and its history row: each figure's mean since the last line (a resume's
        saved rows may lack a figure added since), the step's time, tokens a second, the ETA.
        aside: the seconds of this process's evaluations, no part of a step's. Returns the means."""
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
        """An evaluation's line and history row: every rank's mean losses, a stage's own figures,
        and whether val is the lowest yet."""
        own = self.stage.figures() if self.stage.figures else {}  # a stage's own figures
        row = dict(kind="eval", step=state.step, train_loss=train_loss, val_loss=val_loss, **own)
        state.history.append(row | dict(lr=state.lr, seconds=state.elapsed(self.settings.started)))
        baseline = state.step == 0  # before any step: nothing to keep yet
        end = "?" if baseline and self.cfg.time_budget else state.max_steps  # no pace yet
        line = f"eval {state.step:>6}/{end} | train {train_loss:.4f} | val {val_loss:.4f}"
        if own:
            line += "".join(f" | {k} {v:.4g}" for k, v in own.items())
        else:  # a language model's loss: bits per character, and a uniform guess's loss
            line += f" ({bits_per_char(val_loss, self.corpus.chars_per_token):.3f} bits/char)"
            if baseline:
                uniform = math.log(self.stage.model.config.vocab_size)
                line += f" | uniform baseline ln(V) = {uniform:.4f}"
        self.say(line + (" | new best" if improved else ""))

    def history(self, state, writes):
        """history.csv, and loss.png unless --plots false, drawn again (rank 0, once a step)."""
        if writes and self.process.rank == 0 and state.step:
            from machinery.plots import write_history  # read once there is a step to draw

            vocab_size = self.stage.model.config.vocab_size
            write_history(self.cfg.out_dir, state.history, self.cfg.plots, vocab_size)

    def stopped(self, state, writes):
        """A signal stopped the run: where last.pt is and the command that resumes it."""
        if writes:
            last = f"{self.cfg.out_dir}/last.pt"
            resume = cli.resume_command(self.settings.stage, self.cfg.out_dir)
            self.say(f"saved {last} at step {state.step}. Resume with: {resume}")

    def closing(self, state, stop_reason, schedule_end, writes):
        """The closing lines: why it stopped early, if it did; its files; the time budget's use and
        its last LR beside the schedule's end; a sample drawn as generate.py draws it."""
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
        """A sample drawn as generate.py draws it, with the run's seed, in float32. A chat model
        answers the validation split's first question, in the chat template."""
        from sampling import sample_text  # the lesson's next chapter, at the run's end

        tokenizer = self.corpus.tokenizer
        model = self.stage.model
        question = sources.first_question(self.corpus.val[: 4 * model.config.block_size], tokenizer)
        ids = question or sources.start_ids(tokenizer)
        stop = tokenizer.eot_id if question else None
        new = sample_text(model, ids, tokens, SamplerConfig(), stop, self.cfg.seed)
        return tokenizer.decode(ids + new)
