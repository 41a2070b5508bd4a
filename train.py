"""Train a GPT on a text file: the lesson, top to bottom.

    python train.py     # data/input.txt (Shakespeare): preset tiny on a CPU (5 minutes), small on a GPU (config.py)
    python train.py --preset small --max_steps 50 --seed 1

build makes the batches, the model and the optimizer; train_step takes one optimizer step;
train_loop repeats it, evaluating now and then (estimate_loss). What keeps a run safe on every
machine is a call into machinery/ whose comment says what it does: take it at its word.
"""

import machinery.openmp  # noqa: F401 (before torch loads: OpenMP's idle threads soon sleep)

import dataclasses

import torch

from model import GPT
from optim import get_lr, make_optimizer, set_lr
from utils import get_batch

from machinery import cli, device, distributed, lifecycle, train_cli


# ----------------------------------------------------------------------------- the data, the model, the optimizer

def build(run):
    """The batches, the GPT and its optimizer, stored on run (a lifecycle.Run, which holds the
    run's settings: train_cfg, model_cfg, device, world, the number of processes)."""
    cfg = run.train_cfg
    # the text (cfg.data) as token ids, split 90/10 into train and val (utils.tokenize); a resumed
    # or fine-tuned run also gets its checkpoint's GPT (and tokenizer) back, a fresh run None
    corpus, model = lifecycle.load_data(run)
    if model is None:  # a fresh GPT: random weights, one embedding row per token of the tokenizer
        model = GPT(dataclasses.replace(run.model_cfg, vocab_size=corpus.tokenizer.vocab_size))
    run.model = model.to(run.device)
    run.optimizer = make_optimizer(run.model, cfg, run.device)  # AdamW: optim.py
    # batches: random windows of block_size tokens, y one token ahead of x. Each process takes
    # its share of batch_size, in grad_accum_steps micro-batches
    block_size, micro_batch = model.config.block_size, cfg.batch_size // run.world // cfg.grad_accum_steps
    run.next_batch = lambda: get_batch(corpus.train, micro_batch, block_size, run.device)
    run.val_batch = lambda: get_batch(corpus.val, micro_batch, block_size, run.device)


# ----------------------------------------------------------------------------- one optimizer step

def train_step(model, optimizer, next_batch, lr, grad_accum_steps, grad_clip, ctx, scaler=None):
    """One optimizer step, in the order that is the lesson. Returns the batch's loss and the
    gradient norm before clipping as tensors: reading their values makes a GPU wait, so the loop
    reads them only now and then. ctx: the forward pass's precision (an autocast; nothing for
    float32); scaler: float16's loss scaling, a torch.amp.GradScaler (None for other dtypes)."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # disabled: its calls below do nothing but opt.step()
    set_lr(optimizer, lr)                                    # 1. this step's learning rate
    optimizer.zero_grad(set_to_none=True)                    # 2. forget the last step's gradients
    batch_loss = 0.0                                         # the batch's mean loss: each micro-batch adds its share
    for micro_step in range(grad_accum_steps):               # a batch may come in micro-batches
        x, y = next_batch()                                  # 3. a batch: y is x shifted by one token
        with distributed.sync_gradients(model, micro_step == grad_accum_steps - 1):  # DDP: average at the last (else a no-op)
            with ctx:
                _, loss = model(x, y)                        # 4. forward, 5. the loss
            loss = loss / grad_accum_steps                   # the micro-batches' gradients add up to the batch's
            scaler.scale(loss).backward()                    # 6. backward (float16 scales the loss up first: no underflow)
        batch_loss = batch_loss + loss.detach()
    scaler.unscale_(optimizer)                               # (float16: the scale divided back out)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))  # 7. clip (0: measure only)
    scaler.step(optimizer)                                   # 8. update the weights (not if a gradient is inf or NaN)
    scaler.update()                                          # (float16: the scale adapts)
    return batch_loss, grad_norm


# ----------------------------------------------------------------------------- the loop

def train(model_cfg, train_cfg, options=None, preset="custom", given=None):
    """Train; return a summary dict. Under torchrun every rank runs this; rank 0 alone prints and writes."""
    return train_loop(setup_run(model_cfg, train_cfg, options, preset, given))


def setup_run(model_cfg, train_cfg, options=None, preset="custom", given=None):
    """A run ready for its first step: start_run (the device and precision, seeds, the run folder,
    the checkpoint a resume or fine-tune starts from), build, ready (a resume's optimizer, progress
    and random state; --compile, DDP; --dtype auto's trial steps; the start-up lines)."""
    run = lifecycle.start_run(model_cfg, train_cfg, options, preset, given)
    build(run)
    lifecycle.ready(run, train_step)
    return run


def train_loop(run):
    """Evaluate now and then, take optimizer steps, report. The loop ends at max_steps, or on
    run.stop_reason: an early stop (--patience, --target_loss), --overfit_batch done, or Ctrl-C or
    SIGTERM (run.signum: finish saves, then exits). A --time_budget run moves max_steps as it trains."""
    cfg, state = run.train_cfg, run.state  # state: the step, the best val loss, ... (every checkpoint saves it)
    # the model as the steps call it (compiled, or wrapped for DDP, when asked); its precision
    # (train_step's ctx and scaler); eval_iters: this process's share of cfg.eval_iters
    model, ctx, scaler = run.train_model, run.ctx, run.scaler
    batches = {"train": run.next_batch, "val": run.val_batch}
    with lifecycle.guarded(run):  # Ctrl-C or SIGTERM: finish the step, then stop; out of memory: one error line
        while True:
            # --- every eval_interval steps and at the end: evaluate, save, maybe stop early
            due = state.step % cfg.eval_interval == 0 or state.step == cfg.max_steps
            if due and not run.signum and state.step != state.last_eval_step:  # (not after Ctrl-C; nor twice)
                with lifecycle.evaluating(run):  # not step time: a time budget plans with how long it takes
                    losses = estimate_loss(model, batches, run.eval_iters, ctx)
                    lifecycle.after_evaluation(run, losses)  # a line; last.pt, best.pt; --patience, --target_loss
            if state.step >= cfg.max_steps or run.stop_reason:
                break

            # --- one optimizer step, at the schedule's learning rate (decay_from: where max_steps moved, else None)
            lr = get_lr(state.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, state.decay_from)
            loss, grad_norm = train_step(model, run.optimizer, run.next_batch, lr, cfg.grad_accum_steps,
                                         cfg.grad_clip, ctx, scaler)
            state.step += 1
            # a progress line every log_interval steps (a loss that is not finite stops the run with an
            # error there), a ckpt_STEP.pt every save_interval; a time budget's new max_steps; Ctrl-C
            lifecycle.after_step(run, loss, grad_norm, lr)
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
        with device.out_of_memory_as_error(f"out of memory: {lifecycle.OUT_OF_MEMORY}"):  # one error line
            train(model_cfg, train_cfg, options, preset, given)


if __name__ == "__main__":
    cli.run_cli(main)  # bad input: one error: line and exit status 2, never a traceback
