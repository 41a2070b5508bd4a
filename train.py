"""Train a GPT on a text file: the lesson, top to bottom.

    python train.py     # data/input.txt (Shakespeare): preset tiny on a CPU (5 minutes), small on a GPU (config.py)
    python train.py --preset small --max_steps 50 --seed 1

build makes the batches, the model and the optimizer; train_step takes one optimizer step;
train_loop repeats it at the schedule's learning rate, evaluating now and then (estimate_loss)
and writing down each step's figures. What keeps a run safe on every machine (the run folder,
resuming, devices, precision, several processes, the time budget) is a call into machinery/,
whose comment says what it does.
"""

import machinery  # noqa: F401 (first, before torch loads: the start time, and OpenMP's idle threads soon sleep)

import contextlib
import functools
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace

import torch

from config import PRESETS, GPTConfig, RunOptions, TrainConfig, build_configs, default_preset, make_config
from model import GPT
from optim import get_lr, make_optimizer, progress
from utils import get_batch

from machinery import budget, checkpoint, cli, ddp, device, plots, records, setup


# ----------------------------------------------------------------------------- the data, the model, the optimizer

def build(start):
    """(corpus, model, optimizer, next_batch, val_batch) of the run setup.start_run made (settings, device, source)."""
    cfg = start.cfg
    # the text (cfg.data) as token ids, split 90/10 into train and val (utils.tokenize); a resumed
    # or fine-tuned run also gets its checkpoint's GPT (and tokenizer) back, a fresh run None
    corpus, model = setup.load_corpus_and_model(start)
    if model is None:  # a fresh GPT: random weights, one embedding row per token of the tokenizer
        model = GPT(replace(start.model_cfg, vocab_size=corpus.tokenizer.vocab_size))
    model = model.to(start.device)
    optimizer = make_optimizer(model, cfg, start.device)  # AdamW: optim.py
    # batches: random windows of block_size tokens, y one token ahead of x. Each process takes
    # its share of batch_size, in grad_accum_steps micro-batches
    block_size, micro_batch = model.config.block_size, start.micro_batch  # batch_size // processes // grad_accum
    next_batch = functools.partial(get_batch, corpus.train, micro_batch, block_size, start.device)  # () -> (x, y)
    val_batch = functools.partial(get_batch, corpus.val, micro_batch, block_size, start.device)
    return corpus, model, optimizer, next_batch, val_batch


# ----------------------------------------------------------------------------- one optimizer step

def train_step(model, optimizer, next_batch, lr, grad_accum_steps, grad_clip, ctx, scaler=None):
    """One optimizer step, in the order that is the lesson. Returns its figures: the batch's loss, the LR and the
    gradient norm before clipping, loss and norm as tensors (reading one makes a GPU wait, so the loop reads them
    only now and then; a new entry shows on the progress line and in the history, and resumes). ctx: the forward
    pass's precision (an autocast; nothing for float32); scaler: float16's torch.amp.GradScaler (else None)."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # disabled: its calls below do nothing but opt.step()
    for group in optimizer.param_groups:                     # 1. this step's learning rate, every group's
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)                    # 2. forget the last step's gradients
    batch_loss = 0.0                                         # the batch's mean loss: each micro-batch adds its share
    for micro_step in range(grad_accum_steps):               # a batch may come in micro-batches
        x, y = next_batch()                                  # 3. a batch: y is x shifted by one token
        sync = micro_step == grad_accum_steps - 1 or not hasattr(model, "no_sync")  # DDP: average the processes'
        with contextlib.nullcontext() if sync else model.no_sync():                 # gradients once, at the last
            with ctx:
                _, loss = model(x, y)                        # 4. forward, 5. the loss
            loss = loss / grad_accum_steps                   # the micro-batches' gradients add up to the batch's
            scaler.scale(loss).backward()                    # 6. backward (float16 scales the loss up: no underflow)
        batch_loss = batch_loss + loss.detach()
    scaler.unscale_(optimizer)                               # (float16: the scale divided back out)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)  # 7. clip (0: measure only)
    scaler.step(optimizer)                                   # 8. update the weights (not if a gradient is inf or NaN)
    scaler.update()                                          # (float16: the scale adapts)
    return {"loss": batch_loss, "lr": lr, "grad_norm": grad_norm}


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainState:
    """The numbers that change as the run trains, written by this file alone (the loop; set-up notes plan); every
    checkpoint saves them whole, and --resume puts them back (an older checkpoint lacking a new field: its default)."""
    step: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    lr: float = 0.0                  # of the latest step
    grad_norm: float = None          # of the latest step; None before the first
    history: list = field(default_factory=list)  # a row per progress line and per evaluation
    window: list = field(default_factory=list)   # the figures of the steps since the last progress row
    progress: float = 0.0            # of the latest step: 0 to the warmup's end, 1 at the run's (optim.progress)
    eval_seconds: float = 0.0        # the latest evaluation's, saves and plots included (a budget keeps room)
    seconds: float = 0.0             # wall time of every process of the run, set-up included (Clock.elapsed)
    plan: dict = None                # what --dtype auto measured: {"dtype", "dtype_note"}


def train(model_cfg, train_cfg, options=None, preset="custom", given=None, started=None):
    """Train; return a summary dict. Under torchrun every rank runs this; rank 0 alone prints and writes.
    started: when the run began, for a time budget (python train.py: when the process started)."""
    with device.out_of_memory_as_error("out of memory: try a smaller --batch_size, or --grad_accum_steps 2 or more "
                                       "(the same batch in pieces), or a smaller model"):  # one line, no traceback
        return train_loop(setup_run(model_cfg, train_cfg, options, preset, given, started))


def setup_run(model_cfg, train_cfg, options=None, preset="custom", given=None, started=None):
    """The Run, made once: set-up (machinery/setup.py), then build, then precision; only read from here on."""
    # processes, the device, the run folder (a trained run is never overwritten), the checkpoint to start from
    start = setup.start_run(model_cfg, train_cfg, options or RunOptions(), preset, given or {},
                            budget.now() if started is None else started)
    cfg = start.cfg
    corpus, model, optimizer, next_batch, val_batch = build(start)
    # a resumed run's state and optimizer as saved; a fresh run's from zero
    state = checkpoint.restore(start, optimizer, TrainState) if start.resumed else TrainState()
    setup.set_random_state(start, state)  # --resume: every RNG as saved; torchrun: each rank its own batches
    if start.options.overfit_batch:  # a sanity check: every step trains on one batch; nothing is written
        next_batch = setup.one_fixed_batch(start, next_batch)
    train_model = torch.compile(model) if cfg.compile else model  # --compile: the steps run a compiled model
    train_model = ddp.wrap(train_model, start.world, start.device)  # torchrun: DDP averages the processes' gradients
    # the run's step: train_step bound to this run's model, optimizer, batches, accumulation and clipping
    step = functools.partial(train_step, train_model, optimizer, next_batch, grad_accum_steps=cfg.grad_accum_steps,
                             grad_clip=cfg.grad_clip)
    # the precision: --compile's check and --dtype auto's timing take trial steps at the peak LR that leave no trace
    dtype, ctx, scaler, state.plan = setup.precision(start, model, optimizer, state.plan,
                                                     lambda ctx, scaler=None: step(cfg.lr, ctx=ctx, scaler=scaler))
    setup.print_header(start, model, corpus, dtype, state)
    setup.clear_replaced_run(start)  # --overwrite: the previous run's files go now, the new one's input checked
    # a time budget keeps time for the closing sample, timed here
    sample_seconds = (records.sample_seconds(model, corpus.tokenizer, cfg.sample_tokens, cfg.seed)
                      if cfg.time_budget else 0.0)
    return setup.Run(**(vars(start) | {"model_cfg": model.config}), corpus=corpus, model=model, optimizer=optimizer,
                     next_batch=next_batch, val_batch=val_batch, train_model=train_model, dtype=dtype, ctx=ctx,
                     scaler=scaler, train_step=functools.partial(step, ctx=ctx, scaler=scaler),
                     sample_seconds=sample_seconds, state=state)


def train_loop(run):
    """Evaluate now and then, take optimizer steps, write down their figures. The run ends at max_steps or when a
    --time_budget is spent (clock.at_end), or early: --patience and --target_loss (evaluate), --overfit_batch
    (log_progress), Ctrl-C or SIGTERM (ddp.stop_signal); then finish saves and says why."""
    cfg, state = run.cfg, run.state
    # how far the run is, by steps or by a --time_budget's seconds: its end, room for an evaluation, the ETA
    clock = budget.Clock(cfg, state, run.started, run.world, run.device, run.sample_seconds)
    # step time, and the steps' figures kept on the device until read (a read waits; a non-finite one stops the run)
    meter = records.Meter(cfg, run.scaler is not None, run.writes_files)
    stop_reason, signum = None, 0
    # Ctrl-C or SIGTERM: finish the step, then stop (stop.signum; a second Ctrl-C aborts)
    with cli.StopRequest(announce=run.master) as stop:
        while True:
            at_end = clock.at_end()  # max_steps taken, or a --time_budget's time spent
            # an evaluation every eval_interval steps (under a budget, if time is left for steps after it) and
            # at the end, never twice at one step (a resumed run starts where its last evaluation was)
            scheduled = state.step % cfg.eval_interval == 0 and clock.room_for_evaluation()
            if (scheduled or at_end) and state.step != state.last_eval_step:
                stop_reason = stop_reason or evaluate(run, meter, clock)  # --patience, --target_loss: stop early
            if at_end or stop_reason:
                break

            # --- one optimizer step, at the schedule's learning rate, a function of how far the run is: by steps
            # (optim.progress), or under a --time_budget by the seconds spent of those usable
            state.progress = clock.progress_by_time(state.progress) if cfg.time_budget else progress(state.step, cfg)
            lr = get_lr(state.step, state.progress, cfg)
            figures = run.train_step(lr)  # train_step, above, with this run's model, optimizer, batches, precision
            state.step += 1

            # --- its figures: averaged over log_interval steps onto a progress line and into the history
            meter.add(state.step, figures)
            if state.step % cfg.log_interval == 0:  # (no stop_reason yet: one would have ended the loop above)
                stop_reason = log_progress(run, meter, clock)  # --overfit_batch done
            if cfg.save_interval and state.step % cfg.save_interval == 0 and run.writes_files:
                read_figures(state, meter)
                with meter.paused():
                    save(run, clock, f"ckpt_{state.step:07d}.pt")
                    if run.master:
                        checkpoint.keep_newest(cfg.out_dir, cfg.keep_last)
            # Ctrl-C or SIGTERM on any rank: every rank agrees, at progress lines
            if signum := ddp.stop_signal(stop.signum, run.world, state.step % cfg.log_interval == 0):
                stop_reason = stop_reason or f"stopped by signal {signum}"
                break
    read_figures(state, meter)  # the steps since the last line, before the last save
    with meter.paused():
        return finish(run, stop_reason, signum, clock)


def evaluate(run, meter, clock):
    """The losses of both splits: a line and a history row, last.pt (and best.pt if val improved), the
    history files and plots. Returns why the run stops early (--patience, --target_loss), else None."""
    cfg, state = run.cfg, run.state
    read_figures(state, meter)  # the steps' figures, saved with the state
    with meter.paused():  # not step time
        eval_iters = math.ceil(cfg.eval_iters / run.world)  # batches per split: this process's share
        losses = estimate_loss(run.train_model, {"train": run.next_batch, "val": run.val_batch}, eval_iters, run.ctx)
        # the processes' mean is the same everywhere, and so is every decision after it
        train_loss, val_loss = ddp.all_ranks_mean([losses["train"], losses["val"]], run.world, run.device)
        improved = val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.evals_without_improvement = val_loss, 0
        else:
            state.evals_without_improvement += 1
        state.last_eval_step = state.step  # never two evaluations at one step
        state.history.append({"kind": "eval", "step": state.step, "train_loss": train_loss, "val_loss": val_loss,
                              "lr": state.lr, "grad_norm": state.grad_norm, "seconds": clock.elapsed()})
        run.say(records.evaluation_line(state.step, clock.end_step(), train_loss, val_loss,
                                        run.corpus.chars_per_token, run.model_cfg.vocab_size, improved))
        if run.writes_files:
            save(run, clock, "last.pt")
            if improved:
                save(run, clock, "best.pt")
            if run.master:
                records.write_history(cfg, state, run.model_cfg.vocab_size)  # history.json, .csv and the plots
    # its seconds, saves and plots included: a time budget keeps as much for the last evaluation
    state.eval_seconds = clock.ranks_mean(meter.last_pause)
    if cfg.patience and state.evals_without_improvement >= cfg.patience:
        return (f"early stop: val loss has not improved for {cfg.patience} evaluations "
                f"(best {state.best_val_loss:.4f} kept in {os.path.join(run.cfg.out_dir, 'best.pt')})")
    if cfg.target_loss and val_loss <= cfg.target_loss:
        return f"target reached: val loss {val_loss:.4f} <= {cfg.target_loss:g} at step {state.step}"
    return None


def read_figures(state, meter):
    """The figures of the steps since the last read, from the device: into the window of the next progress line, and
    the latest LR and gradient norm (float16 skips a step whose norm is inf: None)."""
    for figures in meter.read():
        state.window.append(figures)
        state.lr, norm = figures.get("lr", state.lr), figures.get("grad_norm")
        state.grad_norm = norm if norm is not None and math.isfinite(norm) else None


FORMATS = {"loss": ".4f", "lr": ".2e", "grad_norm": ".3f"}  # how a figure prints on a progress line (others: .4g)


def log_progress(run, meter, clock):
    """A progress line and a history row for the steps since the last one; why the run stops (--overfit_batch)."""
    state = run.state
    read_figures(state, meter)  # (a loss that is not finite stops the run here)
    figures, ms = records.average(state.window), meter.ms_per_step()  # the steps' figures, averaged
    state.window = []
    # mfu: None where the chip's peak is unknown
    tokens_per_s, mfu = records.speed(ms, run.cfg.batch_size, run.model, run.device, run.dtype, run.world)
    run.say(records.progress_line(state.step, clock.end_step(), figures, ms, tokens_per_s, mfu, FORMATS))
    state.history.append({"kind": "train", "step": state.step, **figures, "ms_per_step": ms,
                          "tok_per_s": tokens_per_s, "seconds": clock.elapsed()})
    # --overfit_batch: done near 0, by the processes' mean loss (each has its own batch): the ranks stop together
    if run.options.overfit_batch and ddp.all_ranks_mean([figures["loss"]], run.world, run.device)[0] < 0.01:
        return f"overfit_batch: loss below 0.01 at step {state.step}"
    return None


def finish(run, stop_reason, signum, clock):
    """After the last step: last.pt if steps came after the last evaluation, the closing lines and sample, a summary
    dict. Stopped by a signal: last.pt, how to resume, and exit status 128 + the signal (130 Ctrl-C, 143 SIGTERM)."""
    state = run.state
    if run.writes_files and (signum or state.last_eval_step != state.step):
        save(run, clock, "last.pt")
    if signum:
        if run.writes_files:
            run.say(f"saved {os.path.join(run.cfg.out_dir, 'last.pt')} at step {state.step}. "
                    f"Resume with: python train.py --resume --out_dir {run.cfg.out_dir}")
        ddp.teardown_distributed(run.world)  # torchrun ends every rank once one exits: rank 0 must have saved
        sys.exit(128 + signum)
    done = records.done_line(state.step, state.best_val_loss, clock.elapsed(),
                             run.cfg.out_dir if run.writes_files else "", run.cfg.plots)
    for line in filter(None, (stop_reason, done, clock.summary())):  # (each may be None)
        run.say(line)
    if run.cfg.sample_tokens and run.master:
        sample = records.closing_sample(run.model, run.corpus.tokenizer, run.cfg.sample_tokens, run.cfg.seed)
        run.say("sample:\n" + sample)
    ddp.teardown_distributed(run.world)
    return {"step": state.step, "best_val_loss": state.best_val_loss, "history": state.history,
            "seconds": clock.elapsed(), "stop_reason": stop_reason, "model": run.model}


def save(run, clock, name):
    """out_dir/name: all --resume needs to continue exactly, the TrainState whole (checkpoint.save adds every RNG)."""
    checkpoint.save(os.path.join(run.cfg.out_dir, name), checkpoint.make_checkpoint(
        run.model, run.corpus.tokenizer.to_dict(), optimizer=run.optimizer.state_dict(),
        train_config=asdict(run.cfg), preset=run.preset,
        scaler=run.scaler.state_dict() if run.scaler else None,
        **(asdict(run.state) | {"seconds": clock.elapsed()})), run.world, run.master)


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

def build_parser(here):
    """A flag per setting of config.py; --help shows the defaults of the preset of here (a device)."""
    preset = default_preset(here.type)
    parser = cli.ArgumentParser(description="Train a GPT language model on a text file.", epilog=(
        f"Presets: {', '.join(PRESETS)}. Without --preset this machine uses '{preset}', and the defaults shown are "
        f"that preset's where it sets them. Flags override the preset."))
    auto = {**device.auto_meanings(here), "preset": (preset, f"on this machine ({here.type})")}
    cli.add_config_flags(parser, RunOptions, auto, title="what to do")
    defaults = {**{k: (v, f"preset {preset}") for k, v in PRESETS[preset].items()}, **auto}
    cli.add_config_flags(parser, GPTConfig, defaults, title="model (GPTConfig)")
    cli.add_config_flags(parser, TrainConfig, defaults, title="training (TrainConfig)")
    return parser


def parse_flags(argv=None):
    """(options, model_cfg, train_cfg, preset, given): the flags given, on top of --preset or this machine's."""
    auto = device.choose_device("auto")  # --help's defaults are this machine's
    given = cli.explicit_flags(build_parser(auto).parse_args(argv))
    options = make_config(RunOptions, given)
    here = device.choose_device(given["device"]) if "device" in given else auto
    preset = options.preset or default_preset(here.type)
    if not options.preset and os.environ.get("RANK", "0") == "0" and not options.resume:
        cli.log(f"no --preset given: using '{preset}' for {here.type}")
    model_cfg, train_cfg = build_configs(given, preset)
    return options, model_cfg, train_cfg, preset, given


def main(argv=None, started=None):
    options, model_cfg, train_cfg, preset, given = parse_flags(argv)  # the flags on top of a preset
    if options.eval_only is not None:  # a checkpoint's loss on its whole val split (--eval_only alone: best.pt's)
        path = options.eval_only or os.path.join(train_cfg.out_dir, "best.pt")
        records.evaluate_checkpoint(path, given.get("data"), train_cfg.device, train_cfg.batch_size,
                                    train_cfg.threads)
    elif options.plot_lr:  # the learning rate of every step, drawn without training
        plots.draw_lr_schedule(train_cfg)
    else:
        train(model_cfg, train_cfg, options, preset, given, started)


if __name__ == "__main__":
    # bad input: one error: line and exit status 2, never a traceback. A time budget counts from
    # the process's start, importing torch included (machinery.STARTED: this file's first line)
    cli.run_cli(lambda argv: main(argv, started=machinery.STARTED))
