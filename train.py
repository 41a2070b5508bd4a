"""Train a GPT on a text file.

    python train.py                          # the bundled Shakespeare, a preset that suits the device
    python train.py --preset small --max_steps 50
    python train.py --resume                 # continue checkpoints/last.pt exactly where it stopped

Every flag is listed by `python train.py --help`; their defaults live in config.py.
"""

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import GPTConfig, TrainConfig, TinyLLMError, add_config_flags, build_configs, default_preset
from model import GPT
from tokenizer import make_tokenizer, start_ids, tokenizer_from_dict
from utils import (autocast, check_long_enough, choose_device, format_seconds, get_batch, get_lr, is_prepared,
                   load_checkpoint, load_corpus, load_prepared, log, make_optimizer, model_from_checkpoint,
                   new_plot, resolve_dtype, rng_state, run_cli, save_checkpoint, save_plot, seed_everything,
                   set_rng_state, split_train_val)


# ----------------------------------------------------------------------------- the two loops

def train_step(model, optimizer, next_batch, lr, grad_accum_steps, grad_clip, ctx, scaler=None):
    """One optimizer step, in the order the trainer contract fixes: set this step's LR,
    zero grads, batch, forward, loss, backward, clip, optimizer step. The caller then
    advances the step counter. Returns (loss, grad norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    total_loss = 0.0
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
            total_loss += loss.item()
            (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf).item()
    # never let a non-finite value reach the weights (fp16's scaler skips inf steps by itself)
    if not math.isfinite(total_loss) or (scaler is None and not math.isfinite(grad_norm)):
        raise FloatingPointError(f"loss {total_loss}, grad norm {grad_norm}")
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total_loss, grad_norm


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
            total += loss.item()
        out[split] = total / eval_iters
    model.train()
    return out


@torch.no_grad()
def evaluate_full(model, ids, block_size, batch_size, device, ctx):
    """Mean loss over every position of ids exactly once: consecutive, non-overlapping windows,
    then the last positions that do not fill a window."""
    model.eval()
    windows = ids.unfold(0, block_size + 1, block_size)  # (n, T+1), neighbours share one token
    tail = len(ids) - 1 - len(windows) * block_size
    chunks = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    chunks += [ids[-tail - 1:][None]] if tail > 0 else []
    total, count = 0.0, 0
    for rows in chunks:  # (b, T+1)
        x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
        with ctx:
            logits, _ = model(x)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


# ----------------------------------------------------------------------------- run pieces

def load_data(path, kind="char", vocab_size=2048, tokenizer=None, clean=False):
    """(tokenizer, train tokens, val tokens, characters per val token). The tokenizer is
    reused when given (resume, fine-tuning), else built: char from the whole text, BPE
    learned from the training split only. The split is contiguous, 90/10."""
    if is_prepared(path):  # a folder from prepare.py: memory-mapped tokens
        meta, train_ids, val_ids = load_prepared(path)
        if tokenizer is not None and tokenizer.to_dict() != meta["tokenizer"]:
            raise TinyLLMError(f"{path} was prepared with a different tokenizer than the checkpoint's")
        return tokenizer_from_dict(meta["tokenizer"]), train_ids, val_ids, meta["val_chars"] / max(1, len(val_ids))
    text = load_corpus(path, clean)
    if tokenizer is None:
        tokenizer = make_tokenizer(kind, text if kind == "char" else text[:int(len(text) * 0.9)], vocab_size)
    elif hasattr(tokenizer, "unknown_chars"):
        missing = "".join(tokenizer.unknown_chars(text))
        if missing:
            raise TinyLLMError(f"{path} has characters the checkpoint's vocabulary lacks: {missing[:40]!r}")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = split_train_val(ids)
    chars_per_token = len(tokenizer.decode(val_ids.tolist())) / max(1, len(val_ids))
    return tokenizer, train_ids, val_ids, chars_per_token


def make_checkpoint(model, optimizer, model_cfg, train_cfg, tokenizer, state, preset):
    return {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model_cfg),
        "tokenizer": tokenizer.to_dict(),
        "optimizer": optimizer.state_dict(),
        "train_config": dataclasses.asdict(train_cfg),
        "preset": preset,
        "rng": rng_state(),
        **state,
    }


def write_history(history, out_dir):
    fields = ["step", "train_loss", "val_loss", "lr", "grad_norm"]
    with open(os.path.join(out_dir, "history.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    with open(os.path.join(out_dir, "history.json"), "w") as f:
        json.dump(history, f, indent=1)


def plot_history(history, out_dir, vocab_size, train_cfg):
    """loss.png (train and val, ln(V) baseline, best point), lr.png, grad_norm.png."""
    steps = [h["step"] for h in history]
    fig, ax = new_plot(height=4)
    ax.plot(steps, [h["train_loss"] for h in history], label="train")
    ax.plot(steps, [h["val_loss"] for h in history], label="val")
    ax.axhline(math.log(vocab_size), color="gray", linestyle="--", label=f"uniform ln(V) = {math.log(vocab_size):.2f}")
    best = min(history, key=lambda h: h["val_loss"])
    ax.plot([best["step"]], [best["val_loss"]], "r*", markersize=12, label=f"best val {best['val_loss']:.3f}")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    save_plot(fig, ax, os.path.join(out_dir, "loss.png"))

    plot_lr_schedule(train_cfg, os.path.join(out_dir, "lr.png"), upto=steps[-1])

    fig, ax = new_plot()
    ax.plot(steps, [h["grad_norm"] for h in history], label="grad norm (before clipping)")
    if train_cfg.grad_clip > 0:
        ax.axhline(train_cfg.grad_clip, color="gray", linestyle="--", label=f"clip at {train_cfg.grad_clip}")
    ax.set(xlabel="step", ylabel="global L2 norm", title="gradient norm")
    save_plot(fig, ax, os.path.join(out_dir, "grad_norm.png"))


def plot_lr_schedule(train_cfg, path, upto=None):
    """Draw the whole planned LR schedule; mark how far the run has got."""
    steps = range(train_cfg.max_steps + 1)
    lrs = [get_lr(s, train_cfg.lr, train_cfg.min_lr, train_cfg.warmup_steps, train_cfg.max_steps) for s in steps]
    fig, ax = new_plot()
    ax.plot(steps, lrs)
    if upto is not None:
        ax.axvline(upto, color="gray", linestyle=":", label=f"step {upto}")
    ax.set(xlabel="step", ylabel="learning rate",
           title=f"warmup {train_cfg.warmup_steps} steps, cosine {train_cfg.lr:g} -> {train_cfg.min_lr:g}")
    save_plot(fig, ax, path)


def prune_periodic(out_dir, keep_last):
    periodic = sorted(f for f in os.listdir(out_dir) if f.startswith("ckpt_") and f.endswith(".pt"))
    for name in periodic[:-keep_last]:
        os.remove(os.path.join(out_dir, name))


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to finish its step, save and exit; a second Ctrl-C aborts."""

    def __init__(self, announce=True):
        self.signum = None
        self.announce = announce

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            log(f"\n{signal.Signals(signum).name} received: finishing this step, then saving last.pt")

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "T4": 65e12, "V100": 125e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- the run

def setup_distributed(device_name):
    """(rank, world size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without
    them this is a plain single process."""
    device = choose_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_ranks_mean(values, world, device):
    """Average a list of floats over the ranks (no-op for one process)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def load_source(path):
    """The checkpoint a run starts from: one of ours (.pt), or OpenAI's GPT-2 weights by
    name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or from a Hugging Face folder."""
    if path.endswith(".pt"):
        return load_checkpoint(path)
    from hf_gpt2 import gpt2_checkpoint, load_gpt2  # needs transformers: imported only when asked
    return gpt2_checkpoint(load_gpt2(path))


def train(model_cfg, train_cfg, preset, resume=False, init_from=None, overfit_batch=False):
    """Train and return a summary dict. Configs are already validated. Under torchrun every
    rank runs this; only rank 0 prints and writes files."""
    rank, world, device = setup_distributed(train_cfg.device)
    master = rank == 0
    say = log if master else (lambda *a: None)
    out_dir = train_cfg.out_dir
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(os.path.join(out_dir, "last.pt"))
        if "optimizer" not in checkpoint or "rng" not in checkpoint:
            raise TinyLLMError(f"{out_dir}/last.pt has no training state to resume from")
        model_cfg = GPTConfig(**checkpoint["model_config"])
        train_cfg = TrainConfig(**{**checkpoint["train_config"], "device": train_cfg.device})
        preset = checkpoint.get("preset", preset)
        say(f"resuming {out_dir}/last.pt at step {checkpoint['step']} (its saved settings are used)")
    if train_cfg.batch_size % (world * train_cfg.grad_accum_steps):
        raise TinyLLMError(f"batch_size ({train_cfg.batch_size}) must be divisible by the number of processes "
                           f"({world}) times grad_accum_steps ({train_cfg.grad_accum_steps})")
    dtype = resolve_dtype(train_cfg.dtype, device)
    ctx = autocast(device, dtype)
    seed_everything(train_cfg.seed)  # the same on every rank: identical initial weights
    if device.type == "cuda":  # TF32 matmuls on GPUs that have them (on some CPUs "high" is 10x slower)
        torch.set_float32_matmul_precision("high")

    # --- data and tokenizer
    source = checkpoint or (load_source(init_from) if init_from else None)
    tokenizer = tokenizer_from_dict(source["tokenizer"]) if source else None
    tokenizer, train_ids, val_ids, chars_per_token = load_data(train_cfg.data, train_cfg.tokenizer,
                                                               model_cfg.vocab_size, tokenizer, train_cfg.clean)
    check_long_enough(train_ids, model_cfg.block_size, "train", train_cfg.data)
    check_long_enough(val_ids, model_cfg.block_size, "validation", train_cfg.data)

    # --- model and optimizer
    if source:
        model = model_from_checkpoint(source, init_from or f"{out_dir}/last.pt")
        model_cfg = model.config
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise TinyLLMError(f"the model has {model_cfg.vocab_size} token embeddings but its tokenizer "
                               f"{tokenizer.vocab_size} tokens")
    else:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
        model = GPT(model_cfg)
    model.to(device)
    optimizer = make_optimizer(model, train_cfg.lr, train_cfg.weight_decay, (train_cfg.beta1, train_cfg.beta2), device,
                               train_cfg.optimizer, train_cfg.muon_lr)
    state = {"step": 0, "best_val_loss": math.inf, "evals_without_improvement": 0, "last_eval_step": -1,
             "lr": 0.0, "grad_norm": 0.0, "history": []}  # lr and grad_norm: of the latest step, for the logs
    if resume:
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = {k: checkpoint[k] for k in state}
        set_rng_state(checkpoint["rng"])
    if world > 1:  # each rank draws its own batches (resumed runs too, from the step on)
        seed_everything(train_cfg.seed + 1000 * rank + 7919 * state["step"])
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    run_model = torch.compile(model) if train_cfg.compile else model
    if world > 1:
        run_model = DDP(run_model, device_ids=[device.index] if device.type == "cuda" else None)

    micro_batch = train_cfg.batch_size // world // train_cfg.grad_accum_steps
    tokens_per_step = train_cfg.batch_size * model_cfg.block_size
    baseline = math.log(model_cfg.vocab_size)
    say(f"device {device} ({dtype}, {torch.get_num_threads()} threads)" + (f" x {world} processes" if world > 1 else "")
        + f" | preset {preset} | data {train_cfg.data}")
    say(f"model {model.num_params():,} parameters: {model_cfg.n_layer} layers, {model_cfg.n_head} heads, "
        f"{model_cfg.n_embd} wide, block {model_cfg.block_size}, vocab {model_cfg.vocab_size} | "
        f"norm {model_cfg.norm}, mlp {model_cfg.mlp}, pos {model_cfg.pos} | optimizer {train_cfg.optimizer}")
    split = [f"{world} processes"] if world > 1 else []
    split += [f"{train_cfg.grad_accum_steps} micro-batches"] if train_cfg.grad_accum_steps > 1 else []
    say(f"tokens per step {tokens_per_step:,} = batch {train_cfg.batch_size} x block {model_cfg.block_size}"
        + (f" ({' x '.join(split)} of {micro_batch})" if split else "")
        + f" | train {len(train_ids):,} tokens, val {len(val_ids):,} tokens")

    def batches(ids):
        return lambda: get_batch(ids, micro_batch, model_cfg.block_size, device)
    train_batch, val_batch = batches(train_ids), batches(val_ids)
    if overfit_batch:
        fixed = train_batch()
        train_batch = lambda: fixed  # noqa: E731
        say("overfit_batch: training on one fixed batch; the loss should fall towards 0")
    eval_batches = {"train": train_batch, "val": val_batch}

    if master:
        os.makedirs(out_dir, exist_ok=True)
    last_path, best_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
    good_checkpoint = last_path if resume else None
    flops_per_step = model.flops_per_token() * tokens_per_step
    peak = peak_flops(device)

    def save(path):
        if master:
            save_checkpoint(path, make_checkpoint(model, optimizer, model_cfg, train_cfg, tokenizer, state, preset))

    def evaluate(step, lr, grad_norm):
        # each rank evaluates its share of the batches; the average is the same everywhere,
        # so every rank takes the same best / early-stopping decisions
        losses = estimate_loss(run_model, eval_batches, math.ceil(train_cfg.eval_iters / world), ctx)
        losses = dict(zip(losses, all_ranks_mean(list(losses.values()), world, device)))
        improved = losses["val"] < state["best_val_loss"]
        state["history"].append({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                                 "lr": lr, "grad_norm": grad_norm})
        state["last_eval_step"] = step
        if improved:
            state["best_val_loss"], state["evals_without_improvement"] = losses["val"], 0
        else:
            state["evals_without_improvement"] += 1
        return losses, improved

    # --- the loop
    step, lr, grad_norm, loss = state["step"], state["lr"], state["grad_norm"], float("nan")
    window_time, window_steps = 0.0, 0
    run_start = time.perf_counter()
    stop_reason = None
    reached_overfit = None
    with StopRequest(announce=master) as stop:
        while True:
            if (step % train_cfg.eval_interval == 0 or step == train_cfg.max_steps) and step != state["last_eval_step"]:
                losses, improved = evaluate(step, lr, grad_norm)
                ms = 1000 * window_time / max(1, window_steps)
                eta = (train_cfg.max_steps - step) * ms / 1000
                line = (f"eval {step:>6}/{train_cfg.max_steps} | train {losses['train']:.4f} | val {losses['val']:.4f}"
                        f" ({losses['val'] / chars_per_token / math.log(2):.3f} bits/char)"
                        f" | lr {lr:.2e} | grad norm {grad_norm:.3f}")
                if step == 0:
                    line += f" | uniform baseline ln(V) = {baseline:.4f}"
                elif window_steps:
                    line += f" | {ms:.1f} ms/step | {tokens_per_step / ms * 1000:,.0f} tok/s | ETA {format_seconds(eta)}"
                say(line + (" | new best" if improved else ""))
                save(last_path)
                good_checkpoint = last_path
                if improved:
                    save(best_path)
                if master:
                    write_history(state["history"], out_dir)
                if master and train_cfg.plots:
                    plot_history(state["history"], out_dir, model_cfg.vocab_size, train_cfg)
                if train_cfg.patience and state["evals_without_improvement"] >= train_cfg.patience:
                    stop_reason = (f"early stop: val loss has not improved for {train_cfg.patience} evaluations "
                                   f"(best {state['best_val_loss']:.4f} kept in {best_path})")
                    break
            if step >= train_cfg.max_steps or reached_overfit is not None:
                break

            t0 = time.perf_counter()
            lr = get_lr(step, train_cfg.lr, train_cfg.min_lr, train_cfg.warmup_steps, train_cfg.max_steps)
            try:
                loss, grad_norm = train_step(run_model, optimizer, train_batch, lr, train_cfg.grad_accum_steps,
                                             train_cfg.grad_clip, ctx, scaler)
            except FloatingPointError as e:
                raise TinyLLMError(
                    f"step {step}: non-finite values ({e}). Likely causes: learning rate too high (--lr {train_cfg.lr:g}), "
                    f"clipping off (--grad_clip {train_cfg.grad_clip:g}), or float16 overflow (--dtype bfloat16 or float32). "
                    f"Nothing non-finite was saved; last good checkpoint: {good_checkpoint or 'none'}") from None
            step += 1
            state.update(step=step, lr=lr, grad_norm=grad_norm)
            dt = time.perf_counter() - t0
            if step > 1:  # the first step pays one-time costs (compile, allocator warm-up)
                window_time, window_steps = window_time + dt, window_steps + 1
            if overfit_batch and loss < 0.01:
                reached_overfit = step
                say(f"overfit_batch: loss {loss:.4f} < 0.01 at step {step}")
            if step % train_cfg.log_interval == 0 and window_steps:
                ms = 1000 * window_time / window_steps
                line = (f"step {step:>6}/{train_cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f}"
                        f" | {ms:.1f} ms/step | {tokens_per_step / ms * 1000:,.0f} tok/s"
                        f" | ETA {format_seconds((train_cfg.max_steps - step) * ms / 1000)}")
                if peak:
                    line += f" | MFU {flops_per_step / (ms / 1000) / (peak * world) * 100:.1f}%"
                say(line)
            if train_cfg.save_interval and step % train_cfg.save_interval == 0:
                save(os.path.join(out_dir, f"ckpt_{step:07d}.pt"))
                if master:
                    prune_periodic(out_dir, train_cfg.keep_last)
            signum = torch.tensor([stop.signum or 0], device=device)
            if world > 1:  # ranks may see a signal a step apart: stop together
                dist.all_reduce(signum, op=dist.ReduceOp.MAX)
            signum = int(signum.item())
            if signum:
                save(last_path)
                say(f"saved {last_path} at step {step}. Resume with: python train.py --resume --out_dir {out_dir}")
                sys.exit(130 if signum == signal.SIGINT else 143)

    if state["last_eval_step"] != step:  # stopped early (overfit check): record where we ended
        save(last_path)
    if stop_reason:
        say(stop_reason)
    elapsed = time.perf_counter() - run_start
    say(f"done: {step} steps in {format_seconds(elapsed)} | best val loss {state['best_val_loss']:.4f} "
        f"| checkpoints in {out_dir}/ (best.pt, last.pt), history.csv, loss.png")
    if train_cfg.sample_tokens and master:
        model.eval()
        start = torch.tensor([start_ids(tokenizer)], device=device)
        out = model.generate(start, train_cfg.sample_tokens, temperature=0.8,
                             generator=torch.Generator(device).manual_seed(train_cfg.seed))
        say("sample:\n" + tokenizer.decode(out[0].tolist()))
    if world > 1:  # leave together: a rank that tears down early can abort the others
        dist.barrier()
        dist.destroy_process_group()
    return {"step": step, "best_val_loss": state["best_val_loss"], "history": state["history"],
            "elapsed": elapsed, "overfit_step": reached_overfit, "model": model}


def evaluate_checkpoint(path, data, device_name, batch_size):
    """--eval_only: loss, perplexity and bits per character over the whole val split."""
    device = choose_device(device_name)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path).to(device)
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    data = data or checkpoint.get("train_config", {}).get("data", "data/input.txt")
    _, _, val_ids, chars_per_token = load_data(data, tokenizer=tokenizer)
    check_long_enough(val_ids, 1, "validation", data)
    val_ids = torch.as_tensor(np.asarray(val_ids, dtype=np.int64))
    loss = evaluate_full(model, val_ids, model.config.block_size, batch_size, device, autocast(device, "float32"))
    bpc = loss / chars_per_token / math.log(2)
    log(f"{path} on the val split of {data} ({len(val_ids):,} tokens, every position once):")
    log(f"loss {loss:.4f} nats/token | perplexity {math.exp(loss):.3f} | {bpc:.4f} bits per character")
    return {"loss": loss, "perplexity": math.exp(loss), "bpc": bpc}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a GPT language model on a text file.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default=None, help="tiny, small, medium, ... (default: tiny on CPU, small on CUDA)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt exactly")
    parser.add_argument("--init_from", default=None, metavar="PATH.pt",
                        help="start from this checkpoint's weights with a fresh optimizer (fine-tuning)")
    parser.add_argument("--overfit_batch", action="store_true", help="sanity check: train on one fixed batch")
    parser.add_argument("--eval_only", nargs="?", const="", default=None, metavar="PATH.pt",
                        help="evaluate a checkpoint (default OUT_DIR/best.pt) over the whole val split and exit")
    parser.add_argument("--plot_lr", action="store_true", help="draw the LR schedule to OUT_DIR/lr_schedule.png and exit")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    run_args = {k: getattr(args, k) for k in ("preset", "resume", "init_from", "overfit_batch", "eval_only", "plot_lr")}
    for k in run_args:
        delattr(args, k)

    device = choose_device(args.device or "auto")
    preset = run_args["preset"] or default_preset(device.type)
    if not run_args["preset"] and os.environ.get("RANK", "0") == "0":
        log(f"no --preset given: using '{preset}' for {device.type}")
    model_cfg, train_cfg = build_configs(args, preset)
    if train_cfg.tokenizer == "bpe" and args.vocab_size is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=2048)  # the BPE vocabulary to learn
    if run_args["eval_only"] is not None:
        path = run_args["eval_only"] or os.path.join(train_cfg.out_dir, "best.pt")
        evaluate_checkpoint(path, args.data, train_cfg.device, train_cfg.batch_size)
    elif run_args["plot_lr"]:
        path = os.path.join(train_cfg.out_dir, "lr_schedule.png")
        plot_lr_schedule(train_cfg, path)
        log(f"wrote {path}")
    else:
        train(model_cfg, train_cfg, preset, run_args["resume"], run_args["init_from"], run_args["overfit_batch"])


if __name__ == "__main__":
    run_cli(main)
