"""Train a GPT on a text file: the lesson, top to bottom.

    python train.py     # data/input.txt: this machine's preset, five minutes on a CPU
    python train.py --preset small --max_steps 50 --seed 1

In order: one step and an evaluation; the set-up and the loop; its progress lines, evaluations and
saves; the opening lines and the end. The set-up's parts are plain functions of machinery/runs.py.
"""

import machinery
from machinery import checkpoint, cli, ddp, devices, evaluation, plots, runs, settings, sources
from machinery.devices import FLOAT32

import contextlib
import math
import os
import sys

import torch

from config import RunOptions, SamplerConfig, TinyLLMError, build_configs
from optim import get_lr
from sampling import generate, until_stop
from utils import bits_per_char

# ------------------------------------------------------------------------- one step, an evaluation


def train_step(model, optimizer, next_batch, lr, cfg, precision=FLOAT32):
    """One optimizer step. Its figures stay tensors: reading one makes a GPU wait, so the loop
    reads them later. A new figure is a new entry here: it reaches the progress line and history."""
    scaler = precision.scaler or torch.amp.GradScaler(enabled=False)  # disabled: calls do nothing
    # fmt: off
    for group in optimizer.param_groups:           # 1. this step's learning rate
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)          # 2. forget the last step's gradients
    batch_loss = 0.0
    for micro_step in range(cfg.grad_accum_steps): # a batch may come in micro-batches
        x, y = next_batch()                        # 3. a batch: y is x shifted by one token
        # DDP averages the gradients once a step, at the last micro-batch
        last = micro_step == cfg.grad_accum_steps - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if last else model.no_sync():
            with precision.ctx:
                _, loss = model(x, y)              # 4. forward, 5. the loss
            loss = loss / cfg.grad_accum_steps     # the micro-batches' gradients add up
            scaler.scale(loss).backward()          # 6. backward (float16 scales: no underflow)
        batch_loss = batch_loss + loss.detach()
    scaler.unscale_(optimizer)
    # 7. clip the gradient's norm (grad_clip 0: only measure it)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
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
    options, given, clock = options or RunOptions(), given or {}, clock or machinery.stopwatch()
    hint = "out of memory: try a smaller --batch_size or model, or --grad_accum_steps 2"
    with devices.out_of_memory_as_error(hint):
        run = runs.set_up(model_cfg, cfg, options, preset, given, clock)  # every input checked
        cfg = run.cfg
        model, optimizer = run.train_model, run.optimizer
        if cfg.compile:  # a step, undone: a missing compiler is one error line before any write
            with devices.compiling(run.model, optimizer, run.precision.scaler):
                train_step(model, optimizer, run.batches["train"], cfg.lr, cfg, run.precision)
        print_header(run)
        if options.overwrite and run.master and run.writes_files and not run.resumed:
            checkpoint.clear_out_dir(cfg.out_dir)  # the old run's files go now
        if cfg.time_budget and cfg.sample_tokens:  # a budget keeps the closing sample's time free
            closing_sample(run, 2)  # the first pays for allocations
            start = run.clock()
            closing_sample(run, 16)
            seconds = (run.clock() - start) / 16 * cfg.sample_tokens * 1.2  # with a margin
            run.budget.sample_seconds = ddp.mean([seconds], run.world, run.device)[0]
        return train_loop(run)


def train_loop(run):
    """Evaluate now and then and take steps until the run's end or an early stop."""
    cfg, state, budget = run.cfg, run.state, run.budget
    run.line_step, run.line_time = state.step, run.clock()
    stop_reason, signum = None, 0
    with run.stop as stop:
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
            batches, model, optimizer = run.batches, run.train_model, run.optimizer
            figures = train_step(model, optimizer, batches["train"], lr, cfg, run.precision)
            for name, value in figures.items():  # kept, to be read at the next progress line
                state.window.setdefault(name, []).append(value)
            state.step += 1

            if state.step % cfg.log_interval == 0:
                stop_reason = log_progress(run)  # --overfit_batch done
            if cfg.save_interval and state.step % cfg.save_interval == 0 and run.writes_files:
                save(run, f"ckpt_{state.step:07d}.pt")
                if run.master:
                    checkpoint.keep_newest(cfg.out_dir, cfg.keep_last)
                run.line_step, run.line_time = state.step, run.clock()  # the save is no step
    if signum:
        stop_reason = f"stopped by signal {signum}"
    return finish(run, stop_reason, signum)


# ---------------------------------------------------------------------------------- progress lines


def read_window(run):
    """The figures of the steps since the last progress line, {name: [a number a step]}: the
    tensors among them read from the device in one wait. The latest lr and grad_norm go into the
    state; a loss or gradient that is not finite stops the run."""
    state, window = run.state, dict(run.state.window)
    tensors = [name for name, values in window.items() if torch.is_tensor(values[0])]
    if tensors:  # every figure's tensors stacked into one, (figures, steps): one wait
        numbers = torch.stack([torch.stack(window[name]).float() for name in tensors]).tolist()
        window.update(zip(tensors, numbers))
    losses, grad_norms = window.get("loss", []), window.get("grad_norm", [])
    for n, (loss, grad_norm) in enumerate(zip(losses, grad_norms), state.step - len(losses)):
        # (float16 skips a step whose gradient overflowed: the step changed nothing)
        if not (math.isfinite(loss) and (run.precision.scaler or math.isfinite(grad_norm))):
            raise TinyLLMError(
                f"step {n}: the loss or the gradient is not finite (loss {loss}); nothing "
                f"non-finite was saved. Try a lower --lr, --grad_clip 1, or --dtype float32"
            )
    if losses:
        state.lr, grad_norm = window["lr"][-1], grad_norms[-1]
        state.grad_norm = grad_norm if math.isfinite(grad_norm) else None
    state.window = window
    return window


FORMATS = {"loss": ".4f", "lr": ".2e", "grad_norm": ".3f"}  # how a figure prints (others: .4g)


def log_progress(run):
    """A progress line and a history row: the mean figures of the steps since the last line.
    Returns why --overfit_batch stops, or None."""
    state = run.state
    figures = {k: sum(values) / len(values) for k, values in read_window(run).items()}
    state.window = {}
    seconds = (run.clock() - run.line_time) / max(1, state.step - run.line_step)  # a step's
    run.line_step, run.line_time = state.step, run.clock()
    tokens_per_s = run.tokens_per_step / seconds if seconds else 0.0
    end = run.budget.end_step(state, seconds)
    eta = cli.format_seconds((end - state.step) * seconds) if end else "?"
    shown = " | ".join(
        f"{k} {'-' if v is None else format(v, FORMATS.get(k, '.4g'))}" for k, v in figures.items()
    )
    pace = f"{1000 * seconds:.1f} ms/step | {tokens_per_s:,.0f} tok/s | ETA {eta}"
    run.say(f"step {state.step:>6}/{end or '?'} | {shown} | {pace}")
    row = {"kind": "train", "step": state.step, **figures, "ms_per_step": 1000 * seconds}
    state.history.append(row | {"tok_per_s": tokens_per_s, "seconds": run.elapsed()})
    # --overfit_batch: done when the processes' mean loss is near 0 (each has its own batch)
    if run.options.overfit_batch and ddp.mean([figures["loss"]], run.world, run.device)[0] < 0.01:
        return f"overfit_batch: loss below 0.01 at step {state.step}"


# ------------------------------------------------------------------------------ evaluations, saves


def evaluate(run):
    """Both splits' losses, a line, a history row, the run's files; why the run stops, or None."""
    cfg, state, start = run.cfg, run.state, run.clock()
    read_window(run)  # the latest step's lr and grad_norm, for the history row
    iters = math.ceil(cfg.eval_iters / run.world)
    losses = estimate_loss(run.train_model, run.batches, iters, run.precision.ctx)
    # the ranks' mean, the same on every rank
    train_loss, val_loss = ddp.mean([losses["train"], losses["val"]], run.world, run.device)
    improved = val_loss < state.best_val_loss
    state.best_val_loss = min(val_loss, state.best_val_loss)
    state.evals_without_improvement = 0 if improved else state.evals_without_improvement + 1
    state.last_eval_step = state.step
    row = dict(kind="eval", step=state.step, train_loss=train_loss, val_loss=val_loss)
    state.history.append(row | dict(lr=state.lr, grad_norm=state.grad_norm, seconds=run.elapsed()))
    bits = bits_per_char(val_loss, run.corpus.chars_per_token)
    line = f"eval {state.step:>6}/{run.budget.end_step(state) or '?'} | train {train_loss:.4f} | "
    line += f"val {val_loss:.4f} ({bits:.3f} bits/char)"
    if state.step == 0:
        line += f" | uniform baseline ln(V) = {math.log(run.model.config.vocab_size):.4f}"
    run.say(line + (" | new best" if improved else ""))
    if run.writes_files:
        save(run, "last.pt")
        if improved:
            save(run, "best.pt")
        if run.master:
            plots.write_history(cfg.out_dir, state.history, cfg.plots, run.model.config.vocab_size)
    # a budget keeps as much time for the last evaluation; the progress line counts steps only
    state.eval_seconds = ddp.mean([run.clock() - start], run.world, run.device)[0]
    run.line_step, run.line_time = state.step, run.clock()
    if cfg.patience and state.evals_without_improvement >= cfg.patience:
        evals = f"{cfg.patience} evaluations (best {state.best_val_loss:.4f})"
        return f"early stop: val loss has not improved for {evals}"
    if cfg.target_loss and val_loss <= cfg.target_loss:
        return f"target reached: val loss {val_loss:.4f} <= {cfg.target_loss:g} at {state.step}"


def save(run, name):
    """out_dir/name: all --resume needs to go on exactly, every rank's random state too. All ranks
    call it."""
    read_window(run)  # the steps' figures go with it, as numbers
    rngs = ddp.every_rank(devices.rng_state(), run.world)
    if run.master:
        checkpoint.save(os.path.join(run.cfg.out_dir, name), checkpoint.of_run(run, rngs))


# --------------------------------------------------------------------- the opening lines, the end


def print_header(run):
    """The run's opening lines: device and precision, model, tokens, and how it ends."""
    cfg, m, model, precision = run.cfg, run.model.config, run.model, run.precision
    why = f": {precision.why}" if cfg.dtype == "auto" else ""
    device = (
        f"{devices.name(run.device)} ({precision.dtype}{why}, {torch.get_num_threads()} threads)"
    )
    device += f" x {run.world} processes" if run.world > 1 else ""
    run.say(f"device {device} | preset {run.preset} | data {cfg.data}")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    part = f" ({trained:,} trained: {100 * trained / model.num_params():.2f}%, LoRA)"
    shape = f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}"
    parts = f"norm {m.norm}, mlp {m.mlp}, pos {m.pos} | optimizer {cfg.optimizer}"
    params = f"{model.num_params():,} parameters{part if run.lora else ''}"
    run.say(f"model {params}: {shape}, vocab {m.vocab_size} | {parts}")
    split = f" ({run.world} processes x {cfg.grad_accum_steps} micro-batches)"
    split = split if run.world * cfg.grad_accum_steps > 1 else ""
    tokens = f"train {len(run.corpus.train):,} tokens, val {len(run.corpus.val):,} tokens"
    batch = f"batch {cfg.batch_size} x block {m.block_size}{split}"
    run.say(f"tokens per step {run.tokens_per_step:,} = {batch} | {tokens}")
    if cfg.time_budget:
        schedule = f"after the warmup the {cfg.lr_schedule} schedule runs over the time left"
        run.say(f"time budget {cfg.time_budget}: {schedule}")
    elif cfg.max_steps <= cfg.warmup_steps:
        steps = f"--max_steps {cfg.max_steps} ends within the warmup ({cfg.warmup_steps} steps)"
        cli.warn(f"{steps}: the LR never decays")


def closing_sample(run, tokens):
    """A sample as generate.py draws it (its seed, in float32: bfloat16 is no faster here). A chat
    model answers the validation split's first question, in the chat template."""
    tokenizer, stop = run.corpus.tokenizer, None
    start = sources.start_ids(tokenizer)
    question = sources.first_question(run.corpus.val[: 4 * run.model.config.block_size], tokenizer)
    if question:
        start, stop = question, tokenizer.eot_id
    idx = torch.tensor([start], device=run.device)
    generator = torch.Generator(run.device).manual_seed(run.cfg.seed)
    model = run.model.eval()
    out = generate(model, idx, tokens, SamplerConfig(), stop_token=stop, generator=generator)
    model.train()
    return tokenizer.decode(until_stop(out[0].tolist(), stop))


def finish(run, stop_reason, signum):
    """last.pt if steps came after the last evaluation, the closing lines and sample, a summary.
    Stopped by a signal: last.pt, how to resume, exit status 128 + the signal (130 Ctrl-C)."""
    state, cfg = run.state, run.cfg
    read_window(run)
    if run.writes_files and (signum or state.last_eval_step != state.step):
        save(run, "last.pt")
    if signum:
        if run.writes_files:
            last = os.path.join(cfg.out_dir, "last.pt")
            resume = f"python train.py --resume --out_dir {cfg.out_dir}"
            run.say(f"saved {last} at step {state.step}. Resume with: {resume}")
        ddp.leave_together(run.world)
        sys.exit(128 + signum)
    if stop_reason:
        run.say(stop_reason)
    files = "best.pt, last.pt, history.csv" + (", loss.png" if cfg.plots else "")
    files = f" | {cfg.out_dir}/: {files}" if run.writes_files else ""
    total = cli.format_seconds(run.elapsed())
    best = f"best val loss {state.best_val_loss:.4f}"
    run.say(f"done: {state.step} steps | {best} | total time {total}{files}")
    if cfg.time_budget:
        used = cli.format_seconds(run.budget.now(state))
        last_lr = f"the last at LR {state.lr:.4g} (min_lr {cfg.min_lr:g})"
        run.say(f"time budget {cfg.time_budget}: {used} used, {state.step:,} steps, {last_lr}")
    if cfg.sample_tokens and run.master:
        run.say("sample:\n" + closing_sample(run, cfg.sample_tokens))
    ddp.leave_together(run.world)
    return {
        "step": state.step,
        "best_val_loss": state.best_val_loss,
        "history": state.history,
        "stop_reason": stop_reason,
        "seconds": run.elapsed(),
        "model": run.model,
        "corpus": run.corpus,
        "tokens_per_step": run.tokens_per_step,
        "dtype": run.precision.dtype,
    }


def main(argv=None, clock=None):
    options, given = settings.parse_flags(argv)
    trains = options.eval_only is None and not options.plot_lr
    preset = settings.preset_of(options, given, say=cli.log if trains else lambda text: None)
    model_cfg, cfg = build_configs(given, preset)
    if options.eval_only is not None:  # --eval_only alone: best.pt's
        path = options.eval_only or os.path.join(cfg.out_dir, "best.pt")
        evaluation.evaluate_checkpoint(path, given.get("data"), cfg)
    elif options.plot_lr:
        plots.draw_lr_schedule(cfg)
    else:
        train(model_cfg, cfg, options, preset, given, clock)


if __name__ == "__main__":
    # bad input: one error: line and exit status 2. A time budget counts from the process's start
    cli.run_cli(lambda argv: main(argv, clock=machinery.seconds))
