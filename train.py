"""Pretrain a GPT on a text file. This file is the lesson; read it from top to bottom.

    python train.py     # data/input.txt with this machine's preset: five minutes on a CPU
    python train.py --preset small --max_steps 50 --seed 1
    python train.py --data data/qa_example.json --tag qa   # questions and answers, from scratch
    python train.py --data notes.txt --tag notes   # your own text

In order: the corpus, the GPT and its batches; AdamW and its parameter groups; the warmup-cosine
schedule; one step; and fit, the loop every stage runs (finetune.py, distill.py, dpo.py hand it a
Stage). The loop decides when the run ends, evaluates, saves and stops. Each promise it keeps is an
object in machinery/, named for it: the state and its checkpoints (exact --resume), the time
budget, the signals (Ctrl-C), and the report (the progress lines and the history)."""

import os
import time

# Set before torch loads. A time budget counts from here. OpenMP's idle threads sleep after 10,000
# spins: the long default spin made a step 2-9x slower beside a busy process on 2 cores.
STARTED = time.perf_counter()
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import contextlib
import math
import sys
from dataclasses import dataclass, field, replace

import torch

from machinery import checkpoint, cli, devices, plots, sources
from machinery.budget import Budget
from machinery.report import Report
from machinery.settings import read_settings
from machinery.signals import Signals
from machinery.state import Checkpoints, start_state
from model import GPT
from utils import make_batches

# ----------------------------------------------------------------- the corpus, the GPT, batches


def train(settings):
    """Pretrains a GPT from scratch, or continues its run with --resume.

    It reads the corpus, builds the model and its batches, then fits the model. main, at the
    bottom, passes the settings. Under torchrun, every rank runs this function."""
    process = devices.start_process(settings)  # the rank under torchrun, threads, seed
    corpus = load_corpus(settings)
    model = make_model(settings, corpus)
    batches = corpus_batches(settings, corpus, model, process)
    return fit(settings, process, corpus, Stage(model, batches))


def load_corpus(settings):
    """Returns the text as train and val token ids. The tokenizer is learned from the text, or on
    a resume it is the saved one."""
    tokenizer = checkpoint.tokenizer_of(settings.saved, settings.path) if settings.resumed else None
    return sources.read_corpus(settings.cfg, tokenizer, settings.model_cfg.vocab_size)


def make_model(settings, corpus):
    """Returns a GPT with fresh random weights and the vocabulary of the tokenizer. On a resume it
    returns the saved model as it was."""
    if settings.resumed:
        return checkpoint.model_of(settings.saved, settings.path)
    return GPT(replace(settings.model_cfg, vocab_size=corpus.tokenizer.vocab_size))


def corpus_batches(settings, corpus, model, process):
    """Returns {"train": ..., "val": ...}. Each value is a function that returns a batch (x, y) of
    random windows of the corpus."""
    cfg = settings.cfg
    block_size = model.config.block_size
    for ids, name in ((corpus.train, "train"), (corpus.val, "validation")):
        sources.check_long_enough(ids, block_size, name, cfg.data)
    size = micro_batch_size(cfg, process)
    return make_batches(corpus, block_size, size, cfg.data_fraction, process.device)


def micro_batch_size(cfg, process):
    """Returns the sequences in one micro-batch of this process: batch_size split over the ranks
    and the micro-steps."""
    return cfg.batch_size // process.world // cfg.grad_accum_steps


# ------------------------------------------------------------------ the optimizer, the schedule


def param_groups(model, cfg):
    """Splits the trained parameters into groups, each with its own settings.

    Matrices (embeddings and linear weights) get weight decay; biases and norm gains do not. Under
    Muon, the matrices of the blocks form a group of their own. The lr_scale of a group multiplies
    the learning rate of the schedule (see train_step). The names in a group let a resume find the
    group again."""
    muon = dict(lr_scale=cfg.muon_lr / cfg.lr, weight_decay=0.0, muon=True)
    decayed = dict(weight_decay=cfg.weight_decay)
    not_decayed = dict(weight_decay=0.0)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and p.dim() == 2 and name.startswith("blocks."):
            group = muon
        else:
            group = decayed if p.dim() >= 2 else not_decayed
        group.setdefault("names", []).append(name)
        group.setdefault("params", []).append(p)
    return [group for group in (muon, decayed, not_decayed) if "params" in group]


def make_optimizer(model, cfg, device, dtype="float32"):
    """Returns AdamW over the parameter groups of the model, or Muon for --optimizer muon
    (muon.py). Muon orthogonalizes in the dtype of the run, so bfloat16 halves its cost."""
    groups = param_groups(model, cfg)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        from muon import Muon

        ns_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        return Muon(groups, lr=cfg.lr, betas=betas, dtype=ns_dtype)
    # fused runs one kernel per tensor, which is faster on CPUs too. Not on a Mac: there the fused
    # kernel mishandles the skipped steps of float16 in torch 2.5-2.7 (docs/platforms.md)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=device.type in ("cuda", "cpu"))


def warmup(max_steps, cfg):
    """Returns the number of warmup steps in a run of max_steps.

    During the warmup, the LR climbs to cfg.lr; after it, the LR decays. A time budget never plans
    the end of a run inside the warmup. A schedule shape without a warmup would return 0."""
    return cfg.warmup_steps


def get_lr(step, max_steps, cfg):
    """Returns the learning rate at a step.

    During the warmup, the LR climbs linearly to cfg.lr. Then a decay factor falls from 1 to 0 at
    step max_steps, taking the LR from lr down to min_lr. As in nanoGPT, the run's last step,
    max_steps - 1, is one step short of the decay's end."""
    warm = warmup(max_steps, cfg)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, max_steps - warm))
    if cfg.lr_schedule == "linear":  # each shape decays from 1 at the peak to 0 at the end
        decay = 1.0 - progress
    elif cfg.lr_schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"get_lr has no formula for lr_schedule {cfg.lr_schedule!r}")
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * decay


# ---------------------------------------------------------------------- one step, an evaluation


def train_step(model, optimizer, next_batch, lr, cfg, process):
    """Takes one optimizer step and returns its figures as a dict.

    A new entry of the dict reaches the progress lines and history.csv. The figures stay tensors:
    reading one makes a GPU wait. model is a Stage's wrapper, wrapper(x, y) -> (logits, loss),
    maybe under DDP or torch.compile. process gives the precision and float16's loss scaler."""
    scaler = process.scaler
    for group in optimizer.param_groups:  # 1. set the LR, times the group's lr_scale
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)  # 2. clear the gradients of the last step
    batch_loss = 0.0
    tokens = 0
    for micro_step in range(cfg.grad_accum_steps):  # a batch may be split into micro-batches
        x, y = next_batch()  # 3. get a batch; y is x shifted by one token
        # DDP averages the gradients once per step, at the last micro-batch
        last = micro_step == cfg.grad_accum_steps - 1 or process.world == 1
        with contextlib.nullcontext() if last else model.no_sync():
            with process.autocast:
                logits, loss = model(x, y)  # 4. forward pass (B, T, V), 5. loss
            loss = loss / cfg.grad_accum_steps  # the gradients of the micro-batches add up
            scaler.scale(loss).backward()  # 6. backward (scaled under float16, against underflow)
        batch_loss = batch_loss + loss.detach()
        tokens += x.numel()
    scaler.unscale_(optimizer)  # undo float16's scaling, to clip the true gradient
    # 7. clip the gradient norm (with grad_clip 0, only measure it)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    scaler.step(optimizer)  # 8. update the weights (float16 skips the update if it overflowed)
    scaler.update()
    return {"loss": batch_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, autocast):
    """Returns the mean loss over eval_iters random batches of each split, in eval mode (no
    dropout)."""
    model.eval()
    out = {}
    for split, next_batch in batches.items():
        total = 0.0
        for _ in range(eval_iters):
            x, y = next_batch()
            with autocast:
                total = total + model(x, y)[1]
        out[split] = total.item() / eval_iters  # .item() waits for the device once per split
    model.train()
    return out


# ------------------------------------------------------------------- the run: its set-up and loop

OUT_OF_MEMORY = "out of memory: try a smaller --batch_size or model, or --grad_accum_steps 2"


@dataclass
class Stage:
    """What a stage of training hands to fit: the GPT it trains and saves, its batches, and the
    module that a step calls.

    In pretraining, a step calls the GPT itself; a later stage wraps it with a frozen partner
    (distill.Distilled, dpo.Preferring). wrapper(x, y) returns the GPT's logits (B, T, V) and the
    loss. y holds each next token, or NO_TARGET (-100) where a position has none (a question)."""

    model: torch.nn.Module  # the GPT
    batches: dict  # {"train": ..., "val": ...}, each returns a batch (x, y)
    wrapper: torch.nn.Module = None  # what a step calls; None means the GPT itself
    loss: str = "cross-entropy of each next token"  # the loss, as the opening lines describe it
    evaluation: str = "the mean loss of each split, in eval mode"
    figures: object = None  # a function () -> {name: number} of extra figures, e.g. bits/char
    batch: str = ""  # what a batch holds, if not windows of the corpus
    entries: dict = field(default_factory=dict)  # extra entries for the checkpoints: {name: value}

    def __post_init__(self):
        if self.wrapper is None:
            self.wrapper = self.model


class WithPartner(torch.nn.Module):
    """The wrapper of a later stage: the GPT (model) and, beside it, a frozen partner (partner),
    such as the teacher in distillation or the reference model in DPO.

    The partner takes no gradient and stays in eval mode (no dropout) from the start. That way, a
    resumed run draws the same random numbers as a run that never stopped."""

    def __init__(self, model, partner):
        super().__init__()
        self.model = model
        self.partner = partner.requires_grad_(False).eval()

    def train(self, mode=True):  # the model trains; the partner stays in eval mode
        super().train(mode)
        self.partner.eval()
        return self


def fit(settings, process, corpus, stage):
    """Runs a stage of training; every stage calls it.

    The set-up makes every check before anything is written. Then the loop steps until the run
    ends, evaluates and saves now and then, and may stop early. At the end, fit saves last.pt and
    prints the closing lines; after a signal, it prints the command that resumes the run."""
    cfg = settings.cfg
    options = settings.options
    with devices.out_of_memory_as_error(OUT_OF_MEMORY):  # one error line that says what to try
        stage.wrapper.to(process.device)  # the GPT, and any frozen partner beside it
        optimizer = make_optimizer(stage.model, cfg, process.device, process.dtype)
        state = start_state(settings, optimizer, process)  # fresh, or the one a resume saved
        batches = train_batches(stage, options.overfit_batch)  # one fixed batch for the check
        step_model = make_step_model(stage, cfg, process, batches["train"])  # compiled, DDP
        checkpoints = Checkpoints(settings, process, corpus, stage, optimizer)
        if options.overwrite and checkpoints.writes and not settings.resumed and not process.rank:
            checkpoint.clear_out_dir(cfg.out_dir)  # delete the old run now that input is checked
        if not cfg.time_budget and cfg.max_steps <= warmup(cfg.max_steps, cfg) and not process.rank:
            cli.warn(f"--max_steps {cfg.max_steps} ends within the warmup: the LR never decays")
        signals = Signals(process, cfg.log_interval)
        budget = Budget(settings, process, state)
        report = Report(settings, process, corpus, stage, signals.say)
        report.opening(state, f"{cfg.lr_schedule} schedule")
        stop_reason = None  # set by --patience, --target_loss or --overfit_batch

        with signals:  # on Ctrl-C or SIGTERM, the step finishes, then the run saves and exits
            while True:
                # under a time budget, plan at every step how many steps fit in the time left
                warm = warmup(state.max_steps, cfg)
                state.max_steps = budget.plan(state, warm)
                if budget.spent_in_warmup(state, warm):  # the LR never decayed; the run cannot end
                    saved = state.step > 0 and checkpoints.writes
                    if saved:
                        checkpoints.save("last.pt", state)  # so that the user keeps the steps taken
                    raise budget.too_short(state, warm, saved)
                at_end = state.step >= state.max_steps
                periodic = state.step % cfg.eval_interval == 0 and budget.room_to_evaluate(state)
                if (at_end or periodic) and state.step != state.last_eval_step:  # once per step
                    with budget.set_aside(state):  # timed, so time is kept for the last evaluation
                        train_loss, val_loss = evaluate(step_model, batches, cfg, process)
                        improved = state.evaluated(val_loss)  # counts toward --patience
                        report.evaluation(state, train_loss, val_loss, improved)
                        if state.step:  # the baseline, before any step, saves nothing
                            checkpoints.save("last.pt", state)
                            if improved:
                                checkpoints.save("best.pt", state)
                            stop_reason = stop_reason or early_stop(state, val_loss, cfg)
                        report.history(state, checkpoints.writes)
                    if not at_end:
                        continue  # the evaluation took time, so plan again
                ending = at_end or stop_reason is not None
                # stop on Ctrl-C or SIGTERM on any rank, or at the end
                if signals.stop(state, ending) or ending:
                    break
                state.lr = get_lr(state.step, state.max_steps, cfg)
                figures = train_step(
                    step_model, optimizer, batches["train"], state.lr, cfg, process
                )
                state.window.append(figures)
                state.step += 1
                if state.step % cfg.log_interval == 0:
                    means = report.progress(state, budget.aside)  # means since the last line
                    if options.overfit_batch and process.mean([means["loss"]])[0] < 0.01:
                        stop_reason = f"overfit_batch: loss below 0.01 at step {state.step}"
                if cfg.save_interval and state.step % cfg.save_interval == 0:
                    checkpoints.save(f"ckpt_{state.step:07d}.pt", state)  # keep_last of these stay

        if signals.signum or state.last_eval_step != state.step:  # unless an evaluation saved it
            checkpoints.save("last.pt", state)
        if signals.signum:  # stopped: print how to resume; exit status is 128 + the signal
            report.stopped(state, checkpoints.writes)
            process.leave_together()
            sys.exit(128 + signals.signum)
        schedule_end = get_lr(state.max_steps, state.max_steps, cfg)
        report.closing(state, stop_reason, schedule_end, checkpoints.writes)  # ends with a sample
        process.leave_together()
        return summary(settings, process, corpus, stage, state, stop_reason)


def train_batches(stage, overfit_batch):
    """Returns the batches of the stage. With --overfit_batch, a check, every training batch is
    the same one: the loss should fall to 0, and nothing is written."""
    batches = dict(stage.batches)
    if overfit_batch:
        fixed = batches["train"]()
        batches["train"] = lambda: fixed
        cli.log("overfit_batch: one fixed batch, writing nothing; the loss should fall to 0")
    return batches


def make_step_model(stage, cfg, process, next_batch):
    """Returns what a step calls: the stage's wrapper, compiled with --compile and wrapped in DDP
    under torchrun (DDP averages the gradients). A compiled model takes its first step now, so a
    missing compiler is one error line before anything is written."""
    step_model = torch.compile(stage.wrapper) if cfg.compile else stage.wrapper
    step_model = process.wrap(step_model)
    if cfg.compile:
        devices.compile_first(stage.model, step_model, next_batch, process)
    return step_model


def summary(settings, process, corpus, stage, state, stop_reason):
    """Returns the results of a run to the script, the tools and the tests."""
    cfg = settings.cfg
    return {
        "step": state.step,
        "best_val_loss": state.best_val_loss,
        "history": state.history,
        "stop_reason": stop_reason,
        "seconds": state.elapsed(settings.started),
        "model": stage.model,
        "corpus": corpus,
        "dtype": process.dtype,
        "tokens_per_step": cfg.batch_size * stage.model.config.block_size,  # for tools.scaling
    }


def evaluate(model, batches, cfg, process):
    """Returns (train loss, val loss). Each rank evaluates its share of eval_iters batches, and
    each loss is the mean over all ranks."""
    eval_iters = math.ceil(cfg.eval_iters / process.world)  # this rank's share
    losses = estimate_loss(model, batches, eval_iters, process.autocast)
    return process.mean([losses["train"], losses["val"]])


def early_stop(state, val_loss, cfg):
    """Returns why the run stops early, or None. A run stops after --patience evaluations without
    a new best, or when the val loss reaches --target_loss."""
    if cfg.target_loss and val_loss <= cfg.target_loss:
        return f"target reached: val loss {val_loss:.4f} <= {cfg.target_loss:g} at {state.step}"
    if cfg.patience and state.evals_without_improvement >= cfg.patience:
        evals = f"{cfg.patience} evaluations (best {state.best_val_loss:.4f})"
        return f"early stop: val loss has not improved for {evals}"
    return None


# ------------------------------------------------------------------------------- the command line


def main(argv=None):
    """Runs the command line of train.py. It reads and checks the settings once, then trains, or
    draws the LR schedule for --plot_lr."""
    settings = read_settings(argv, "train", __doc__, STARTED)
    if settings.options.plot_lr:
        return plots.draw_lr_schedule(settings.cfg, get_lr)
    train(settings)


if __name__ == "__main__":
    cli.run_cli(main)  # bad input prints one "error:" line, exit status 2
