"""Train a GPT on a text file: the lesson, top to bottom (its set-up: machinery/start.py).

    python train.py     # data/input.txt: this machine's preset, five minutes on a CPU
    python train.py --preset small --max_steps 50 --seed 1

In order: a step, an evaluation; the loop; progress lines, saves; the opening, the end; main."""

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

import torch

import config
from config import SamplerConfig, TinyLLMError
from machinery import checkpoint, cli, devices, runs, sources, start
from optim import get_lr, progress
from utils import bits_per_char

# ------------------------------------------------------------------------- one step, an evaluation


def train_step(model, optimizer, next_batch, lr, cfg, precision):
    """One optimizer step. Its figures stay tensors: reading one makes a GPU wait, so the loop
    reads them later. A new figure is a new entry here, one number a step: it reaches the progress
    line and history. model may be wrapped (DDP, compile, a variant): runs.gpt_of(model) unwraps."""
    for group in optimizer.param_groups:  # 1. this step's learning rate, times a group's multiple
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)  # 2. forget the last step's gradients
    batch_loss = 0.0
    for micro_step in range(cfg.grad_accum_steps):  # a batch may come in micro-batches
        x, y = next_batch()  # 3. a batch: y is x shifted by one token
        # DDP averages the gradients once a step, at the last micro-batch
        last = micro_step == cfg.grad_accum_steps - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if last else model.no_sync():
            with precision.ctx:
                _, loss = model(x, y)  # 4. forward, 5. the loss
            loss = loss / cfg.grad_accum_steps  # the micro-batches' gradients add up
            precision.scaler.scale(loss).backward()  # 6. backward (float16 scales: no underflow)
        batch_loss = batch_loss + loss.detach()
    precision.scaler.unscale_(optimizer)  # float16's scaler: the true gradient, to clip
    # 7. clip the gradient's norm (grad_clip 0: only measure it)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    precision.scaler.step(optimizer)  # 8. update the weights (float16: unless it overflowed)
    precision.scaler.update()
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


# -------------------------------------------------------------------------------------- the loop


def train(settings, clock=None):
    """Train from settled settings (machinery/start.py); return a summary. Every rank of torchrun
    runs it. clock(): this process's seconds so far, which a time budget counts (None: from now)."""
    began = time.perf_counter()
    clock = clock or (lambda: time.perf_counter() - began)
    hint = "out of memory: try a smaller --batch_size or model, or --grad_accum_steps 2"
    with devices.out_of_memory_as_error(hint):
        run = start.set_up(settings, clock)
        print_header(run)
        return train_loop(run)


def train_loop(run):
    """Evaluate now and then and take steps until the run's end or an early stop."""
    cfg, state, budget, world = run.cfg, run.state, run.budget, run.process.world
    stop_reason, signum = None, 0
    with run.stop as stop:
        while True:
            at_end = budget.over(state)
            # evaluate every eval_interval steps (under a time budget, if time is left for steps
            # after it) and at the end, never twice at one step (a resume starts at its last one)
            due = at_end or (state.step % cfg.eval_interval == 0 and budget.room_for_eval(state))
            if due and state.step != state.last_eval_step:
                with run.meter.paused():  # no step: the pace leaves it out
                    stop_reason = evaluate(run) or stop_reason  # --patience, --target_loss
            # Ctrl-C or SIGTERM on any rank stops all; under DDP they compare at progress lines
            if world == 1 or state.step % cfg.log_interval == 0 or at_end or stop_reason:
                signum = max(run.process.every_rank(stop.signum or 0))
            if at_end or stop_reason or signum:
                break

            # one step at the schedule's learning rate: by how far the run is, in steps or time
            state.progress = budget.progress(state)
            state.lr = get_lr(state.step, state.progress, cfg)
            model, optimizer, batch = run.train_model, run.optimizer, run.batches["train"]
            run.meter.add(train_step(model, optimizer, batch, state.lr, cfg, run.precision))
            state.step += 1

            if state.step % cfg.log_interval == 0:
                stop_reason = log_progress(run)  # --overfit_batch done
            if cfg.save_interval and state.step % cfg.save_interval == 0 and run.writes_files:
                with run.meter.paused():
                    save(run, f"ckpt_{state.step:07d}.pt")
                if run.master:
                    checkpoint.keep_newest(cfg.out_dir, cfg.keep_last)
    if signum:
        stop_reason = f"stopped by signal {signum}"
    return finish(run, stop_reason, signum)


# ---------------------------------------------------------------------------------- progress lines


def check_finite(run):
    """A loss or a gradient that is not finite stops the run, before it is saved."""
    rows = run.meter.read()
    for n, row in enumerate(rows, run.state.step - len(rows)):
        # float16 skips a step whose gradient overflowed: the step changed nothing
        finite_grad = math.isfinite(row["grad_norm"]) or run.precision.scaler.is_enabled()
        if not (math.isfinite(row["loss"]) and finite_grad):
            raise TinyLLMError(
                f"step {n}: the loss or the gradient is not finite (loss {row['loss']}); nothing "
                f"non-finite was saved. Try a lower --lr, --grad_clip 1, or --dtype float32"
            )


FORMATS = {"loss": ".4f", "lr": ".2e", "grad_norm": ".3f"}  # how a figure prints (others: .4g)


def log_progress(run):
    """A line and a history row: the steps' mean figures since the last; why overfit_batch stops."""
    state = run.state
    check_finite(run)
    figures, seconds = run.meter.line()
    tokens_per_s = run.tokens_per_step / seconds if seconds else 0.0
    end = run.budget.end_step(state, seconds)
    eta = cli.format_seconds((end - state.step) * seconds) if end else "?"
    if run.variant.figures:  # a variant's own: a preference run's held-out answers
        with run.meter.paused():  # no step: the pace leaves it out
            figures |= run.variant.figures(run.train_model, run.process.device)
    shown = " | ".join(f"{k} {format(v, FORMATS.get(k, '.4g'))}" for k, v in figures.items())
    pace = f"{1000 * seconds:.1f} ms/step | {tokens_per_s:,.0f} tok/s | ETA {eta}"
    run.say(f"step {state.step:>6}/{end or '?'} | {shown} | {pace}")
    row = {"kind": "train", "step": state.step, **figures, "ms_per_step": 1000 * seconds}
    state.history.append(row | {"tok_per_s": tokens_per_s, "seconds": run.elapsed()})
    # --overfit_batch: done when the processes' mean loss is near 0 (each has its own batch)
    if run.overfit_batch and run.process.mean([figures["loss"]])[0] < 0.01:
        return f"overfit_batch: loss below 0.01 at step {state.step}"


# ------------------------------------------------------------------------------ evaluations, saves


def evaluate(run):
    """Both splits' losses, a line, a history row, the run's files; why the run stops, or None.
    The baseline, before any step, is printed and kept in the history: no best, nothing written."""
    cfg, state, since = run.cfg, run.state, run.clock()
    iters = math.ceil(cfg.eval_iters / run.process.world)
    losses = estimate_loss(run.train_model, run.batches, iters, run.precision.ctx)
    # the ranks' mean, the same on every rank
    train_loss, val_loss = run.process.mean([losses["train"], losses["val"]])
    state.last_eval_step = state.step
    row = dict(kind="eval", step=state.step, train_loss=train_loss, val_loss=val_loss)
    state.history.append(row | dict(lr=state.lr, seconds=run.elapsed()))
    bits = bits_per_char(val_loss, run.corpus.chars_per_token)
    end = run.budget.end_step(state) or "?"
    line = f"eval {state.step:>6}/{end} | train {train_loss:.4f} | val {val_loss:.4f} "
    line += f"({bits:.3f} bits/char)"
    baseline = state.step == 0  # before any step: nothing to keep yet
    if baseline:
        line += f" | uniform baseline ln(V) = {math.log(run.model.config.vocab_size):.4f}"
    improved = val_loss < state.best_val_loss and not baseline
    if not baseline:
        state.best_val_loss = min(val_loss, state.best_val_loss)
        state.evals_without_improvement = 0 if improved else state.evals_without_improvement + 1
    run.say(line + (" | new best" if improved else ""))
    if run.writes_files and not baseline:
        save(run, "last.pt")
        if improved:
            save(run, "best.pt")
        if run.master:
            from machinery.plots import write_history  # read once there is a step to draw

            write_history(cfg.out_dir, state.history, cfg.plots, run.model.config.vocab_size)
    # a budget keeps as much time for the last evaluation, saves included
    run.budget.eval_seconds = run.process.mean([run.clock() - since])[0]
    if cfg.patience and state.evals_without_improvement >= cfg.patience:
        evals = f"{cfg.patience} evaluations (best {state.best_val_loss:.4f})"
        return f"early stop: val loss has not improved for {evals}"
    if cfg.target_loss and val_loss <= cfg.target_loss and not baseline:
        return f"target reached: val loss {val_loss:.4f} <= {cfg.target_loss:g} at {state.step}"


def save(run, name):
    """out_dir/name: all --resume needs to go on exactly (each rank's random state); all call it."""
    check_finite(run)
    rngs = run.process.every_rank(checkpoint.rng_state())
    if run.master:
        checkpoint.save(os.path.join(run.cfg.out_dir, name), runs.checkpoint_of(run, rngs))


# --------------------------------------------------------------------- the opening lines, the end


def print_header(run):
    """The run's opening lines: device and precision, model, tokens, and how it ends."""
    cfg, m, model, precision = run.cfg, run.model.config, run.model, run.precision
    why = f": {precision.why}" if cfg.dtype == "auto" else ""
    threads = f"{torch.get_num_threads()} threads"
    device = f"{devices.name(run.process.device)} ({precision.dtype}{why}, {threads})"
    device += f" x {run.process.world} processes" if run.process.world > 1 else ""
    run.say(f"device {device} | preset {run.preset} | data {cfg.data}")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    part = f" ({trained:,} trained: {100 * trained / model.num_params():.2f}%)"
    shape = f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}"
    shown = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # the rest: every variant
    parts = ", ".join(f"{k} {v}" for k, v in vars(m).items() if k not in shown)
    params = f"{model.num_params():,} parameters{part if trained < model.num_params() else ''}"
    run.say(f"model {params}: {shape}, vocab {m.vocab_size} | {parts} | optimizer {cfg.optimizer}")
    micro = run.process.world * cfg.grad_accum_steps
    split = f" ({run.process.world} processes x {cfg.grad_accum_steps} micro-batches)"
    tokens = f"train {len(run.corpus.train):,} tokens, val {len(run.corpus.val):,} tokens"
    batch = f"batch {cfg.batch_size} x block {m.block_size}{split if micro > 1 else ''}"
    run.say(f"tokens per step {run.tokens_per_step:,} = {batch} | {tokens}")
    if cfg.time_budget:
        schedule = f"after the warmup the {cfg.lr_schedule} schedule runs over the time left"
        run.say(f"time budget {cfg.time_budget}: {schedule}")
    elif run.state.step:  # a resumed run: where it is in the schedule of its --max_steps
        now = get_lr(run.state.step, progress(run.state.step, cfg), cfg)
        end = f"{get_lr(cfg.max_steps, 1.0, cfg):.3g} at step {cfg.max_steps}"
        run.say(f"from step {run.state.step}: {cfg.lr_schedule} LR {now:.3g} now, {end}")


def closing_sample(run, tokens):
    """A sample as generate.py draws it (its seed, in float32: bfloat16 is no faster here). A chat
    model answers the validation split's first question, in the chat template."""
    from sampling import generate, until_stop  # the lesson's next chapter, at the run's end

    tokenizer, stop = run.corpus.tokenizer, None
    ids = sources.start_ids(tokenizer)
    question = sources.first_question(run.corpus.val[: 4 * run.model.config.block_size], tokenizer)
    if question:
        ids, stop = question, tokenizer.eot_id
    idx = torch.tensor([ids], device=run.process.device)
    generator = torch.Generator(run.process.device).manual_seed(run.cfg.seed)
    model = run.model.eval()
    out = generate(model, idx, tokens, SamplerConfig(), stop, generator)
    model.train()
    return tokenizer.decode(until_stop(out[0].tolist(), stop))


def finish(run, stop_reason, signum):
    """last.pt if steps came after the last evaluation, the closing lines and sample, a summary.
    Stopped by a signal: last.pt, how to resume, exit status 128 + the signal (130 Ctrl-C)."""
    state, cfg = run.state, run.cfg
    if run.writes_files and (signum or state.last_eval_step != state.step):
        save(run, "last.pt")
    if signum:
        if run.writes_files:
            last = os.path.join(cfg.out_dir, "last.pt")
            resume = f"python train.py --resume --out_dir {cfg.out_dir}"
            run.say(f"saved {last} at step {state.step}. Resume with: {resume}")
        run.process.leave_together()
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
        end = get_lr(state.step, 1.0, cfg)  # at progress 1
        last_lr = f"the last at LR {state.lr:.4g} (the schedule's end: {end:.4g})"
        run.say(f"time budget {cfg.time_budget}: {used} used, {state.step:,} steps, {last_lr}")
    if cfg.sample_tokens and run.master:
        run.say("sample:\n" + closing_sample(run, cfg.sample_tokens))
    run.process.leave_together()
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


# ------------------------------------------------------------------------------- the command line


def flags(argv=None):
    """The flags given, {name: value}: what to do, the model, the training (config.py's settings).
    --help shows the defaults of this machine's preset."""
    here = devices.choose_device("auto")
    preset, machine = devices.machine_preset(here, {})
    presets, may_change = ", ".join(config.PRESETS), ", ".join(config.RESUME_MAY_CHANGE)
    parser = cli.ArgumentParser(
        description="Train a GPT language model on a text file.",
        epilog=f"Presets: {presets}. Without --preset this machine uses '{preset}', whose defaults "
        f"are shown. --resume may change only: {may_change}.",
    )
    defaults = {k: (v, f"preset {preset}") for k, v in config.PRESETS[preset].items()}
    defaults |= devices.auto_meanings(here) | {"preset": (preset, f"for {machine} here")}
    config.add_flags(parser, config.RunOptions, defaults, title="what to do")
    config.add_flags(parser, config.GPTConfig, defaults, title="model")
    config.add_flags(parser, config.TrainConfig, defaults, title="training")
    return vars(parser.parse_args(argv))


def main(argv=None, clock=None):
    given = flags(argv)
    settings = start.settle(given)  # every setting decided, and checked, here
    options, cfg = settings.options, settings.cfg
    if options.eval_only is not None:  # --eval_only alone: best.pt's
        from machinery.evaluation import evaluate_checkpoint

        evaluate_checkpoint(options.eval_only or f"{cfg.out_dir}/best.pt", given.get("data"), cfg)
    elif options.plot_lr:
        from machinery.plots import draw_lr_schedule

        draw_lr_schedule(cfg)
    else:
        train(settings, clock)


if __name__ == "__main__":
    # bad input: one error: line and exit status 2. A time budget counts from the process's start
    cli.run_cli(lambda argv: main(argv, clock=lambda: time.perf_counter() - STARTED))
