"""Pretrain a GPT on a text file: the lesson, top to bottom.

    python train.py     # data/input.txt: this machine's preset, five minutes on a CPU
    python train.py --preset small --max_steps 50 --seed 1
    python train.py --data data/qa_example.json --tag qa   # questions and answers, from scratch
    python train.py --data notes.txt --tag notes   # your own text

In order: the corpus, the GPT and its batches; the AdamW optimizer and its parameter groups; the
warmup-cosine schedule; one step (gradient accumulation, clipping); the run every stage runs
(fit): its set-up, then the loop, which says when the run ends, evaluates, saves and stops. Each
promise the loop keeps is an object of machinery/ named for it: the state and its checkpoints
(exact --resume), the time budget, the signals (Ctrl-C), the report (the lines and history).

A later stage (finetune.py, distill.py, dpo.py) uses this file through corpus_batches, Stage and
fit: it makes its own model and batches, then fits them. finetune.py starts from a trained model."""

import os
import time

# before torch loads: a time budget counts from here, and OpenMP's idle threads sleep after
# 10,000 spins (its long default spin made a step 2-9x slower beside a busy process on 2 cores)
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
    """Pretrain a GPT from scratch, or go on with its run (--resume). Read the corpus, build the
    model and its batches, then fit it. settings come from main, at the bottom. Under torchrun
    every rank runs this."""
    process = devices.start_process(settings)  # its rank under torchrun, its threads, the seed
    corpus = load_corpus(settings)
    model = make_model(settings, corpus)
    batches = corpus_batches(settings, corpus, model, process)
    return fit(settings, process, corpus, Stage(model, batches))


def load_corpus(settings):
    """The text as train and val token ids, by a tokenizer learned from it (a resume's own)."""
    tokenizer = checkpoint.tokenizer_of(settings.saved, settings.path) if settings.resumed else None
    return sources.read_corpus(settings.cfg, tokenizer, settings.model_cfg.vocab_size)


def make_model(settings, corpus):
    """A GPT with fresh random weights, its vocabulary the tokenizer's; a resume's as it was."""
    if settings.resumed:
        return checkpoint.model_of(settings.saved, settings.path)
    return GPT(replace(settings.model_cfg, vocab_size=corpus.tokenizer.vocab_size))


def corpus_batches(settings, corpus, model, process):
    """{"train": ..., "val": ...}, each () -> a batch (x, y) of random windows of the corpus."""
    cfg = settings.cfg
    block_size = model.config.block_size
    for ids, name in ((corpus.train, "train"), (corpus.val, "validation")):
        sources.check_long_enough(ids, block_size, name, cfg.data)
    size = micro_batch_size(cfg, process)
    return make_batches(corpus, block_size, size, cfg.data_fraction, process.device)


def micro_batch_size(cfg, process):
    """This process's share of a step's batch_size: each rank's, each micro-batch's."""
    return cfg.batch_size // process.world // cfg.grad_accum_steps


# ------------------------------------------------------------------ the optimizer, the schedule


def param_groups(model, cfg):
    """Split the trained parameters into groups with their own settings. Matrices (embeddings
    and linear weights) get weight decay; biases and norm gains do not. Under Muon the blocks'
    matrices form a group of their own. A group's lr_scale multiplies the schedule's learning
    rate (train_step). Its names let a resume find the group again."""
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
    """AdamW over the model's parameter groups, or Muon for --optimizer muon (muon.py). Muon
    orthogonalizes in the run's dtype: bfloat16 halves its cost."""
    groups = param_groups(model, cfg)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        from muon import Muon

        ns_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        return Muon(groups, lr=cfg.lr, betas=betas, dtype=ns_dtype)
    # fused: one kernel per tensor, faster on CPUs too; not on a Mac, whose fused kernel
    # mishandles float16's skipped steps in torch 2.5-2.7 (docs/platforms.md)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=device.type in ("cuda", "cpu"))


def warmup(max_steps, cfg):
    """The steps of the schedule's warmup, in a run of max_steps: its LR climbs to cfg.lr, and
    decays after. A time budget never plans an end within them. A shape without a warmup: 0."""
    return cfg.warmup_steps


def get_lr(step, max_steps, cfg):
    """The learning rate of a step: a linear warmup to cfg.lr; then the shape's decay, from 1 at
    the warmup's end to 0 at step max_steps, takes it from lr down to min_lr (0 on the five-minute
    presets). progress goes from 0 to 1 over the decay; the run's last step, max_steps - 1, is a
    step short of its end, as in nanoGPT."""
    warm = warmup(max_steps, cfg)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, max_steps - warm))
    if cfg.lr_schedule == "linear":  # each shape: a decay from 1 at the peak to 0 at the end
        decay = 1.0 - progress
    elif cfg.lr_schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"get_lr has no formula for lr_schedule {cfg.lr_schedule!r}")
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * decay


# ---------------------------------------------------------------------- one step, an evaluation


def train_step(model, optimizer, next_batch, lr, cfg, process):
    """One optimizer step; returns its figures. A new figure is an entry in that dict, one number
    a step: it reaches the progress lines and history.csv. Figures stay tensors: reading one makes
    a GPU wait, so the loop reads them at the next progress line. model is a Stage's
    wrapper(x, y) -> (logits, loss), maybe wrapped by DDP or torch.compile; its logits are the
    GPT's in every stage. tokens counts the tokens read (tok/s). process gives the precision
    (autocast) and float16's loss scaler."""
    scaler = process.scaler
    for group in optimizer.param_groups:  # 1. this step's learning rate, times a group's multiple
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)  # 2. forget the last step's gradients
    batch_loss = 0.0
    tokens = 0
    for micro_step in range(cfg.grad_accum_steps):  # a batch may come in micro-batches
        x, y = next_batch()  # 3. a batch: y is x shifted by one token
        # DDP averages the gradients once a step, at the last micro-batch
        last = micro_step == cfg.grad_accum_steps - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if last else model.no_sync():
            with process.autocast:
                logits, loss = model(x, y)  # 4. forward (B, T, V), 5. the loss
            loss = loss / cfg.grad_accum_steps  # the micro-batches' gradients add up
            scaler.scale(loss).backward()  # 6. backward (float16 scales: no underflow)
        batch_loss = batch_loss + loss.detach()
        tokens += x.numel()
    scaler.unscale_(optimizer)  # float16's scaler: the true gradient, to clip
    # 7. clip the gradient's norm (grad_clip 0: only measure it)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    scaler.step(optimizer)  # 8. update the weights (float16: unless it overflowed)
    scaler.update()
    return {"loss": batch_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, autocast):
    """The mean loss of eval_iters random batches of each split, in eval mode (no dropout)."""
    model.eval()
    out = {}
    for split, next_batch in batches.items():
        total = 0.0
        for _ in range(eval_iters):
            x, y = next_batch()
            with autocast:
                total = total + model(x, y)[1]
        out[split] = total.item() / eval_iters  # one wait for the device per split
    model.train()
    return out


# ------------------------------------------------------------------- the run: its set-up and loop

OUT_OF_MEMORY = "out of memory: try a smaller --batch_size or model, or --grad_accum_steps 2"


@dataclass
class Stage:
    """What a stage of training hands to fit: the GPT it trains and saves, its batches, and what
    a step calls. Pretraining's step calls the GPT itself; a later stage's calls a wrapper around
    the GPT and a frozen partner (distill.Distilled, dpo.Preferring). wrapper(x, y) -> (logits,
    loss) in every stage. x and y are (B, T) token ids, y holding each next token, or NO_TARGET
    (-100) where a position has none (a question, padding). logits are the GPT's (B, T, V) for
    the rows of x, whatever the stage's loss."""

    model: torch.nn.Module  # the GPT
    batches: dict  # {"train": ..., "val": ...}, each () -> a batch (x, y)
    wrapper: torch.nn.Module = None  # what a step calls; None: the GPT itself
    loss: str = "cross-entropy of each next token"  # what it is, on the opening lines
    evaluation: str = "the mean loss of each split, in eval mode"
    figures: object = None  # () -> {name: number}: its own figures at an evaluation, for bits/char
    batch: str = ""  # what its batch holds, if no windows of the corpus
    entries: dict = field(default_factory=dict)  # what its checkpoints add: {name: value}

    def __post_init__(self):
        if self.wrapper is None:
            self.wrapper = self.model


class WithPartner(torch.nn.Module):
    """A later stage's wrapper: its GPT (model), and beside it a frozen partner (partner), such as
    distillation's teacher or DPO's reference. The partner takes no gradient and stays in eval
    mode (no dropout) from the start, so a resumed run draws what a straight one drew."""

    def __init__(self, model, partner):
        super().__init__()
        self.model = model
        self.partner = partner.requires_grad_(False).eval()

    def train(self, mode=True):  # the model trains; the partner stays in eval mode
        super().train(mode)
        self.partner.eval()
        return self


def fit(settings, process, corpus, stage):
    """Every stage's run: the set-up, each check before anything is written; then the loop, which
    steps until the run ends, evaluates and saves now and then, and may stop early; then its end:
    last.pt, and the closing lines, or for a signal the command that resumes it."""
    cfg = settings.cfg
    options = settings.options
    with devices.out_of_memory_as_error(OUT_OF_MEMORY):  # one error line, with what to try
        stage.wrapper.to(process.device)  # the GPT, and a frozen partner beside it
        optimizer = make_optimizer(stage.model, cfg, process.device, process.dtype)
        state = start_state(settings, optimizer, process)  # fresh, or as the resume saved it
        batches = dict(stage.batches)
        if options.overfit_batch:  # a check: every step trains on one batch, nothing is written
            fixed = batches["train"]()
            batches["train"] = lambda: fixed
            cli.log("overfit_batch: one fixed batch, writing nothing; the loss should fall to 0")
        step_model = torch.compile(stage.wrapper) if cfg.compile else stage.wrapper
        step_model = process.wrap(step_model)  # under torchrun, DDP averages the gradients
        if cfg.compile:  # a missing compiler: one error line now
            devices.compile_first(stage.model, step_model, batches["train"], process)
        checkpoints = Checkpoints(settings, process, corpus, stage, optimizer)
        if options.overwrite and checkpoints.writes and not settings.resumed and not process.rank:
            checkpoint.clear_out_dir(cfg.out_dir)  # the old run's files go now, bad input refused
        if not cfg.time_budget and cfg.max_steps <= warmup(cfg.max_steps, cfg) and not process.rank:
            cli.warn(f"--max_steps {cfg.max_steps} ends within the warmup: the LR never decays")
        signals = Signals(process, cfg.log_interval)
        budget = Budget(settings, process, state)
        report = Report(settings, process, corpus, stage, signals.say)
        report.opening(state, f"{cfg.lr_schedule} schedule")
        stop_reason = None  # an early stop: --patience, --target_loss, --overfit_batch

        with signals:  # Ctrl-C or SIGTERM: the step ends, then the run saves and exits
            while True:
                # under a time budget, the steps that fit in the time left; planned every step
                warm = warmup(state.max_steps, cfg)
                state.max_steps = budget.plan(state, warm)
                if budget.spent_in_warmup(state, warm):  # its LR never decayed: it cannot end
                    saved = state.step > 0 and checkpoints.writes
                    if saved:
                        checkpoints.save("last.pt", state)  # a user never loses the steps taken
                    raise budget.too_short(state, warm, saved)
                at_end = state.step >= state.max_steps
                periodic = state.step % cfg.eval_interval == 0 and budget.room_to_evaluate(state)
                if (at_end or periodic) and state.step != state.last_eval_step:  # once a step
                    with budget.set_aside(state):  # the budget keeps its time for the last one
                        train_loss, val_loss = evaluate(step_model, batches, cfg, process)
                        improved = state.evaluated(val_loss)  # counts toward --patience
                        report.evaluation(state, train_loss, val_loss, improved)
                        if state.step:  # the baseline, before any step, keeps nothing
                            checkpoints.save("last.pt", state)
                            if improved:
                                checkpoints.save("best.pt", state)
                            stop_reason = stop_reason or early_stop(state, val_loss, cfg)
                        report.history(state, checkpoints.writes)
                    if not at_end:
                        continue  # it took time: plan again
                ending = at_end or stop_reason is not None
                # Ctrl-C or SIGTERM on any rank, or the end
                if signals.stop(state, ending) or ending:
                    break
                state.lr = get_lr(state.step, state.max_steps, cfg)
                figures = train_step(
                    step_model, optimizer, batches["train"], state.lr, cfg, process
                )
                state.window.append(figures)
                state.step += 1
                if state.step % cfg.log_interval == 0:
                    means = report.progress(state, budget.aside)  # the mean since the last line
                    if options.overfit_batch and process.mean([means["loss"]])[0] < 0.01:
                        stop_reason = f"overfit_batch: loss below 0.01 at step {state.step}"
                if cfg.save_interval and state.step % cfg.save_interval == 0:
                    checkpoints.save(f"ckpt_{state.step:07d}.pt", state)  # keep_last of them stay

        if signals.signum or state.last_eval_step != state.step:  # unless the evaluation saved it
            checkpoints.save("last.pt", state)
        if signals.signum:  # stopped: the command that resumes it, exit status 128 + the signal
            report.stopped(state, checkpoints.writes)
            process.leave_together()
            sys.exit(128 + signals.signum)
        schedule_end = get_lr(state.max_steps, state.max_steps, cfg)
        report.closing(state, stop_reason, schedule_end, checkpoints.writes)  # and a sample
        process.leave_together()
        return summary(settings, process, corpus, stage, state, stop_reason)


def summary(settings, process, corpus, stage, state, stop_reason):
    """What a run returns to the script (and to tools.scaling, tools.ablation and the tests)."""
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
        "tokens_per_step": cfg.batch_size * stage.model.config.block_size,  # tools.scaling's
    }


def evaluate(model, batches, cfg, process):
    """(train loss, val loss): each the mean over every rank's share of eval_iters batches."""
    eval_iters = math.ceil(cfg.eval_iters / process.world)  # this rank's share
    losses = estimate_loss(model, batches, eval_iters, process.autocast)
    return process.mean([losses["train"], losses["val"]])


def early_stop(state, val_loss, cfg):
    """Why the run stops before its end, or None: --patience evaluations without a new best, or
    --target_loss reached."""
    if cfg.target_loss and val_loss <= cfg.target_loss:
        return f"target reached: val loss {val_loss:.4f} <= {cfg.target_loss:g} at {state.step}"
    if cfg.patience and state.evals_without_improvement >= cfg.patience:
        evals = f"{cfg.patience} evaluations (best {state.best_val_loss:.4f})"
        return f"early stop: val loss has not improved for {evals}"
    return None


# ------------------------------------------------------------------------------- the command line


def main(argv=None):
    """train.py's command line: its settings, each decided and checked once; then the run, or
    --plot_lr."""
    settings = read_settings(argv, "train", __doc__, STARTED)
    if settings.options.plot_lr:
        return plots.draw_lr_schedule(settings.cfg, get_lr)
    train(settings)


if __name__ == "__main__":
    cli.run_cli(main)  # bad input: one error: line and exit status 2
