"""Pretrain a GPT on a text file: the lesson, top to bottom.

    python train.py     # data/input.txt: this machine's preset, five minutes on a CPU
    python train.py --preset small --max_steps 50 --seed 1
    python train.py --data data/qa_example.json --tag qa   # questions and answers, from scratch
    python train.py --data notes.txt --tag notes   # your own text

In order: the corpus, the GPT and its batches; the AdamW optimizer and its parameter groups; the
warmup-cosine schedule; one step (gradient accumulation, clipping); the loop every stage runs
(fit), which evaluates and saves. What keeps the run's promises (a time budget, Ctrl-C, --resume,
the opening and closing lines, the flags) is machinery/harness.py, behind the calls on `run`.

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
from dataclasses import dataclass, field, replace

import torch

from machinery import checkpoint, cli, evaluation, harness, plots, sources
from machinery.settings import read_settings
from model import GPT
from utils import make_batches

# ----------------------------------------------------------------- the corpus, the GPT, batches


def train(settings):
    """Pretrain a GPT from scratch, or go on with its run (--resume). Read the corpus, build the
    model and its batches, then fit it. settings come from main, at the bottom. Under torchrun
    every rank runs this."""
    process = harness.start_process(settings)  # its rank under torchrun, its threads, the seed
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
    size = micro_batch(cfg, process)
    return make_batches(corpus, block_size, size, cfg.data_fraction, process.device)


def micro_batch(cfg, process):
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


def get_lr(step, max_steps, cfg):
    """The learning rate of a step: a linear warmup to cfg.lr over warmup_steps steps, then a decay
    to min_lr as the progress goes from 0 (the warmup's end) to 1 at step max_steps, where the run
    ends: its last step, max_steps - 1, is a step short of it, as in nanoGPT. A new shape: a choice
    of lr_schedule in config.py, a formula here, a row of SCHEDULE_POINTS in tests/test_train.py.
    min_lr may be 0 (the five-minute presets): a shape that divides by it needs a floor above 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.lr_schedule == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"get_lr has no formula for lr_schedule {cfg.lr_schedule!r}")


# ---------------------------------------------------------------------- one step, an evaluation


def train_step(model, optimizer, next_batch, lr, cfg, process):
    """One optimizer step; returns its figures. A new figure is an entry in that dict, one number
    a step: it reaches the progress lines and history.csv (its test: beside test_the_step_clips...
    in tests/test_train.py). Figures stay tensors: reading one makes a GPU wait, so the loop reads
    them at the next progress line. model is a Stage's wrapper(x, y) -> (logits, loss), maybe
    wrapped by DDP or torch.compile; its logits are the GPT's in every stage. tokens counts the
    tokens read (tok/s). process gives the precision (autocast) and float16's loss scaler."""
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


# ------------------------------------------------------------- the loop: fit, evaluate, loop


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
        self.wrapper = self.wrapper or self.model


def fit(settings, process, corpus, stage):
    """Train the stage's GPT on its batches through its wrapper. Set up the optimizer, in the
    process's precision; the harness sets up the run (its state, a resume's, the opening lines);
    then loop. Every stage runs this; it returns the run's summary."""
    cfg = settings.cfg
    with harness.out_of_memory():  # one error line, with what to try
        stage.wrapper.to(process.device)  # the GPT, and a frozen partner beside it
        optimizer = make_optimizer(stage.model, cfg, process.device, process.dtype)
        run = harness.Run(settings, process, corpus, stage, optimizer)
        return loop(run)


def evaluate(run):
    """The mean loss of each split, on its line. After the first step it saves last.pt, and
    best.pt when val is the lowest yet; --patience or --target_loss may end the run here."""
    cfg = run.cfg
    state = run.state
    started = time.perf_counter()  # a time budget keeps as much time for the last evaluation
    losses = estimate_loss(run.step_model, run.batches, run.eval_iters, run.process.autocast)
    train_loss, val_loss = run.process.mean([losses["train"], losses["val"]])  # every rank's
    improved = state.step > 0 and val_loss < state.best_val_loss  # the baseline never is
    run.evaluated(train_loss, val_loss, improved)  # its line and history row
    if state.step:  # the baseline, before any step, keeps nothing
        state.best_val_loss = min(val_loss, state.best_val_loss)
        state.evals_without_improvement = 0 if improved else state.evals_without_improvement + 1
        run.save("last.pt")
        if improved:
            run.save("best.pt")
        if cfg.patience and state.evals_without_improvement >= cfg.patience:
            evals = f"{cfg.patience} evaluations (best {state.best_val_loss:.4f})"
            run.stop_reason = f"early stop: val loss has not improved for {evals}"
        if cfg.target_loss and val_loss <= cfg.target_loss:
            target = f"val loss {val_loss:.4f} <= {cfg.target_loss:g} at {state.step}"
            run.stop_reason = f"target reached: {target}"
    run.evaluation_done(started)  # history.csv and loss.png; its time kept aside by a budget


def loop(run):
    """Take steps until step state.max_steps. Evaluate every eval_interval steps and at the end;
    print a progress line every log_interval steps. Then the closing lines (run.finish)."""
    cfg = run.cfg
    state = run.state
    with run:  # Ctrl-C or SIGTERM: the step ends, then the run saves and exits
        while True:
            run.plan()  # a --time_budget sets max_steps: the steps that fit in the time left
            at_end = state.step >= state.max_steps
            periodic = state.step % cfg.eval_interval == 0 and run.room_to_evaluate()
            if (at_end or periodic) and state.step != state.last_eval_step:  # never twice a step
                evaluate(run)
                continue  # it took time: plan again
            if run.signalled():  # Ctrl-C or SIGTERM, on any rank
                break
            if at_end or run.stop_reason:  # the end, or an early stop
                break
            state.lr = get_lr(state.step, state.max_steps, cfg)
            batch = run.batches["train"]
            figures = train_step(run.step_model, run.optimizer, batch, state.lr, cfg, run.process)
            state.window.append(figures)
            state.step += 1
            if state.step % cfg.log_interval == 0:
                run.log_progress()  # each figure's mean since the last line, the pace, the ETA
            if cfg.save_interval and state.step % cfg.save_interval == 0:
                run.save(f"ckpt_{state.step:07d}.pt")  # the newest keep_last of them stay
    end = get_lr(state.max_steps, state.max_steps, cfg)  # the schedule's end, on the closing line
    return run.finish(end)  # last.pt, the closing lines and sample


# ------------------------------------------------------------------------------- the command line


def main(argv=None):
    """train.py's command line: its settings, each decided and checked once; then the run, or
    --eval_only, or --plot_lr."""
    settings = read_settings(argv, "train", __doc__, STARTED)
    cfg = settings.cfg
    if settings.options.eval_only is not None:  # --eval_only alone: best.pt's
        path = settings.options.eval_only or f"{cfg.out_dir}/best.pt"
        evaluation.evaluate_checkpoint(path, cfg.data, cfg)  # data: --data's, or the checkpoint's
    elif settings.options.plot_lr:
        plots.draw_lr_schedule(cfg, get_lr)
    else:
        train(settings)


if __name__ == "__main__":
    cli.run_cli(main)  # bad input: one error: line and exit status 2
