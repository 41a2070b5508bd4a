"""Train a GPT on a text file: the lesson, top to bottom.

    python train.py     # data/input.txt: preset tiny on a CPU (five minutes), small on a GPU
    python train.py --preset small --max_steps 50 --seed 1

In order: one step and an evaluation; the set-up, the loop, its progress lines, evaluations and
saves, the end. machinery/training.py holds the set-up's parts and the time budget's clock.
"""

import machinery  # noqa: F401 (first, before torch: it notes the start time, calms OpenMP)

# isort: split
import contextlib
import math
import os
import sys
from dataclasses import asdict

import torch

from config import MAX_SEED, RunOptions, TinyLLMError
from machinery import checkpoint, cli, ddp, plots, training
from machinery import device as devices
from machinery.training import Run, TrainState
from optim import get_lr, make_optimizer
from utils import bits_per_char

# ------------------------------------------------------------------------- one step, an evaluation


def train_step(model, optimizer, next_batch, lr, grad_accum_steps, grad_clip, ctx, scaler=None):
    """One optimizer step. Its figures stay tensors: reading one makes a GPU wait, so the loop
    reads them later. A new figure is a new entry here: it reaches the progress line and history."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # disabled: its calls do nothing
    # fmt: off
    for group in optimizer.param_groups:           # 1. this step's learning rate
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)          # 2. forget the last step's gradients
    batch_loss = 0.0
    for micro_step in range(grad_accum_steps):     # a batch may come in micro-batches
        x, y = next_batch()                        # 3. a batch: y is x shifted by one token
        # DDP averages the gradients once a step, at the last micro-batch
        last = micro_step == grad_accum_steps - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if last else model.no_sync():
            with ctx:
                _, loss = model(x, y)              # 4. forward, 5. the loss
            loss = loss / grad_accum_steps         # the micro-batches' gradients add up
            scaler.scale(loss).backward()          # 6. backward (float16 scales: no underflow)
        batch_loss = batch_loss + loss.detach()
    scaler.unscale_(optimizer)
    # 7. clip the gradient's norm (grad_clip 0: only measure it)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    scaler.step(optimizer)                         # 8. update the weights (float16: not if inf)
    # fmt: on
    scaler.update()
    return {"loss": batch_loss, "lr": lr, "grad_norm": grad_norm}


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, ctx):
    """Mean loss over eval_iters random batches of each split, in eval mode (no dropout)."""
    model.eval()
    out = {}
    for split, next_batch in batches.items():
        total = 0.0
        for _ in range(eval_iters):
            x, y = next_batch()
            with ctx:
                total = total + model(x, y)[1]
        out[split] = total.item() / eval_iters  # one wait for the device per split
    model.train()
    return out


# -------------------------------------------------------------------------------- set-up, the loop


def train(model_cfg, cfg, options=None, preset="custom", given=None, clock=None):
    """Train; return a summary. Under torchrun every rank runs this; rank 0 alone prints, writes.
    clock() gives this process's seconds so far (a time budget counts them): from now if None."""
    with devices.out_of_memory_as_error(
        "out of memory: try a smaller --batch_size or model, or --grad_accum_steps 2"
    ):
        return train_loop(
            set_up(
                model_cfg,
                cfg,
                options or RunOptions(),
                preset,
                given or {},
                clock or machinery.stopwatch(),
            )
        )


def set_up(model_cfg, cfg, options, preset, given, clock):
    """Everything before the first step, in order, each input checked before the run writes
    anything: machinery/training.py's functions."""
    rank, world, device = ddp.setup(devices.choose_device(cfg.device))
    say = cli.log if rank == 0 else (lambda text: None)
    model_cfg, cfg, preset, source, path, resumed = training.settings(
        model_cfg, cfg, options, preset, given, world, say
    )
    devices.set_threads(cfg.threads)
    devices.seed_everything(cfg.seed)  # the same initial weights on every rank
    corpus, model, adapter = training.data_and_model(model_cfg, cfg, source, path, options, say)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg, device)  # optim.py
    state = TrainState()
    if resumed:  # the state, the optimizer's moments and the random generators as saved
        state = training.restore(source, optimizer, cfg, rank, world, say)
    if world > 1 and len(source.get("rngs", []) if resumed else []) != world:
        # each rank draws its own batches
        devices.seed_everything((cfg.seed + 1000 * rank + 7919 * state.step) % (MAX_SEED + 1))
    train_model = ddp.wrap(torch.compile(model) if cfg.compile else model, world, device)
    batches = training.make_batches(corpus, model.config.block_size, cfg, world, device)
    if options.overfit_batch:  # a sanity check: every step trains on one batch
        fixed = batches["train"]()
        batches["train"] = lambda: fixed
        say(
            "overfit_batch: training on one fixed batch, writing nothing; "
            "the loss should fall towards 0"
        )
    budget = training.run_length(cfg, clock, world, device)
    run = Run(
        cfg,
        options,
        preset,
        rank,
        world,
        device,
        corpus,
        model,
        train_model,
        optimizer,
        batches,
        state,
        clock,
        budget,
        adapter,
    )
    training.set_precision(run, source if resumed else {}, trial_step)
    training.print_header(run)
    if options.overwrite and run.master and run.writes and not resumed:  # the old run's go now
        checkpoint.clear_out_dir(cfg.out_dir)
    if cfg.time_budget and cfg.sample_tokens:  # a budget keeps the closing sample's time free
        budget.sample_seconds = training.time_closing_sample(run)
    return run


def trial_step(run, ctx, scaler):
    """A step at the peak LR: --dtype auto times such steps, --compile tries one."""
    cfg = run.cfg
    return train_step(
        run.train_model,
        run.optimizer,
        run.batches["train"],
        cfg.lr,
        cfg.grad_accum_steps,
        cfg.grad_clip,
        ctx,
        scaler,
    )


def train_loop(run):
    """Evaluate now and then and take steps until the run's end or an early stop."""
    cfg, state, budget = run.cfg, run.state, run.budget
    run.line = (state.step, run.clock())
    stop_reason, signum = None, 0
    with cli.StopRequest(announce=run.master) as stop:
        while True:
            at_end = budget.over(state)
            # evaluate every eval_interval steps (under a time budget, if time is left for steps
            # after it) and at the end, never twice at one step (a resume starts at its last one)
            due = at_end or (state.step % cfg.eval_interval == 0 and budget.room_for_eval(state))
            if due and state.step != state.last_eval_step:
                stop_reason = evaluate(run) or stop_reason  # --patience, --target_loss
            # Ctrl-C or SIGTERM on any rank stops all; under DDP they compare at progress lines
            if run.world == 1 or state.step % cfg.log_interval == 0 or at_end or stop_reason:
                signum = max(ddp.every_rank(stop.signum or 0, run.world))
            if at_end or stop_reason or signum:
                break

            # one step at the schedule's learning rate: by how far the run is, in steps or time
            state.progress = budget.progress(state)
            lr = get_lr(state.step, state.progress, cfg)
            figures = train_step(
                run.train_model,
                run.optimizer,
                run.batches["train"],
                lr,
                cfg.grad_accum_steps,
                cfg.grad_clip,
                run.ctx,
                run.scaler,
            )
            state.window.append(figures)
            state.step += 1

            if state.step % cfg.log_interval == 0:
                stop_reason = log_progress(run)  # --overfit_batch done
            if cfg.save_interval and state.step % cfg.save_interval == 0 and run.writes:
                with paused(run):
                    save(run, f"ckpt_{state.step:07d}.pt")
                if run.master:
                    checkpoint.keep_newest(cfg.out_dir, cfg.keep_last)
    if signum:
        stop_reason = f"stopped by signal {signum}"
    return finish(run, stop_reason, signum)


# ---------------------------------------------------------------------------------- progress lines


def read_figures(run):
    """The window's figures read from the device in one wait; a non-finite loss stops the run."""
    window = run.state.window
    tensors = [
        v.detach().float().reshape(()) for f in window for v in f.values() if torch.is_tensor(v)
    ]
    values = iter(torch.stack(tensors).tolist() if tensors else [])
    for n, figures in enumerate(window, run.state.step - len(window)):
        for k, v in figures.items():
            figures[k] = next(values) if torch.is_tensor(v) else v
        if not math.isfinite(figures["loss"]) or not (
            run.scaler or math.isfinite(figures["grad_norm"])
        ):
            raise TinyLLMError(
                f"step {n}: the loss or the gradient is not finite (loss "
                f"{figures['loss']}); nothing non-finite was saved. Try a lower "
                f"--lr, --grad_clip 1, or --dtype bfloat16 or float32"
            )
        run.state.lr = figures["lr"]
        grad_norm = figures["grad_norm"]
        run.state.grad_norm = grad_norm if math.isfinite(grad_norm) else None  # float16 skipped


FORMATS = {"loss": ".4f", "lr": ".2e", "grad_norm": ".3f"}  # how a figure prints (others: .4g)


def log_progress(run):
    """A progress line and a history row: the mean figures of the steps since the last line.
    Returns why --overfit_batch stops, or None."""
    state = run.state
    read_figures(run)
    figures = {}
    for k in state.window[0]:
        values = [f[k] for f in state.window if f[k] is not None]
        figures[k] = sum(values) / len(values) if values else None
    state.window = []
    steps, since = state.step - run.line[0], run.clock() - run.line[1]
    run.line = (state.step, run.clock())
    ms = 1000 * since / max(1, steps)
    tokens_per_s = run.cfg.batch_size * run.model.config.block_size / ms * 1000 if ms else 0.0
    end = run.budget.end_step(state, ms / 1000)
    eta = cli.format_seconds((end - state.step) * ms / 1000) if end else "?"
    shown = [
        f"{k} {'-' if v is None else format(v, FORMATS.get(k, '.4g'))}" for k, v in figures.items()
    ]
    run.say(
        f"step {state.step:>6}/{end or '?'} | {' | '.join(shown)} | {ms:.1f} ms/step | "
        f"{tokens_per_s:,.0f} tok/s | ETA {eta}"
    )
    state.history.append(
        {
            "kind": "train",
            "step": state.step,
            **figures,
            "ms_per_step": ms,
            "tok_per_s": tokens_per_s,
            "seconds": run.elapsed(),
        }
    )
    # --overfit_batch: done when the processes' mean loss is near 0 (each has its own batch)
    if run.options.overfit_batch and ddp.mean([figures["loss"]], run.world, run.device)[0] < 0.01:
        return f"overfit_batch: loss below 0.01 at step {state.step}"


@contextlib.contextmanager
def paused(run):
    """Around an evaluation or a save: the steps' figures read first, its time kept off the
    progress line's clock."""
    read_figures(run)
    start = run.clock()
    yield
    run.line = (run.line[0], run.line[1] + run.clock() - start)


# ------------------------------------------------------------------------------ evaluations, saves


def evaluate(run):
    """Both splits' losses, a line, a history row, the run's files; why the run stops, or None."""
    cfg, state, start = run.cfg, run.state, run.clock()
    with paused(run):
        iters = math.ceil(cfg.eval_iters / run.world)
        losses = estimate_loss(run.train_model, run.batches, iters, run.ctx)
        # the ranks' mean, the same on every rank
        train_loss, val_loss = ddp.mean([losses["train"], losses["val"]], run.world, run.device)
        improved = val_loss < state.best_val_loss
        state.best_val_loss = min(val_loss, state.best_val_loss)
        state.evals_without_improvement = 0 if improved else state.evals_without_improvement + 1
        state.last_eval_step = state.step
        state.history.append(
            {
                "kind": "eval",
                "step": state.step,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "lr": state.lr,
                "grad_norm": state.grad_norm,
                "seconds": run.elapsed(),
            }
        )
        bits = bits_per_char(val_loss, run.corpus.chars_per_token)
        end = run.budget.end_step(state) or "?"
        line = (
            f"eval {state.step:>6}/{end} | train {train_loss:.4f} | val {val_loss:.4f} "
            f"({bits:.3f} bits/char)"
        )
        if state.step == 0:
            line += f" | uniform baseline ln(V) = {math.log(run.model.config.vocab_size):.4f}"
        run.say(line + (" | new best" if improved else ""))
        if run.writes:
            save(run, "last.pt")
            if improved:
                save(run, "best.pt")
            if run.master:
                plots.write_history(
                    cfg.out_dir, state.history, cfg.plots, run.model.config.vocab_size
                )
    # a budget keeps as much time for the last evaluation
    state.eval_seconds = ddp.mean([run.clock() - start], run.world, run.device)[0]
    if cfg.patience and state.evals_without_improvement >= cfg.patience:
        return (
            f"early stop: val loss has not improved for {cfg.patience} evaluations "
            f"(best {state.best_val_loss:.4f})"
        )
    if cfg.target_loss and val_loss <= cfg.target_loss:
        return f"target reached: val loss {val_loss:.4f} <= {cfg.target_loss:g} at {state.step}"


def save(run, name):
    """out_dir/name: all --resume needs to go on exactly, every rank's random state too. All ranks
    call it."""
    read_figures(run)  # the window's figures go with it, as numbers
    rngs = ddp.every_rank(devices.rng_state(), run.world)
    if not run.master:
        return
    state = asdict(run.state) | {"seconds": run.elapsed()}
    if run.world > 1:
        state["rngs"] = rngs
    contents = checkpoint.contents(
        run.model,
        run.corpus.tokenizer.to_dict(),
        lora=run.lora,
        optimizer=run.optimizer.state_dict(),
        train_config=asdict(run.cfg),
        preset=run.preset,
        scaler=run.scaler.state_dict() if run.scaler else None,
        rng=rngs[0],
        **state,
    )
    checkpoint.save(os.path.join(run.cfg.out_dir, name), contents)


# ----------------------------------------------------------------------------------------- the end


def finish(run, stop_reason, signum):
    """last.pt if steps came after the last evaluation, the closing lines and sample, a summary.
    Stopped by a signal: last.pt, how to resume, exit status 128 + the signal (130 Ctrl-C)."""
    state, cfg = run.state, run.cfg
    read_figures(run)
    if run.writes and (signum or state.last_eval_step != state.step):
        save(run, "last.pt")
    if signum:
        if run.writes:
            run.say(
                f"saved {os.path.join(cfg.out_dir, 'last.pt')} at step {state.step}. "
                f"Resume with: python train.py --resume --out_dir {cfg.out_dir}"
            )
        ddp.leave_together(run.world)
        sys.exit(128 + signum)
    if stop_reason:
        run.say(stop_reason)
    files = f" | {cfg.out_dir}/: best.pt, last.pt, history.csv"
    if cfg.plots:
        files += ", loss.png"
    run.say(
        f"done: {state.step} steps | best val loss {state.best_val_loss:.4f} | total time "
        f"{cli.format_seconds(run.elapsed())}{files if run.writes else ''}"
    )
    if cfg.time_budget:
        used = cli.format_seconds(run.budget.now(state))
        run.say(
            f"time budget {cfg.time_budget}: {used} used, {state.step:,} steps, the last at LR "
            f"{state.lr:.4g} (min_lr {cfg.min_lr:g})"
        )
    if cfg.sample_tokens and run.master:
        run.say("sample:\n" + training.closing_sample(run, cfg.sample_tokens))
    ddp.leave_together(run.world)
    return {
        "step": state.step,
        "best_val_loss": state.best_val_loss,
        "history": state.history,
        "model": run.model,
        "seconds": run.elapsed(),
        "stop_reason": stop_reason,
        "corpus": run.corpus,
        "dtype": run.dtype,
    }


def main(argv=None, clock=None):
    options, model_cfg, cfg, preset, given = training.parse_flags(argv)
    if options.eval_only is not None:  # --eval_only alone: best.pt's
        path = options.eval_only or os.path.join(cfg.out_dir, "best.pt")
        checkpoint.evaluate_checkpoint(
            path, given.get("data"), cfg.device, cfg.batch_size, cfg.threads
        )
    elif options.plot_lr:
        plots.draw_lr_schedule(cfg)
    else:
        train(model_cfg, cfg, options, preset, given, clock)


if __name__ == "__main__":
    # bad input: one error: line and exit status 2. A time budget counts from the process's start
    cli.run_cli(lambda argv: main(argv, clock=machinery.seconds))
