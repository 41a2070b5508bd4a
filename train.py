"""Train a GPT on a text file: the lesson, top to bottom.

    python train.py                            # the bundled Shakespeare, with the preset that suits the device
    python train.py --preset small --max_steps 50 --seed 1

The story: build the data, the model and the optimizer (build); take one optimizer step
(train_step); repeat it in a loop that evaluates now and then (train_loop); estimate the loss
(estimate_loss). A call into machinery/ carries its module's name (lifecycle., sources., ...):
what keeps a run safe on every machine (resume, checkpoints, Ctrl-C, precision, DDP) is one
line away. Every flag: python train.py --help, and the README.
"""

import machinery.openmp  # noqa: F401 (before torch loads: OpenMP's idle threads soon sleep)

import dataclasses
import math
import sys

import torch

from config import RunOptions
from model import GPT
from optim import get_lr, make_optimizer, set_lr
from utils import get_batch

from machinery import cli, device, distributed, lifecycle, schedule, sources, train_cli


# ----------------------------------------------------------------------------- the data, the model, the optimizer

def build(run):
    """The token streams and their batches, the GPT and its optimizer, stored on run (the run's
    settings and state: lifecycle.Run declares every field). A fresh run learns its tokenizer from
    the text and starts from random weights; a resumed or fine-tuned run starts from its
    checkpoint's model and tokenizer."""
    cfg = run.train_cfg
    model, tokenizer = lifecycle.starting_point(run)  # (None, None) for a fresh run
    # text -> token ids -> a contiguous 90/10 train/val split: a utils.Corpus (utils.tokenize; where the
    # text comes from, a corpus prepared on disk, the characters a fine-tune adds: sources.py).
    # vocab_size is BPE's target size; the GPT's own comes from the tokenizer (below)
    run.corpus = sources.load_corpus(cfg, tokenizer, run.model_cfg.vocab_size, extend=bool(run.options.init_from))
    block_size = (model.config if model else run.model_cfg).block_size
    sources.check_splits(run.corpus, block_size, cfg.data)  # each split holds one window at least
    if model is None:  # a fresh GPT: random weights, one embedding row per token of the tokenizer
        model = GPT(dataclasses.replace(run.model_cfg, vocab_size=run.corpus.tokenizer.vocab_size))
    elif run.corpus.added:  # characters the checkpoint never saw: a new embedding row each
        lifecycle.add_characters(run, model, tokenizer)
    run.model_cfg, run.tokenizer = model.config, run.corpus.tokenizer
    run.model = model.to(run.device)
    run.optimizer = make_optimizer(run.model, cfg, run.device)  # AdamW (or --optimizer muon): optim.py
    # batches: random windows of block_size tokens, y one token ahead of x; each process takes
    # its share of batch_size, in grad_accum_steps micro-batches
    run.micro_batch = cfg.batch_size // run.world // cfg.grad_accum_steps
    run.next_batch = lambda: get_batch(run.corpus.train, run.micro_batch, block_size, run.device)
    run.val_batch = lambda: get_batch(run.corpus.val, run.micro_batch, block_size, run.device)


# ----------------------------------------------------------------------------- one optimizer step

def train_step(model, optimizer, next_batch, lr, grad_accum_steps, grad_clip, ctx, scaler=None):
    """One optimizer step, in the order that is the lesson. Returns (loss, gradient norm before
    clipping) as tensors, which the loop reads only now and then: a GPU need not wait each step.
    ctx: the forward pass's autocast; scaler: float16's torch.amp.GradScaler (float32: no-ops)."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # disabled: scaler.step(opt) is opt.step()
    set_lr(optimizer, lr)                                    # 1. this step's learning rate
    optimizer.zero_grad(set_to_none=True)                    # 2. forget the last step's gradients
    batch_loss = 0.0                                         # the batch's mean loss: each micro-batch adds its share
    for micro_step in range(grad_accum_steps):               # a batch may come in micro-batches
        x, y = next_batch()                                  # 3. a batch: y is x shifted by one token
        with distributed.sync_gradients(model, micro_step == grad_accum_steps - 1):  # DDP: average once, after the last
            with ctx:
                _, loss = model(x, y)                        # 4. forward, 5. the loss
            loss = loss / grad_accum_steps                   # the micro-batches' gradients add up to the batch's
            # 6. backward; float16 scales the loss up first, so that small gradients do not underflow
            scaler.scale(loss).backward()
        batch_loss = batch_loss + loss.detach()
    scaler.unscale_(optimizer)                               # (float16: divide the scale back out)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)  # 7. clip
    # 8. update the weights; a step whose gradients are not finite is skipped (optim.make_optimizer)
    scaler.step(optimizer)
    scaler.update()                                          # (float16: the scale adapts)
    return batch_loss, grad_norm


# ----------------------------------------------------------------------------- the loop

def train(model_cfg, train_cfg, options=None, preset="custom", given=None):
    """Train; return a summary dict. Under torchrun every rank runs this; rank 0 alone prints and writes."""
    return train_loop(setup_run(model_cfg, train_cfg, options, preset, given))


def setup_run(model_cfg, train_cfg, options=None, preset="custom", given=None):
    """A run ready for its first step (lifecycle.Run declares its fields): the device, the folder, resume;
    build; run.train_model, the model as the steps call it (compiled or DDP-wrapped, when asked); run.ctx and
    run.scaler, the precision (--dtype auto on a CPU: measured with trial train_steps); the start-up lines."""
    run = lifecycle.start_run(model_cfg, train_cfg, options or RunOptions(), preset, given or {})
    with device.out_of_memory_as_error(run.oom_hint):  # one error line saying what to try
        build(run)
        lifecycle.ready(run, train_step)
    return run


def train_loop(run):
    """Evaluate now and then, take optimizer steps, report. It ends at max_steps (a time budget plans it), on
    run.stop_reason, on a stop signal, or with the error lifecycle.settle raises on a loss that is not finite."""
    cfg, state = run.train_cfg, run.state  # state: the step, the best val loss, ... (saved in every checkpoint)
    batches = {"train": run.next_batch, "val": run.val_batch}
    with lifecycle.guarded(run) as stop:  # Ctrl-C or SIGTERM sets stop.signum; the loop looks after each step
        while True:
            # --- every eval_interval steps and at the end: evaluate, checkpoint, maybe stop early
            due = state.step % cfg.eval_interval == 0 or state.step == cfg.max_steps
            if due and state.step != state.last_eval_step:  # (a resumed run may have evaluated here already)
                with lifecycle.off_the_clock(run, evaluation=True):  # evaluating and saving is not step time
                    losses = estimate_loss(run.train_model, batches, run.eval_iters, run.ctx)
                    val_loss = lifecycle.after_evaluation(run, losses)  # a line, history, last.pt (best.pt), plots
                run.stop_reason = run.stop_reason or lifecycle.early_stop(run, val_loss)  # --patience, --target_loss
            if state.step >= cfg.max_steps or run.stop_reason:
                break

            # --- one optimizer step, at the schedule's learning rate
            lr = get_lr(state.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            if state.decay_from:  # the end moved (a time budget, a resume with new --max_steps): a deep dive
                lr = schedule.stretched_lr(state.step, cfg, state.decay_from)
            loss, grad_norm = train_step(run.train_model, run.optimizer, run.next_batch, lr, cfg.grad_accum_steps,
                                         cfg.grad_clip, run.ctx, run.scaler)
            state.step += 1

            # --- progress lines, where settle reads the losses (not finite: an error), and ckpt_STEP.pt files
            lifecycle.after_step(run, loss, grad_norm, lr)
            run.stop_reason = run.stop_reason or lifecycle.overfit_reached(run)  # --overfit_batch: the loss is near 0

            # --- a --time_budget run (or --replans, a replay of one): planned once its first steps are timed
            #     (until then max_steps reaches at least one step past them), re-planned at every progress line
            if lifecycle.plan_due(run):
                lifecycle.plan_time_budget(run)  # max_steps: the most steps that fit; the cosine stretches to end there

            # --- Ctrl-C or SIGTERM (DDP: seen at progress lines): save last.pt, exit with the signal's code (130, 143)
            signum = lifecycle.stop_signal(run, stop)
            if signum:
                lifecycle.save_for_resume(run)
                sys.exit(128 + signum)
    return lifecycle.finish(run)  # the last save, a summary line, a sample of what the model writes now


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


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    options, model_cfg, train_cfg, preset, given = train_cli.parse_flags(argv)  # the flags on top of a preset
    if not train_cli.other_mode(options, train_cfg, given):  # --eval_only, --plot_lr: no training
        train(model_cfg, train_cfg, options, preset, given)


if __name__ == "__main__":
    cli.run_cli(main)  # bad input: one error: line and exit status 2, never a traceback
