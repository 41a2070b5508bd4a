"""Train a GPT on a text file: the lesson, top to bottom.

    python train.py                            # the bundled Shakespeare, with the preset that suits the device
    python train.py --preset small --max_steps 50
    python train.py --resume                   # continue checkpoints/last.pt, or start it if there is none
    python train.py --init_from checkpoints/best.pt --data notes.txt --out_dir checkpoints/notes   # fine-tune

The story: build the data, the model and the optimizer (build); take one optimizer step
(train_step); repeat it in a loop that evaluates now and then (train_loop); evaluate
(estimate_loss, evaluate_full). What keeps a run safe on every machine (resume, checkpoints,
progress lines, Ctrl-C, precision, several processes) is one call away, imported from
machinery/ by name. Every flag: python train.py --help.
"""

import machinery.openmp  # noqa: F401 (before torch loads: OpenMP's idle threads soon sleep)

import dataclasses
import math
import os
import sys

import numpy as np
import torch

from config import (PRESETS, GPTConfig, RunOptions, TrainConfig, build_configs, default_preset, make_config,
                    preset_defaults)
from model import GPT, lm_loss
from optim import get_lr, make_optimizer, set_lr
from utils import get_batch

from machinery import cli
from machinery.checkpoint import load_model
from machinery.device import choose_device, out_of_memory_as_error, set_threads
from machinery.distributed import sync_gradients
from machinery.lifecycle import (add_characters, after_evaluation, after_step, early_stop, finish,
                                 guarded, off_the_clock, overfit_reached, plan_due, plan_time_budget, ready,
                                 save_for_resume, start_run, starting_point, stop_signal)
from machinery.plots import draw_lr_schedule
from machinery.sources import check_long_enough, load_corpus, validation_split
from machinery.schedule import on_the_schedule
from machinery.precision import autocast, measured_on, resolve_dtype


# ----------------------------------------------------------------------------- the data, the model, the optimizer

def build(run):
    """The token streams and their batches, the GPT and its optimizer. A fresh run learns its
    tokenizer from the text and starts from random weights; a resumed or fine-tuned run starts
    from its checkpoint's model and tokenizer."""
    cfg = run.train_cfg
    model, tokenizer = starting_point(run)  # (None, None) for a fresh run
    # text -> token ids -> a contiguous 90/10 train/val split (utils.tokenize; where the text comes
    # from, and the characters a fine-tune adds to its checkpoint's tokenizer: sources.py)
    run.corpus = load_corpus(cfg, tokenizer, run.model_cfg.vocab_size, extend=bool(run.options.init_from))
    block_size = (model.config if model else run.model_cfg).block_size
    check_long_enough(run.corpus.train, block_size, "train", cfg.data)
    check_long_enough(run.corpus.val, block_size, "validation", cfg.data)
    if model is None:  # a fresh GPT: random weights, one embedding row per token of the tokenizer
        model = GPT(dataclasses.replace(run.model_cfg, vocab_size=run.corpus.tokenizer.vocab_size))
    elif run.corpus.added:  # characters the checkpoint never saw: a new embedding row each
        add_characters(run, model, tokenizer)
    run.model_cfg, run.tokenizer = model.config, run.corpus.tokenizer
    run.model = model.to(run.device)
    run.optimizer = make_optimizer(run.model, cfg, run.device)  # AdamW: weight decay on matrices only
    # batches: random windows of block_size tokens, y one token ahead of x; each process takes
    # its share of batch_size, in grad_accum_steps micro-batches
    run.micro_batch = cfg.batch_size // run.world // cfg.grad_accum_steps
    run.next_batch = lambda: get_batch(run.corpus.train, run.micro_batch, block_size, run.device)
    run.val_batch = lambda: get_batch(run.corpus.val, run.micro_batch, block_size, run.device)


# ----------------------------------------------------------------------------- one optimizer step

def train_step(model, optimizer, next_batch, lr, grad_accum_steps, grad_clip, ctx, scaler=None):
    """One optimizer step, in the order that is the lesson. Returns (loss, gradient norm
    before clipping) as tensors, so nothing here waits for a GPU. ctx is the forward pass's
    autocast (a no-op in float32). scaler is float16's torch.amp.GradScaler; without one
    (float32, bfloat16) a disabled scaler stands in, and each of its calls below does nothing
    but optimizer.step()."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    set_lr(optimizer, lr)                                    # 1. this step's learning rate
    optimizer.zero_grad(set_to_none=True)                    # 2. forget the last step's gradients
    loss_sum = 0.0
    for micro_step in range(grad_accum_steps):               # a batch may come in micro-batches
        x, y = next_batch()                                  # 3. a batch: y is x shifted by one token
        with sync_gradients(model, micro_step == grad_accum_steps - 1):  # DDP: average over processes once
            with ctx:
                _, loss = model(x, y)                        # 4. forward, 5. the loss
            loss = loss / grad_accum_steps                   # the micro-batches' gradients add up to the batch's
            scaler.scale(loss).backward()                    # 6. backward (float16: of the loss times the scale,
        loss_sum = loss_sum + loss.detach()                  #    so that small gradients do not underflow)
    scaler.unscale_(optimizer)                               # (float16: divide the scale back out)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)  # 7. clip
    scaler.step(optimizer)                                   # 8. update the weights (skipped if a gradient is
    scaler.update()                                          #    not finite; float16: the scale adapts)
    return loss_sum, grad_norm


# ----------------------------------------------------------------------------- the loop

def train(model_cfg, train_cfg, options=None, preset="custom", given=None):
    """Train and return a summary dict. Under torchrun every rank runs this; only rank 0
    prints and writes files. given: the flags set on the command line."""
    return train_loop(setup_run(model_cfg, train_cfg, options, preset, given))


def setup_run(model_cfg, train_cfg, options=None, preset="custom", given=None):
    """A run ready for its first step."""
    run = start_run(model_cfg, train_cfg, options or RunOptions(), preset, given or {})  # device, folder, resume
    with out_of_memory_as_error(run.oom_hint):  # one error line saying what to try
        build(run)
        ready(run, train_step)  # a resumed run's state, DDP, precision measured with trial steps, the start-up lines
    return run


def train_loop(run):
    """Evaluate now and then, take optimizer steps, report. Each line that ends the loop or moves
    its end is here: max_steps (planned and re-planned for a time budget), an early stop, a stop
    signal; a loss that is not finite ends it with an error where the losses are read (below)."""
    cfg, state = run.train_cfg, run.state
    batches = {"train": run.next_batch, "val": run.val_batch}
    with guarded(run) as stop:  # Ctrl-C or SIGTERM sets stop.signum; the step under way finishes first
        while True:
            # --- every eval_interval steps and at the end: evaluate, checkpoint, maybe stop early
            due = state.step % cfg.eval_interval == 0 or state.step == cfg.max_steps
            if due and state.step != state.last_eval_step:  # (a resumed run may have evaluated here already)
                with off_the_clock(run, evaluation=True):  # evaluating and saving is not step time
                    losses = estimate_loss(run.train_model, batches, run.eval_iters, run.ctx)
                    val_loss = after_evaluation(run, losses)  # a line, history, last.pt (best.pt), plots
                run.stop_reason = early_stop(run, val_loss)  # --patience or --target_loss met: why, else None
            if state.step >= cfg.max_steps or run.stop_reason:
                break

            # --- one optimizer step; once a re-plan has moved the end, at get_lr's stretched cosine
            step, peak = on_the_schedule(state.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, state.decay_from)
            lr = get_lr(step, peak, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            loss, grad_norm = train_step(run.train_model, run.optimizer, run.next_batch, lr, cfg.grad_accum_steps,
                                         cfg.grad_clip, run.ctx, run.scaler)
            state.step += 1

            # --- a progress line every log_interval steps, ckpt_STEP.pt if asked. Reading the losses from the
            #     device (settle) stops the run with an error on one that is not finite, before any save
            after_step(run, loss, grad_norm, lr)
            run.stop_reason = overfit_reached(run)  # --overfit_batch: the loss is near 0

            # --- a --time_budget run: planned once its first steps are timed, re-planned at every progress line
            if plan_due(run):
                plan_time_budget(run)  # max_steps: the most steps that fit; the LR's cosine is stretched to end there

            # --- Ctrl-C or SIGTERM: save last.pt and leave, with the signal's exit code (130, 143)
            signum = stop_signal(run, stop)
            if signum:
                save_for_resume(run)
                sys.exit(128 + signum)
    return finish(run)  # the last save, a summary line, a sample of what the model writes now


# ----------------------------------------------------------------------------- evaluation

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
        total = total + lm_loss(logits, y, reduction="sum")
        count += y.numel()
    return total.item() / count


def evaluate_checkpoint(path, data, device_name, batch_size, threads=0):
    """--eval_only: loss, perplexity and bits per character over the whole val split."""
    device = choose_device(device_name)
    set_threads(threads)
    model, tokenizer, checkpoint = load_model(path)
    model.to(device)
    corpus, data = validation_split(checkpoint, tokenizer, data)  # the split the run was validated on
    val_ids = torch.as_tensor(np.asarray(corpus.val, dtype=np.int64))
    loss = evaluate_full(model, val_ids, model.config.block_size, batch_size, device, autocast(device, "float32"))
    bpc = loss / corpus.chars_per_token / math.log(2)
    cli.log(f"{path} on the val split of {data} ({len(val_ids):,} tokens, every position once):")
    cli.log(f"loss {loss:.4f} nats/token | perplexity {math.exp(loss):.3f} | {bpc:.4f} bits per character")
    return {"loss": loss, "perplexity": math.exp(loss), "bpc": bpc}


# ----------------------------------------------------------------------------- command line

def build_parser(device):
    preset = default_preset(device.type)
    if device.type == "cuda":  # (asking the GPU would start CUDA in every process, --device cpu or not)
        dtype = "bfloat16 from compute capability 8.0, else float16"
    else:
        dtype = "measured at start-up here" if measured_on(device) else f"{resolve_dtype('auto', device)} here"
    auto = {"device": ("auto", f"{device.type} here"), "dtype": ("auto", dtype),
            "threads": (0, f"{set_threads(0)} here"), "preset": (preset, f"on this machine ({device.type})")}
    parser = cli.ArgumentParser(
        description="Train a GPT language model on a text file.",
        epilog=f"Presets: {', '.join(PRESETS)}. Without --preset this machine uses '{preset}', and the defaults "
               f"shown are that preset's where it sets them. Flags override the preset.")
    cli.add_config_flags(parser, RunOptions, auto, title="what to do")
    cli.add_config_flags(parser, GPTConfig, preset_defaults(preset, auto), title="model (GPTConfig)")
    cli.add_config_flags(parser, TrainConfig, preset_defaults(preset, auto), title="training (TrainConfig)")
    return parser


def main(argv=None):
    parser = build_parser(choose_device("auto"))
    given = cli.explicit_flags(parser.parse_args(argv))
    options = make_config(RunOptions, given)
    device = choose_device(given.get("device", "auto"))
    preset = options.preset or default_preset(device.type)
    if not options.preset and os.environ.get("RANK", "0") == "0" and not options.resume:
        cli.log(f"no --preset given: using '{preset}' for {device.type}")
    model_cfg, train_cfg = build_configs(given, preset)
    if options.eval_only is not None:
        path = options.eval_only or os.path.join(train_cfg.out_dir, "best.pt")
        evaluate_checkpoint(path, given.get("data"), train_cfg.device, train_cfg.batch_size, train_cfg.threads)
    elif options.plot_lr:
        draw_lr_schedule(train_cfg)
    else:
        train(model_cfg, train_cfg, options, preset, given)


if __name__ == "__main__":
    cli.run_cli(main)
