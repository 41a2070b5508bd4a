"""Train a GPT on a text file.

    python train.py                            # the bundled Shakespeare, with the preset that suits the device
    python train.py --preset small --max_steps 50
    python train.py --resume                   # continue checkpoints/last.pt, or start it if there is none
    python train.py --init_from checkpoints/best.pt --data notes.txt --out_dir checkpoints/notes   # fine-tune

How to read this file: train_step is one optimizer step, in the order that is the lesson;
train() is the loop around it, one screen of labelled blocks; the functions after it set a
run up, evaluate and checkpoint it, and report on it. Every flag: python train.py --help.
"""

import os

if __name__ == "__main__" and "OMP_WAIT_POLICY" not in os.environ:
    # before torch loads OpenMP: idle threads spin briefly, then sleep (device.set_threads says why)
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import contextlib
import csv
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (StopRequest, claim_out_dir, conflicting_flags, load_checkpoint, load_model, make_checkpoint,
                        model_from_checkpoint, prune_periodic, resume_configs, save_checkpoint, tokenizer_of)
from config import (MAX_SEED, PRESETS, ArgumentParser, GPTConfig, RunOptions, TinyLLMError, TrainConfig, add_config_flags,
                    build, build_configs, default_preset, explicit_flags, format_seconds, log, preset_defaults,
                    run_cli, warn)
from device import (all_ranks_max, all_ranks_mean, autocast, choose_device, configure_matmul, describe,
                    explain_dtype, make_scaler, out_of_memory_as_error, peak_flops, resolve_dtype, rng_state,
                    seed_everything, set_rng_state, set_threads, setup_distributed, teardown_distributed)
from model import GPT
from optim import get_lr, make_optimizer, step_if_finite
from plots import plot_history, plot_lr_schedule
from tokenizer import start_ids
from utils import check_long_enough, get_batch, tokenize


# ----------------------------------------------------------------------------- one step

def train_step(model, optimizer, next_batch, lr, grad_accum_steps, grad_clip, ctx, scaler=None):
    """One optimizer step, in the order the trainer contract fixes: set this step's LR, zero
    grads, batch, forward, loss, backward, clip, optimizer step. The caller then advances the
    step counter. Returns (loss, grad norm before clipping) as tensors: nothing here waits for
    a GPU. A step whose loss or gradients are not finite leaves the weights untouched."""
    if scaler is not None and not scaler.is_enabled():
        scaler = None  # a disabled scaler checks nothing: do the finite check here instead
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for micro_step in range(grad_accum_steps):
        x, y = next_batch()
        # under DDP, all-reduce the gradients only once, after the last micro-batch
        last = micro_step == grad_accum_steps - 1
        with (contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()):
            with ctx:
                _, loss = model(x, y)
            # each micro-batch holds 1/grad_accum_steps of the batch, so the summed
            # gradients equal the gradient of the mean loss over the whole batch
            loss = loss / grad_accum_steps
            loss_sum = loss_sum + loss.detach()
            (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if scaler:  # skips the step by itself when a gradient overflowed, then lowers the scale
        scaler.step(optimizer)
        scaler.update()
    else:
        step_if_finite(optimizer, torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
    return loss_sum, grad_norm


@torch.no_grad()
def estimate_loss(model, batch_fns, eval_iters, ctx):
    """Mean loss over eval_iters random batches of each split, in eval mode (no dropout)."""
    model.eval()
    out = {}
    for split, next_batch in batch_fns.items():
        total = 0.0
        for _ in range(eval_iters):
            x, y = next_batch()
            with ctx:
                _, loss = model(x, y)
            total = total + loss
        out[split] = total.item() / eval_iters  # one wait for the device per split
    model.train()
    return out


@torch.no_grad()
def evaluate_full(model, ids, block_size, batch_size, device, ctx):
    """Mean loss over every position of ids exactly once: consecutive, non-overlapping windows,
    then the last positions that do not fill a window."""
    model.eval()
    n = (len(ids) - 1) // block_size  # whole windows; a split shorter than one is all tail
    windows = ids[:n * block_size + 1].unfold(0, block_size + 1, block_size) if n else ids[:0].view(0, block_size + 1)
    tail = len(ids) - 1 - len(windows) * block_size
    chunks = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    chunks += [ids[-tail - 1:][None]] if tail > 0 else []
    total, count = 0.0, 0
    for rows in chunks:  # (b, T+1)
        x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
        with ctx:
            logits, _ = model(x)
        total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        count += y.numel()
    return total.item() / count


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainState:
    """A run's progress: saved in every checkpoint, so --resume continues exactly."""
    step: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    lr: float = 0.0
    grad_norm: float = None          # of the latest step; None before the first
    history: list = field(default_factory=list)
    window: list = field(default_factory=list)  # (loss, grad norm) of the steps since the last progress row
    decay_from: list = None          # [step, lr] where a resumed run re-planned its LR decay
    seconds: float = 0.0             # training wall time over every session of the run


def train(model_cfg, train_cfg, options=None, preset="custom", given=None):
    """Train and return a summary dict. Under torchrun every rank runs this; only rank 0
    prints and writes files. given: the flags set on the command line (for --resume)."""
    return train_loop(start_run(model_cfg, train_cfg, options or RunOptions(), preset, given or {}))


def train_loop(run):
    """The loop: evaluate once in a while, take optimizer steps, report, stop when asked."""
    cfg, state = run.train_cfg, run.state
    with StopRequest(announce=run.master) as stop, out_of_memory_as_error(run.oom_hint):
        while True:
            # --- evaluate and checkpoint, once in a while (and at the end)
            if (state.step % cfg.eval_interval == 0 or state.step == cfg.max_steps) \
                    and state.step != state.last_eval_step:
                check_steps(run)
                evaluate_and_checkpoint(run)
            if state.step >= cfg.max_steps or run.stop_reason:
                break

            # --- one optimizer step: LR, zero grads, batch, forward, loss, backward, clip, step
            lr = get_lr(state.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, state.decay_from)
            loss, grad_norm = train_step(run.run_model, run.optimizer, run.next_batch, lr,
                                         cfg.grad_accum_steps, cfg.grad_clip, run.ctx, run.scaler)
            state.step += 1
            state.lr = lr
            run.pending.append((state.step, loss, grad_norm))

            # --- log: a progress line and a history row every log_interval steps
            if state.step % run.log_interval == 0:
                check_steps(run)
                log_progress(run)

            # --- a periodic checkpoint, if asked for
            if cfg.save_interval and state.step % cfg.save_interval == 0:
                check_steps(run)
                save(run, os.path.join(run.out_dir, f"ckpt_{state.step:07d}.pt"))
                if run.master:
                    prune_periodic(run.out_dir, cfg.keep_last)

            # --- stop on a signal: the step is done, save last.pt and leave
            signum = stop_signal(run, stop)
            if signum:
                check_steps(run)
                save(run, run.last_path)
                run.say(f"saved {run.last_path} at step {state.step}. "
                        f"Resume with: python train.py --resume --out_dir {run.out_dir}")
                sys.exit(130 if signum == signal.SIGINT else 143)
    with out_of_memory_as_error(run.oom_hint):
        return finish(run)


# ----------------------------------------------------------------------------- setting a run up

class Run:
    """Everything one run holds, set up by start_run and then owned by the loop."""
    options: RunOptions             # what this command does (resume, init_from, overfit_batch, ...)
    model_cfg: GPTConfig
    train_cfg: TrainConfig
    preset: str
    rank: int                       # this process, of world processes (1 without torchrun)
    world: int
    master: bool                    # rank 0: the only one that prints and writes files
    device: torch.device
    dtype: str                      # the autocast precision, and its context and gradient scaler
    tokenizer: object
    corpus: object                  # utils.Corpus: train and val token streams
    model: GPT                      # run_model: the same, compiled or wrapped in DDP when asked
    optimizer: torch.optim.Optimizer
    state: TrainState
    pending: list                   # (step, loss, grad norm) as tensors, not yet read from the device
    step_time: float                # seconds spent in the steps since the last progress line, and how many
    timed_steps: int
    stop_reason: str                # set when the run should end before max_steps


def start_run(model_cfg, train_cfg, options, preset, given):
    """Everything before the first step, in order: processes and device, the run folder
    (resume, or refuse to overwrite another run), precision, data, model, optimizer."""
    run = Run()
    run.options, run.preset = options, preset
    run.rank, run.world, device = setup_distributed(choose_device(train_cfg.device))
    run.master = run.rank == 0
    run.say = log if run.master else (lambda *a: None)
    run.out_dir = train_cfg.out_dir
    run.last_path, run.best_path = (os.path.join(run.out_dir, n) for n in ("last.pt", "best.pt"))
    resume_from = find_resume(run, options)
    if resume_from:
        model_cfg, train_cfg = resume_configs(resume_from, given, run.last_path)
        run.preset = resume_from.get("preset", preset)
        if options.preset and options.preset != run.preset:
            raise TinyLLMError(f"{run.last_path} is a run of preset '{run.preset}'; --resume cannot switch it to "
                               f"--preset {options.preset} (drop the flag, or start another --out_dir)")
        train_cfg = dataclasses.replace(train_cfg, out_dir=run.out_dir)
    elif not options.overfit_batch:
        claim_out_dir(run.out_dir, options.overwrite, run.master, run.say, keep=options.init_from)
    run.model_cfg, run.train_cfg, run.device = model_cfg, train_cfg, device
    if train_cfg.batch_size % (run.world * train_cfg.grad_accum_steps):
        raise TinyLLMError(f"batch_size ({train_cfg.batch_size}) must be divisible by the number of processes "
                           f"({run.world}) times grad_accum_steps ({train_cfg.grad_accum_steps})")
    run.threads = set_threads(train_cfg.threads)
    run.dtype = resolve_dtype(train_cfg.dtype, device)
    run.ctx, run.scaler = autocast(device, run.dtype), make_scaler(device, run.dtype)
    configure_matmul(device)
    seed_everything(train_cfg.seed)  # the same on every rank: identical initial weights
    run.oom_hint = (f"out of memory on {describe(device)}: try a smaller --batch_size, or --grad_accum_steps 2 "
                    f"or more (the same batch in pieces), or a smaller model")
    with out_of_memory_as_error(run.oom_hint):
        build_model(run, resume_from, options.init_from, given)
    run.state = TrainState()
    if resume_from:
        restore(run, resume_from)
    if run.world > 1:  # each rank draws its own batches (resumed runs too, from the step on)
        seed_everything((train_cfg.seed + 1000 * run.rank + 7919 * run.state.step) % (MAX_SEED + 1))
    run.run_model = torch.compile(run.model) if train_cfg.compile else run.model
    if run.world > 1:
        run.run_model = DDP(run.run_model, device_ids=[device.index] if device.type == "cuda" else None)
    make_batches(run, options.overfit_batch)
    print_header(run)
    run.pending, run.stop_reason, run.overfit_step = [], None, None
    run.log_interval = 1 if options.overfit_batch else train_cfg.log_interval
    run.peak = peak_flops(device, run.dtype) if run.master else None
    run.step_time, run.timed_steps = 0.0, 0
    run.session_start = run.mark = time.perf_counter()
    return run


def find_resume(run, options):
    """The checkpoint --resume continues: OUT_DIR/last.pt, or None to start fresh when there is
    none yet (so the same command works the first time and after every disconnect)."""
    if not options.resume:
        return None
    if not os.path.isfile(run.last_path):
        run.say(f"--resume: no {run.last_path} yet, starting a fresh run")
        return None
    checkpoint = load_checkpoint(run.last_path)
    missing = [k for k in ("optimizer", "train_config", "rng", *dataclasses.asdict(TrainState()))
               if k not in checkpoint and k not in ("window", "decay_from", "seconds")]  # older versions lack these
    if missing:
        raise TinyLLMError(f"{run.last_path} lacks the training state --resume needs (missing: {', '.join(missing)}); "
                           f"fine-tune from its weights with --init_from instead")
    run.say(f"resuming {run.last_path} at step {checkpoint['step']}")
    return checkpoint


def load_source(path):
    """The checkpoint a fine-tuning run starts from: one of ours (.pt), or OpenAI's GPT-2
    weights by name (gpt2, gpt2-medium, ...) or from a Hugging Face folder."""
    if path.endswith(".pt"):
        return load_checkpoint(path)
    from hf_gpt2 import gpt2_checkpoint, load_gpt2  # needs transformers: imported only when asked
    return gpt2_checkpoint(load_gpt2(path))


def build_model(run, resumed, init_from, given):
    """The tokenizer, the token streams, the model and its optimizer. A fresh run builds its
    tokenizer from the data; a resumed or fine-tuned one takes the checkpoint's, and a
    fine-tuned char model grows its vocabulary by the characters the new text adds."""
    cfg = run.train_cfg
    source = resumed or (load_source(init_from) if init_from else None)
    source_name = run.last_path if resumed else init_from
    if init_from:
        check_same_shape(source, given, init_from)
    dropout = given.get("dropout") if init_from else None  # fine-tuning may change the dropout, nothing else
    model = model_from_checkpoint(source, source_name, dropout) if source else None
    tokenizer = tokenizer_of(source, model.config.vocab_size, source_name) if source else None
    corpus = tokenize(cfg.data, cfg.tokenizer, run.model_cfg.vocab_size, tokenizer, cfg.clean, cfg.data_ext,
                      extend=bool(init_from))
    block_size = model.config.block_size if model else run.model_cfg.block_size
    check_long_enough(corpus.train, block_size, "train", cfg.data)
    check_long_enough(corpus.val, block_size, "validation", cfg.data)
    if corpus.added:
        padding = list(range(tokenizer.vocab_size, model.config.vocab_size))  # rows past the tokenizer's, if any
        model.resize_vocab(corpus.old_ids + padding)
        run.say(f"added {len(corpus.added)} character(s) {''.join(corpus.added)[:60]!r} that {init_from} lacked to "
                f"the vocabulary ({tokenizer.vocab_size} -> {corpus.tokenizer.vocab_size} tokens)")
    if model is None:
        model = GPT(dataclasses.replace(run.model_cfg, vocab_size=corpus.tokenizer.vocab_size))
    run.model_cfg, run.tokenizer, run.corpus = model.config, corpus.tokenizer, corpus
    run.model = model.to(run.device)
    run.optimizer = make_optimizer(run.model, cfg, run.device)


def check_same_shape(source, given, init_from):
    """A fine-tuned model keeps its checkpoint's shape: refuse model flags that say otherwise,
    rather than ignore them."""
    differ = conflicting_flags(given, source["model_config"], ("dropout", "vocab_size"), "it has")
    if differ:
        raise TinyLLMError(f"--init_from {init_from} keeps that model's shape; drop {', '.join(differ)}")


def restore(run, checkpoint):
    """Put a resumed run back exactly where it was: optimizer moments, loss scale, progress,
    every RNG; and re-plan the LR decay when --max_steps changed."""
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    if run.scaler and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    state = TrainState(**{k: checkpoint[k] for k in dataclasses.asdict(TrainState()) if k in checkpoint})
    for row in state.history:  # rows written before progress rows existed were evaluations
        row.setdefault("kind", "eval")
    cfg, saved = run.train_cfg, checkpoint["train_config"]
    if cfg.max_steps != saved["max_steps"]:
        if state.step >= cfg.max_steps:
            raise TinyLLMError(f"the run is already at step {state.step}; --max_steps {cfg.max_steps} "
                               f"would not train it further")
        if state.step >= cfg.warmup_steps:
            old = get_lr(state.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, saved["max_steps"], state.decay_from)
            state.decay_from = [state.step, old]
        run.say(f"--max_steps {saved['max_steps']} -> {cfg.max_steps}: the LR now decays from "
                f"{get_lr(state.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, state.decay_from):.2e} "
                f"at step {state.step} to {cfg.min_lr:g} at step {cfg.max_steps}")
    run.state = state
    set_rng_state(checkpoint["rng"])


def make_batches(run, overfit_batch):
    micro_batch = run.train_cfg.batch_size // run.world // run.train_cfg.grad_accum_steps
    block_size, device = run.model_cfg.block_size, run.device
    run.val_batch = lambda: get_batch(run.corpus.val, micro_batch, block_size, device)
    run.next_batch = lambda: get_batch(run.corpus.train, micro_batch, block_size, device)
    if overfit_batch:
        fixed = run.next_batch()
        run.next_batch = lambda: fixed
        run.say("overfit_batch: training on one fixed batch, writing nothing; the loss should fall towards 0")
    run.micro_batch = micro_batch


def print_header(run):
    m, cfg, tokens = run.model_cfg, run.train_cfg, run.corpus
    processes = f" x {run.world} processes" if run.world > 1 else ""
    run.say(f"device {describe(run.device)} ({explain_dtype(cfg.dtype, run.dtype)}, {run.threads} threads){processes} | preset {run.preset} "
            f"| data {cfg.data}")
    run.say(f"model {run.model.num_params():,} parameters: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
            f"block {m.block_size}, vocab {m.vocab_size} | norm {m.norm}, mlp {m.mlp}, pos {m.pos} "
            f"| optimizer {cfg.optimizer}")
    split = [f"{run.world} processes"] if run.world > 1 else []
    split += [f"{cfg.grad_accum_steps} micro-batches"] if cfg.grad_accum_steps > 1 else []
    run.say(f"tokens per step {cfg.batch_size * m.block_size:,} = batch {cfg.batch_size} x block {m.block_size}"
            + (f" ({' x '.join(split)} of {run.micro_batch})" if split else "")
            + f" | train {len(tokens.train):,} tokens, val {len(tokens.val):,} tokens")
    if cfg.max_steps <= cfg.warmup_steps:
        warn(f"--max_steps {cfg.max_steps} ends within the warmup ({cfg.warmup_steps} steps): the LR never "
             f"reaches its peak nor decays; use a smaller --warmup_steps")


# ----------------------------------------------------------------------------- during the run

def check_steps(run):
    """Read the steps' losses and gradient norms from the device in one go (the only place
    the loop waits for a GPU), and stop on a non-finite value. Such a step was skipped, so
    the weights are still finite; nothing after it was saved."""
    if not run.pending:
        return
    run.step_time += time.perf_counter() - run.mark  # the device has finished these steps only now
    run.timed_steps += len(run.pending)
    steps = [s for s, _, _ in run.pending]
    values = torch.stack([torch.stack((loss.float(), norm.float())) for _, loss, norm in run.pending]).tolist()
    run.pending = []
    for step, (loss, norm) in zip(steps, values):
        if not math.isfinite(loss) or (run.scaler is None and not math.isfinite(norm)):
            cfg = run.train_cfg
            raise TinyLLMError(
                f"step {step - 1}: non-finite values (loss {loss}, grad norm {norm}); the step was skipped. Likely "
                f"causes: learning rate too high (--lr {cfg.lr:g}), clipping off (--grad_clip {cfg.grad_clip:g}), "
                f"or float16 overflow (--dtype bfloat16 or float32). Nothing non-finite was saved; last good "
                f"checkpoint: {run.last_path if run.state.last_eval_step >= 0 and not run.options.overfit_batch else 'none'}")
        run.state.window.append((loss, norm))
    run.state.grad_norm = values[-1][1] if math.isfinite(values[-1][1]) else None  # None: a skipped fp16 step


def log_progress(run):
    """A progress line (loss, LR, grad norm, speed, ETA) and a history row for the steps since the last one."""
    state, cfg = run.state, run.train_cfg
    ms = 1000 * run.step_time / max(1, run.timed_steps)
    loss = sum(l for l, _ in state.window) / max(1, len(state.window))
    tokens_per_s = cfg.batch_size * run.model_cfg.block_size / ms * 1000
    state.history.append({"kind": "train", "step": state.step, "train_loss": loss, "val_loss": None,
                          "lr": state.lr, "grad_norm": state.grad_norm, "ms_per_step": ms, "seconds": elapsed(run)})
    line = (f"step {state.step:>6}/{cfg.max_steps} | loss {loss:.4f} | lr {state.lr:.2e} | grad norm "
            f"{state.grad_norm if state.grad_norm is not None else float('nan'):.3f} | {ms:.1f} ms/step | "
            f"{tokens_per_s:,.0f} tok/s | ETA {format_seconds((cfg.max_steps - state.step) * ms / 1000)}")
    if run.peak:
        flops = run.model.flops_per_token() * tokens_per_s
        line += f" | MFU {100 * flops / (run.peak * run.world):.1f}%"
    if not run.options.overfit_batch or state.step % cfg.log_interval == 0:
        run.say(line)
    if run.options.overfit_batch and loss < 0.01:
        run.overfit_step = state.step
        run.stop_reason = f"overfit_batch: loss {loss:.4f} < 0.01 at step {state.step}"
    state.window, run.step_time, run.timed_steps, run.mark = [], 0.0, 0, time.perf_counter()


def evaluate_and_checkpoint(run):
    """Evaluate both splits, add a history row, save last.pt (and best.pt when val improved),
    rewrite the history and plots, and decide whether to stop early."""
    state, cfg = run.state, run.train_cfg
    batches = {"train": run.next_batch, "val": run.val_batch}
    # each rank evaluates its share of the batches; the average is the same everywhere,
    # so every rank takes the same best / early-stopping decisions
    losses = estimate_loss(run.run_model, batches, math.ceil(cfg.eval_iters / run.world), run.ctx)
    train_loss, val_loss = all_ranks_mean([losses["train"], losses["val"]], run.world, run.device)
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.evals_without_improvement = val_loss, 0
    else:
        state.evals_without_improvement += 1
    state.last_eval_step = state.step
    state.history.append({"kind": "eval", "step": state.step, "train_loss": train_loss, "val_loss": val_loss,
                          "lr": state.lr, "grad_norm": state.grad_norm, "ms_per_step": None, "seconds": elapsed(run)})
    bits = val_loss / run.corpus.chars_per_token / math.log(2)
    line = f"eval {state.step:>6}/{cfg.max_steps} | train {train_loss:.4f} | val {val_loss:.4f} ({bits:.3f} bits/char)"
    if state.step == 0:
        line += f" | uniform baseline ln(V) = {math.log(run.model_cfg.vocab_size):.4f}"
    run.say(line + (" | new best" if improved else ""))
    if not run.options.overfit_batch:
        save(run, run.last_path)
        if improved:
            save(run, run.best_path)
        if run.master:
            write_history(state.history, run.out_dir)
            if cfg.plots:
                plot_history(state.history, run.out_dir, run.model_cfg.vocab_size, cfg, state.decay_from)
    if cfg.patience and state.evals_without_improvement >= cfg.patience:
        run.stop_reason = (f"early stop: val loss has not improved for {cfg.patience} evaluations "
                           f"(best {state.best_val_loss:.4f} kept in {run.best_path})")
    elif cfg.target_loss and val_loss <= cfg.target_loss:
        run.stop_reason = f"target reached: val loss {val_loss:.4f} <= {cfg.target_loss:g} at step {state.step}"
    run.mark = time.perf_counter()  # evaluation time is not step time


def elapsed(run):
    return run.state.seconds + time.perf_counter() - run.session_start


def save(run, path):
    if run.master:
        run.state.seconds = elapsed(run)
        run.session_start = time.perf_counter()
        save_checkpoint(path, make_checkpoint(
            run.model, run.model_cfg, run.tokenizer, optimizer=run.optimizer.state_dict(),
            train_config=dataclasses.asdict(run.train_cfg), preset=run.preset, rng=rng_state(),
            scaler=run.scaler.state_dict() if run.scaler else None, **dataclasses.asdict(run.state)))
        run.mark = time.perf_counter()  # saving is not step time


def write_history(history, out_dir):
    fields = ["kind", "step", "train_loss", "val_loss", "lr", "grad_norm", "ms_per_step", "seconds"]
    with open(os.path.join(out_dir, "history.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    with open(os.path.join(out_dir, "history.json"), "w") as f:
        json.dump(history, f, indent=1)


def stop_signal(run, stop):
    """The signal that asked the run to stop (0: none), the same on every rank. One process
    looks every step; several agree at progress lines, so no step waits for the others."""
    if run.world == 1:
        return stop.signum or 0
    if run.state.step % run.log_interval:
        return 0
    return all_ranks_max(stop.signum or 0, run.world, run.device)


# ----------------------------------------------------------------------------- the end of a run

def finish(run):
    state = run.state
    if state.last_eval_step != state.step and not run.options.overfit_batch:  # stopped between evaluations
        check_steps(run)
        save(run, run.last_path)
    if run.stop_reason:
        run.say(run.stop_reason)
    run.say(f"done: {state.step} steps | best val loss {state.best_val_loss:.4f} | total training time "
            f"{format_seconds(elapsed(run))}" + ("" if run.options.overfit_batch else
                                                 f" | {run.out_dir}/: best.pt, last.pt, history.csv"
                                                 + (", loss.png" if run.train_cfg.plots else "")))
    if run.train_cfg.sample_tokens and run.master:
        run.model.eval()
        start = torch.tensor([start_ids(run.tokenizer)], device=run.device)
        with run.ctx:
            out = run.model.generate(start, run.train_cfg.sample_tokens, temperature=0.8,
                                     generator=torch.Generator(run.device).manual_seed(run.train_cfg.seed))
        run.say("sample:\n" + run.tokenizer.decode(out[0].tolist()))
    teardown_distributed(run.world)
    return {"step": state.step, "best_val_loss": state.best_val_loss, "history": state.history,
            "seconds": elapsed(run), "overfit_step": run.overfit_step, "model": run.model}


def evaluate_checkpoint(path, data, device_name, batch_size, threads=0):
    """--eval_only: loss, perplexity and bits per character over the whole val split."""
    device = choose_device(device_name)
    set_threads(threads)
    model, tokenizer, checkpoint = load_model(path)
    model.to(device)
    saved = checkpoint.get("train_config", {})
    data = data or saved.get("data", TrainConfig.data)
    corpus = tokenize(data, tokenizer=tokenizer, clean=saved.get("clean", False),
                      extensions=saved.get("data_ext", ".txt"))  # the split the run was validated on
    check_long_enough(corpus.val, 1, "validation", data)
    val_ids = torch.as_tensor(np.asarray(corpus.val, dtype=np.int64))
    loss = evaluate_full(model, val_ids, model.config.block_size, batch_size, device, autocast(device, "float32"))
    bpc = loss / corpus.chars_per_token / math.log(2)
    log(f"{path} on the val split of {data} ({len(val_ids):,} tokens, every position once):")
    log(f"loss {loss:.4f} nats/token | perplexity {math.exp(loss):.3f} | {bpc:.4f} bits per character")
    return {"loss": loss, "perplexity": math.exp(loss), "bpc": bpc}


# ----------------------------------------------------------------------------- command line

def build_parser(device):
    preset = default_preset(device.type)
    auto = {"device": ("auto", f"{device.type} here"), "dtype": ("auto", f"{resolve_dtype('auto', device)} here"),
            "threads": (0, f"{set_threads(0)} here"), "preset": (preset, f"on this machine ({device.type})")}
    parser = ArgumentParser(
        description="Train a GPT language model on a text file.",
        epilog=f"Presets: {', '.join(PRESETS)}. Without --preset this machine uses '{preset}', and the defaults "
               f"shown are that preset's where it sets them. Flags override the preset.")
    add_config_flags(parser, RunOptions, auto, title="what to do")
    add_config_flags(parser, GPTConfig, preset_defaults(preset, auto), title="model (GPTConfig)")
    add_config_flags(parser, TrainConfig, preset_defaults(preset, auto), title="training (TrainConfig)")
    return parser


def main(argv=None):
    parser = build_parser(choose_device("auto"))
    args = parser.parse_args(argv)
    given = explicit_flags(args)
    options = build(RunOptions, given)
    device = choose_device(given.get("device", "auto"))
    preset = options.preset or default_preset(device.type)
    if not options.preset and os.environ.get("RANK", "0") == "0" and not options.resume:
        log(f"no --preset given: using '{preset}' for {device.type}")
    model_cfg, train_cfg = build_configs(given, preset)
    if options.eval_only is not None:
        path = options.eval_only or os.path.join(train_cfg.out_dir, "best.pt")
        evaluate_checkpoint(path, given.get("data"), train_cfg.device, train_cfg.batch_size, train_cfg.threads)
    elif options.plot_lr:
        path = os.path.join(train_cfg.out_dir, "lr_schedule.png")
        plot_lr_schedule(train_cfg, path)
        log(f"wrote {path}")
    else:
        train(model_cfg, train_cfg, options, preset, given)


if __name__ == "__main__":
    run_cli(main)
