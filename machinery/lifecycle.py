"""The life of a training run, around the lesson in train.py: read this when you need to know
how a run is set up (processes, device, precision, seeds, the run folder, the checkpoint it
resumes or fine-tunes from), what it keeps track of while it trains (progress lines, timers,
history, plots, checkpoints, stop signals), and how it ends.

train.py calls, in order: start_run (before anything is built), load_data (from train.build),
ready (once the model and its optimizer exist), guarded (around the loop); in the loop
evaluating and after_evaluation around each evaluation, after_step after each step; and
finish. Every field a run holds is declared in Run below; its ML progress, which every
checkpoint saves, is the TrainState inside it.
"""

import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from config import GPTConfig, RunOptions, TinyLLMError, TrainConfig, check_batch_split
import sampling
import machinery
from optim import get_lr

from machinery.calibrate import (RECENT_LINES, calibrate, describe_end, describe_start, move_end, plan_run, replan,
                                  replan_steps, replay)
from machinery.checkpoint import (grow_vocabulary, load_checkpoint, make_checkpoint, model_from_checkpoint,
                                  save_checkpoint, tokenizer_of)
from machinery.cli import format_seconds, log, warn
from machinery.device import (choose_device, configure_matmul, describe, flops_per_token, out_of_memory_as_error,
                              peak_flops, rng_state, seed_everything, set_rng_state, set_threads)
from machinery.distributed import (all_ranks_max, all_ranks_mean, rank_seed, setup_distributed, teardown_distributed,
                                   wrap)
from machinery.plots import plot_history
from machinery.precision import autocast, explain_dtype, make_scaler, resolve_dtype
from machinery.safety import StopRequest, claim_out_dir, conflicting_flags, find_resume, prune_periodic, resume_configs
from machinery.sources import check_splits, load_corpus, start_ids


# what to try when training runs out of device memory (train.main's guard says it too)
OUT_OF_MEMORY = ("try a smaller --batch_size, or --grad_accum_steps 2 or more (the same batch in pieces), "
                 "or a smaller model")


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
    decay_from: list = None          # [step, peak, done] where the cosine was last moved to a new max_steps
    seconds: float = 0.0             # training wall time over every process of the run (resumes)
    plan: dict = None                # what calibrate.py measured and decided: dtype, max_steps for a time budget


# what a checkpoint must hold for --resume (older versions did not write window, decay_from, seconds, plan)
RESUMABLE = ("optimizer", "train_config", "rng", *(f.name for f in dataclasses.fields(TrainState)
                                                   if f.name not in ("window", "decay_from", "seconds", "plan")))


@dataclass
class Meter:
    """This process's account of the steps since the last progress line: their losses and
    gradient norms, still on the device, and the time they took. Never saved."""
    pending: list = field(default_factory=list)  # (step, loss, grad norm), as tensors
    seconds: float = 0.0        # spent in those steps
    steps: int = 0              # of them timed so far
    mark: float = 0.0           # when the current stretch of steps began
    paused: int = 0             # > 0 while the clock is off (evaluating, saving)
    eval_seconds: float = 0.0   # this process's latest evaluation, its saves included (for a time budget)
    recent: list = field(default_factory=list)  # (steps, seconds) of the latest progress lines' steps
    process_seconds: float = 0.0  # the step time of this process so far, and its steps: for a time budget
    process_steps: int = 0
    process_start: float = 0.0  # when this process's share of TrainState.seconds began


@dataclass
class Run:
    """Everything one run holds. start_run fills the first part, train.build the model part,
    ready the rest."""
    # what this command does, with which settings
    options: RunOptions
    given: dict                 # the flags given on the command line, {name: value}
    model_cfg: GPTConfig
    train_cfg: TrainConfig
    preset: str
    started: float              # when python train.py began (a time budget counts from here): process_start()
    # the processes, and where and how the numbers are computed
    rank: int                   # this process, of world processes (1 without torchrun)
    world: int
    device: torch.device
    dtype: str                  # the forward pass's precision: float32, bfloat16 or float16
    ctx: object                 # its autocast context
    scaler: object              # float16's gradient scaler, else None
    threads: int
    # the run folder, and the checkpoint the run starts from, if any
    out_dir: str
    source: dict = None         # resumed (options.resume) or fine-tuned (options.init_from)
    source_name: str = ""
    dtype_note: str = None      # what --dtype auto measured, when it measured (calibrate.py)
    plan_at: int = None         # a --time_budget run not planned yet: the step at which to plan it
    earlier_seconds: float = 0.0  # training time of the run's earlier processes (TrainState.seconds at the start)
    # built by train.build
    tokenizer: object = None
    corpus: object = None       # utils.Corpus: the train and val token streams
    model: torch.nn.Module = None
    optimizer: torch.optim.Optimizer = None
    next_batch: object = None   # () -> (x, y): a training batch of this process
    val_batch: object = None
    micro_batch: int = 0        # sequences per forward pass of this process
    # added by ready
    train_model: torch.nn.Module = None  # the model as the steps call it: compiled and/or wrapped in DDP
    eval_iters: int = 0         # batches per split this process evaluates: eval_iters shared over the processes
    log_interval: int = 0
    peak: float = None          # the chip's peak FLOP/s, for MFU (on GPUs we know)
    state: TrainState = None
    meter: Meter = None
    # how it ends early
    stop_reason: str = None
    overfit_step: int = None
    stop_request: object = None  # safety.StopRequest, while the loop runs: the signal that asked it to stop
    signum: int = 0              # that signal, once every process has seen it (0: none)

    @property
    def master(self):  # rank 0: the only process that prints and writes files
        return self.rank == 0

    @property
    def last_path(self):
        return os.path.join(self.out_dir, "last.pt")

    @property
    def best_path(self):
        return os.path.join(self.out_dir, "best.pt")

    @property
    def oom_hint(self):
        return f"out of memory on {describe(self.device)}: {OUT_OF_MEMORY}"

    def say(self, text):
        if self.master:
            log(text)


# ----------------------------------------------------------------------------- before the model is built

def start_run(model_cfg, train_cfg, options=None, preset="custom", given=None):
    """Everything before the model is built, in order: processes and device, the run folder
    (resume it, or refuse to overwrite another run), the checkpoint to start from, precision,
    and the seed (the same on every rank: identical initial weights)."""
    started = process_start()
    options, given = options or RunOptions(), given or {}
    train_cfg = dataclasses.replace(train_cfg)  # the run's own copy: a time budget sets its max_steps
    rank, world, device = setup_distributed(choose_device(train_cfg.device))
    say = log if rank == 0 else (lambda *a: None)
    out_dir = train_cfg.out_dir
    source = find_resume(os.path.join(out_dir, "last.pt"), RESUMABLE, say) if options.resume else None
    if source:
        model_cfg, train_cfg = resume_configs(source, given, os.path.join(out_dir, "last.pt"))
        train_cfg = dataclasses.replace(train_cfg, out_dir=out_dir)
        preset = resumed_preset(source, options, preset, out_dir)
    elif not options.overfit_batch:
        claim_out_dir(out_dir, options.overwrite, rank == 0, say, keep=options.init_from)
    check_batch_split(train_cfg.batch_size, train_cfg.grad_accum_steps, world)
    threads = set_threads(train_cfg.threads)
    dtype = resolve_dtype(train_cfg.dtype, device)
    run = Run(options, given, model_cfg, train_cfg, preset, started, rank, world, device, dtype,
              autocast(device, dtype), make_scaler(device, dtype), threads, out_dir)
    if source:
        run.source, run.source_name = source, run.last_path
    elif options.init_from:
        run.source, run.source_name = load_source(options.init_from, given), options.init_from
    configure_matmul(device)
    seed_everything(train_cfg.seed)
    return run


def process_start():
    """When python train.py began, on machinery.clock: the time budget counts importing
    torch too. Its first line imports machinery, which notes the time; the process itself may be
    older (sh -c 'pip install ... && python train.py' can exec python in the shell's process).
    Where train() is called from other Python code (a notebook, a test), the run starts the clock."""
    if os.path.basename(sys.argv[0]) != "train.py":
        return machinery.clock()
    return machinery.FIRST_IMPORT


def resumed_preset(checkpoint, options, preset, out_dir):
    """A resumed run keeps the preset it was started with."""
    saved = checkpoint.get("preset", preset)
    if options.preset and options.preset != saved:
        raise TinyLLMError(f"{out_dir}/last.pt is a run of preset '{saved}'; --resume cannot switch it to "
                           f"--preset {options.preset} (drop the flag, or start another --out_dir)")
    return saved


def load_data(run):
    """(corpus, model) for train.build: the run's text as a utils.Corpus (sources.load_corpus:
    a file, a folder, JSONL, Q&A, or a corpus prepared on disk), each split checked to hold one
    window at least; and the GPT a resumed or fine-tuned run starts from, on the CPU, its
    vocabulary grown by characters the text adds (else None, for a fresh run)."""
    cfg = run.train_cfg
    model, tokenizer = starting_point(run)
    # vocab_size is BPE's target size; the GPT's own comes from the tokenizer
    run.corpus = load_corpus(cfg, tokenizer, run.model_cfg.vocab_size, extend=bool(run.options.init_from))
    check_splits(run.corpus, (model.config if model else run.model_cfg).block_size, cfg.data)
    if model is not None and run.corpus.added:  # characters the checkpoint never saw: a new embedding row each
        add_characters(run, model, tokenizer)
    return run.corpus, model


def starting_point(run):
    """(model, tokenizer) of the checkpoint a resumed or fine-tuned run starts from (on the
    CPU; train.build moves the model), or (None, None) for a fresh run."""
    if not run.source:
        return None, None
    model = model_from_checkpoint(run.source, run.source_name)
    return model, tokenizer_of(run.source, model.config.vocab_size, run.source_name)


def add_characters(run, model, tokenizer):
    """Fine-tuning on text with characters the checkpoint's tokenizer lacks: grow the model's
    vocabulary by them (checkpoint.grow_vocabulary) and say so."""
    corpus = run.corpus
    grow_vocabulary(model, corpus.old_ids + list(range(tokenizer.vocab_size, model.config.vocab_size)))
    run.say(f"added {len(corpus.added)} character(s) {''.join(corpus.added)[:60]!r} that {run.source_name} "
            f"lacked to the vocabulary ({tokenizer.vocab_size} -> {corpus.tokenizer.vocab_size} tokens)")


def load_source(path, given):
    """The checkpoint a fine-tuning run starts from: one of ours (.pt), or OpenAI's GPT-2
    weights by name (gpt2, gpt2-medium, ...) or from a Hugging Face folder. The model keeps
    its shape: model flags that say otherwise are refused rather than ignored; --dropout may
    change (it changes no weight)."""
    if path.endswith(".pt"):
        source = load_checkpoint(path)
    else:
        from machinery.hf_gpt2 import gpt2_checkpoint, load_gpt2  # needs transformers: imported only when asked
        source = gpt2_checkpoint(load_gpt2(path))
    differ = conflicting_flags(given, source["model_config"], ("dropout", "vocab_size"), "it has")
    if differ:
        raise TinyLLMError(f"--init_from {path} keeps that model's shape; drop {', '.join(differ)}")
    if "dropout" in given:
        source["model_config"] = {**source["model_config"], "dropout": given["dropout"]}
    return source


# ----------------------------------------------------------------------------- after the model is built

def ready(run, train_step):
    """Everything between building the model and the first step: a resumed run gets back its
    optimizer, progress and random state; each process gets batches of its own; the model is
    compiled and wrapped for DDP when asked; where --dtype auto leaves the precision to
    measurement, a few trial steps of train_step measure it, and a --time_budget run is set to
    be planned after its first steps (calibrate.py); the start-up lines say what will happen."""
    cfg = run.train_cfg
    run.model_cfg, run.tokenizer = run.model.config, run.corpus.tokenizer
    run.micro_batch = cfg.batch_size // run.world // cfg.grad_accum_steps
    run.state = TrainState()
    if run.options.resume and run.source:
        restore(run, run.source)
    run.earlier_seconds = run.state.seconds
    if run.world > 1:  # each rank draws its own batches (resumed runs too, from the step on)
        seed_everything(rank_seed(cfg.seed, run.rank, run.state.step))
    run.train_model = wrap(torch.compile(run.model) if cfg.compile else run.model, run.world, run.device)
    if run.options.overfit_batch:
        fix_batch_for_overfitting(run)
    run.eval_iters = math.ceil(cfg.eval_iters / run.world)
    run.log_interval = 1 if run.options.overfit_batch else cfg.log_interval
    calibrate(run, train_step)
    run.peak = peak_flops(run.device, run.dtype) if run.master else None
    print_header(run)
    now = machinery.clock()
    run.meter = Meter(mark=now, process_start=now)


def restore(run, checkpoint):
    """Put a resumed run back exactly where it was: optimizer moments, loss scale, progress,
    every RNG; and re-plan the LR decay when --max_steps changed."""
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    if run.scaler and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    state = TrainState(**{k: checkpoint[k] for k in dataclasses.asdict(TrainState()) if k in checkpoint})
    for row in state.history:  # rows written before progress rows existed were evaluations
        row.setdefault("kind", "eval")
    if state.decay_from is not None and len(state.decay_from) == 2:  # written as [step, lr]: a new cosine from lr
        state.decay_from = [*state.decay_from, 0.0]
    cfg, saved = run.train_cfg, checkpoint["train_config"]
    if cfg.replans:  # a replayed run: its re-plans had moved the end of the first plan's --max_steps
        cfg.max_steps = saved["max_steps"]
    if cfg.max_steps != saved["max_steps"]:
        if state.step >= cfg.max_steps:
            raise TinyLLMError(f"the run is already at step {state.step}; --max_steps {cfg.max_steps} "
                               f"would not train it further")
        new, cfg.max_steps = cfg.max_steps, saved["max_steps"]
        move_end(state, cfg, new)  # the rest of the cosine, stretched to the new end
        run.say(f"--max_steps {saved['max_steps']} -> {cfg.max_steps}: the LR now decays from "
                f"{get_lr(state.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, state.decay_from):.2e} "
                f"at step {state.step} to {cfg.min_lr:g} at step {cfg.max_steps}")
    run.state = state
    set_rng_state(checkpoint["rng"])


def fix_batch_for_overfitting(run):
    """--overfit_batch: every step trains on one batch, drawn once (after the seeds are set)."""
    fixed = run.next_batch()
    run.next_batch = lambda: fixed
    run.say("overfit_batch: training on one fixed batch, writing nothing; the loss should fall towards 0")


def print_header(run):
    m, cfg, tokens = run.model_cfg, run.train_cfg, run.corpus
    processes = f" x {run.world} processes" if run.world > 1 else ""
    precision = run.dtype_note or explain_dtype(cfg.dtype, run.dtype)
    run.say(f"device {describe(run.device)} ({precision}, {run.threads} threads){processes} "
            f"| preset {run.preset} | data {cfg.data}")
    run.say(f"model {run.model.num_params():,} parameters: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
            f"block {m.block_size}, vocab {m.vocab_size} | norm {m.norm}, mlp {m.mlp}, pos {m.pos} "
            f"| optimizer {cfg.optimizer}")
    split = [f"{run.world} processes"] if run.world > 1 else []
    split += [f"{cfg.grad_accum_steps} micro-batches"] if cfg.grad_accum_steps > 1 else []
    run.say(f"tokens per step {cfg.batch_size * m.block_size:,} = batch {cfg.batch_size} x block {m.block_size}"
            + (f" ({' x '.join(split)} of {run.micro_batch})" if split else "")
            + f" | train {len(tokens.train):,} tokens, val {len(tokens.val):,} tokens")
    for line in describe_start(run):
        run.say(line)
    if cfg.max_steps <= cfg.warmup_steps:
        warn(f"--max_steps {cfg.max_steps} ends within the warmup ({cfg.warmup_steps} steps): the LR never "
             f"reaches its peak nor decays; use a smaller --warmup_steps")


# ----------------------------------------------------------------------------- during the loop

@contextlib.contextmanager
def guarded(run):
    """Around the loop: Ctrl-C or SIGTERM asks it to finish its step and stop (after_step sees
    it; finish saves and exits with the signal's code; a second Ctrl-C aborts); running out of
    device memory is one error line saying what to try."""
    with out_of_memory_as_error(run.oom_hint), StopRequest(announce=run.master) as stop:
        run.stop_request = stop
        yield stop


@contextlib.contextmanager
def off_the_clock(run, evaluation=False):
    """Time spent inside (evaluating, saving) does not count as step time. The first
    evaluation's time is kept, for planning a time budget."""
    meter = run.meter
    if not meter.paused:
        settle(run)
        start = machinery.clock()
    meter.paused += 1
    try:
        yield
    finally:
        meter.paused -= 1
        if not meter.paused:
            meter.mark = machinery.clock()
            if evaluation:
                meter.eval_seconds = meter.mark - start


def evaluating(run):
    """Around an evaluation and its saves: off the step clock, its time kept for the time budget's plans."""
    return off_the_clock(run, evaluation=True)


def settle(run):
    """Read the pending steps' losses and gradient norms from the device in one go (the only
    place the loop waits for a GPU), and stop the run on a value that is not finite, with an
    error: such a step was skipped, so the weights are still finite, and because every save and
    every line reads the steps here first, nothing after it is saved or reported."""
    meter = run.meter
    if not meter.pending:
        return
    seconds = machinery.clock() - meter.mark  # the device has finished these steps only now
    meter.seconds += seconds
    meter.steps += len(meter.pending)
    meter.process_seconds += seconds
    meter.process_steps += len(meter.pending)
    steps = [s for s, _, _ in meter.pending]
    values = torch.stack([torch.stack((loss.float(), norm.float())) for _, loss, norm in meter.pending]).tolist()
    meter.pending = []
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


def after_evaluation(run, losses):
    """Record an evaluation ({"train": loss, "val": loss} of this process): a line and a history
    row, last.pt (and best.pt when val improved), the plots; and stop the run early (stop_reason)
    on --patience or --target_loss. Returns the val loss, averaged over the processes."""
    state, cfg = run.state, run.train_cfg
    # each rank evaluated its share of the batches; the average is the same everywhere,
    # so every rank takes the same best / early-stopping decisions
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
    line = f"eval {state.step:>6}/{steps_shown(run)} | train {train_loss:.4f} | val {val_loss:.4f} ({bits:.3f} bits/char)"
    if state.step == 0:
        line += f" | uniform baseline ln(V) = {math.log(run.model_cfg.vocab_size):.4f}"
    run.say(line + (" | new best" if improved else ""))
    if not run.options.overfit_batch:
        save(run, run.last_path)
        if improved:
            save(run, run.best_path)
        if run.master:
            write_history(state.history, run.out_dir)
            if cfg.plots and run.plan_at is None:  # a budget's LR schedule is known once it is planned
                plot_history(state.history, run.out_dir, run.model_cfg.vocab_size, cfg, state.decay_from)
    run.stop_reason = run.stop_reason or early_stop(run, val_loss)
    return val_loss


def early_stop(run, val_loss):
    """Why the run stops after this evaluation (--patience evaluations without a better val
    loss, or --target_loss reached), else None."""
    state, cfg = run.state, run.train_cfg
    if cfg.patience and state.evals_without_improvement >= cfg.patience:
        return (f"early stop: val loss has not improved for {cfg.patience} evaluations "
                f"(best {state.best_val_loss:.4f} kept in {run.best_path})")
    if cfg.target_loss and val_loss <= cfg.target_loss:
        return f"target reached: val loss {val_loss:.4f} <= {cfg.target_loss:g} at step {state.step}"
    return None


def after_step(run, loss, grad_norm, lr):
    """After each step, in order: book it (its loss and gradient norm stay on the device for now);
    every log_interval steps a progress line and a history row (settle: a value that is not finite
    stops the run with an error); every save_interval steps a ckpt_STEP.pt; --overfit_batch's stop;
    a --time_budget run's plan (max_steps, the end of the LR schedule); a stop signal's stop."""
    state, cfg = run.state, run.train_cfg
    state.lr = lr
    run.meter.pending.append((state.step, loss, grad_norm))
    if state.step % run.log_interval == 0:
        log_progress(run)
    if cfg.save_interval and state.step % cfg.save_interval == 0:
        save(run, os.path.join(run.out_dir, f"ckpt_{state.step:07d}.pt"))
        if run.master:
            prune_periodic(run.out_dir, cfg.keep_last)
    run.stop_reason = run.stop_reason or overfit_reached(run)
    if plan_due(run):
        plan_time_budget(run)
    run.signum = stop_signal(run, run.stop_request)
    if run.signum:
        run.stop_reason = run.stop_reason or f"stopped by signal {run.signum}"


def overfit_reached(run):
    """--overfit_batch: why the run stops (its loss fell below 0.01 at a progress line), else None."""
    if run.overfit_step is None:
        return None
    return f"overfit_batch: loss below 0.01 at step {run.overfit_step}"


def save_for_resume(run):
    """A stop signal came: last.pt, and the command that resumes it."""
    save(run, run.last_path)
    run.say(f"saved {run.last_path} at step {run.state.step}. "
            f"Resume with: python train.py --resume --out_dir {run.out_dir}")


def plan_due(run):
    """Whether max_steps is (re-)planned after this step: a time budget's first plan once its
    first steps are timed, then its re-plans at every progress line; a replayed run's re-plans
    (--replans) at the steps they were made."""
    if run.plan_at is not None:
        return run.state.step == run.plan_at
    if run.train_cfg.replans:
        return run.state.step in replan_steps(run.train_cfg)
    return budgeted(run) and run.state.step % run.log_interval == 0


def budgeted(run):
    """A --time_budget run whose plan is made."""
    return bool(run.train_cfg.time_budget) and "max_steps" in (run.state.plan or {})


def plan_time_budget(run):
    """Fix max_steps, the end of the LR schedule, so that the run ends within its budget: the
    first plan (calibrate.plan_run, which says so), a re-plan at the latest pace, or a replayed
    re-plan. The cosine's rest is stretched or shrunk to a new end, so the LR never jumps."""
    settle(run)
    if run.plan_at is not None:
        plan_run(run)
    elif run.train_cfg.replans:
        replay(run)
    else:
        replan(run)
    run.meter.mark = machinery.clock()  # planning is not step time


def steps_shown(run):
    """max_steps as the progress lines show it: '?' until a time budget's plan is made."""
    return "?" if run.plan_at is not None else run.train_cfg.max_steps


def log_progress(run):
    """A progress line (loss, LR, grad norm, speed, ETA) and a history row for the steps since the last one."""
    settle(run)
    state, cfg, meter = run.state, run.train_cfg, run.meter
    ms = 1000 * meter.seconds / max(1, meter.steps)
    loss = sum(l for l, _ in state.window) / max(1, len(state.window))
    tokens_per_s = cfg.batch_size * run.model_cfg.block_size / ms * 1000
    state.history.append({"kind": "train", "step": state.step, "train_loss": loss, "val_loss": None,
                          "lr": state.lr, "grad_norm": state.grad_norm, "ms_per_step": ms, "seconds": elapsed(run)})
    eta = "?" if run.plan_at is not None else format_seconds((cfg.max_steps - state.step) * ms / 1000)
    line = (f"step {state.step:>6}/{steps_shown(run)} | loss {loss:.4f} | lr {state.lr:.2e} | grad norm "
            f"{state.grad_norm if state.grad_norm is not None else float('nan'):.3f} | {ms:.1f} ms/step | "
            f"{tokens_per_s:,.0f} tok/s | ETA {eta}")
    if run.peak:
        line += f" | MFU {100 * flops_per_token(run.model) * tokens_per_s / (run.peak * run.world):.1f}%"
    if not run.options.overfit_batch or state.step % cfg.log_interval == 0:
        run.say(line)
    if run.options.overfit_batch and loss < 0.01 and run.overfit_step is None:
        run.overfit_step = state.step
    if meter.steps:
        meter.recent = (meter.recent + [(meter.steps, meter.seconds)])[-RECENT_LINES:]
    state.window, meter.seconds, meter.steps, meter.mark = [], 0.0, 0, machinery.clock()


def stop_signal(run, stop):
    """The signal that asked the run to stop (0: none), the same on every rank. One process
    looks every step; several agree at progress lines, so no step waits for the others."""
    if run.world == 1:
        return stop.signum or 0
    if run.state.step % run.log_interval:
        return 0
    return all_ranks_max(stop.signum or 0, run.world, run.device)


# ----------------------------------------------------------------------------- files

def elapsed(run):
    """Training wall time of the whole run so far, over every process (resumes)."""
    return run.state.seconds + machinery.clock() - run.meter.process_start


def save(run, path):
    """A checkpoint of the run as it stands (rank 0 writes it; every rank settles its steps first)."""
    with off_the_clock(run):
        if run.master:
            run.state.seconds = elapsed(run)
            run.meter.process_start = machinery.clock()
            save_checkpoint(path, make_checkpoint(
                run.model, run.model_cfg, run.tokenizer, optimizer=run.optimizer.state_dict(),
                train_config=dataclasses.asdict(run.train_cfg), preset=run.preset, rng=rng_state(),
                scaler=run.scaler.state_dict() if run.scaler else None, **dataclasses.asdict(run.state)))


def write_history(history, out_dir):
    fields = ["kind", "step", "train_loss", "val_loss", "lr", "grad_norm", "ms_per_step", "seconds"]
    with open(os.path.join(out_dir, "history.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    with open(os.path.join(out_dir, "history.json"), "w") as f:
        json.dump(history, f, indent=1)


# ----------------------------------------------------------------------------- the end of a run

def finish(run):
    """Save what the last evaluation did not, say how the run ended, show a sample, and return
    a summary (the history, the trained model, ...). After a stop signal: save last.pt, say how
    to resume, and exit with the signal's code (130 for Ctrl-C, 143 for SIGTERM)."""
    if run.signum:
        save_for_resume(run)
        sys.exit(128 + run.signum)
    state = run.state
    if state.last_eval_step != state.step and not run.options.overfit_batch:  # stopped between evaluations
        save(run, run.last_path)
    if run.stop_reason:
        run.say(run.stop_reason)
    run.say(f"done: {state.step} steps | best val loss {state.best_val_loss:.4f} | total training time "
            f"{format_seconds(elapsed(run))}" + ("" if run.options.overfit_batch else
                                                 f" | {run.out_dir}/: best.pt, last.pt, history.csv"
                                                 + (", loss.png" if run.train_cfg.plots else "")))
    if run.train_cfg.sample_tokens and run.master:
        with out_of_memory_as_error(run.oom_hint):
            run.say("sample:\n" + closing_sample(run))
    if budgeted(run) and run.master:
        for line in describe_end(run):
            run.say(line)
    teardown_distributed(run.world)
    return {"step": state.step, "best_val_loss": state.best_val_loss, "history": state.history,
            "seconds": elapsed(run), "overfit_step": run.overfit_step, "model": run.model}


def closing_sample(run):
    """What the model writes now: sample_tokens tokens at temperature 0.8 from a line end,
    decoded as generate.py decodes: in float32, whatever the training precision (at this size a
    bfloat16 decoding step was no faster, even on an H100)."""
    run.model.eval()
    start = torch.tensor([start_ids(run.tokenizer)], device=run.device)
    out = sampling.generate(run.model, start, run.train_cfg.sample_tokens, temperature=0.8,
                            generator=torch.Generator(run.device).manual_seed(run.train_cfg.seed))
    return run.tokenizer.decode(out[0].tolist())
