"""Pretrain a GPT on a text file: the whole run, top to bottom.

    python train.py     # data/input.txt: this machine's preset, five minutes on a CPU
    python train.py --preset small --max_steps 50 --seed 1
    python train.py --init_from checkpoints/best.pt --data mine.txt --tag mine   # your own text

In order: the run (train: the corpus, the GPT, its batches; fit: the optimizer, the state, the
loop, the end); the schedule and the optimizer; a step and an evaluation; the loop; progress
lines and saves; the opening and closing lines; the flags and main. The later stages
(finetune.py, distill.py, dpo.py) make their own model and batches and run this file's fit."""

import os
import time

# before torch loads: a time budget counts from here (a tool that trains several runs in one
# process sets it anew before each), and OpenMP's idle threads sleep after 10,000 spins (its
# long default spin made a step 2-9x slower beside a busy process on 2 cores)
STARTED = time.perf_counter()
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import contextlib
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace

import torch

import config
from config import SamplerConfig, TinyLLMError, TrainConfig, parse_duration
from machinery import checkpoint, cli, devices, settle, sources
from model import GPT
from utils import Corpus, bits_per_char, make_batches

# ------------------------------------------------------------------------- the run, top to bottom


def train(settings):
    """Pretraining from settled settings (main, at the bottom): the corpus, a GPT, its batches;
    then fit trains it. Returns fit's summary. Every rank of torchrun runs it."""
    cfg = settings.cfg
    process = start_process(settings)
    corpus = load_corpus(settings)
    if corpus.train_targets is not None:  # the chat template's answers: finetune.py's stage
        fine_tune = f"python finetune.py --init_from CHECKPOINT --data {cfg.data}"
        raise TinyLLMError(f"{cfg.data} holds conversations: fine-tune on them with {fine_tune}")
    model = make_model(settings, corpus)
    batches = corpus_batches(settings, corpus, model, process)
    return fit(settings, process, corpus, model, batches)


def start_process(settings):
    """This process (its rank of world under torchrun), its threads, and the seed."""
    process = devices.setup_process(settings.device)
    devices.set_threads(settings.cfg.threads)
    devices.seed_everything(settings.cfg.seed)  # the same initial weights on every rank
    return process


def load_corpus(settings):
    """The text as train and val token ids: by the tokenizer of the model it starts from (grown
    by a fine-tune's new tokens), else by a new one."""
    saved, cfg = settings.saved, settings.cfg
    tokenizer = checkpoint.tokenizer_of(saved, settings.path) if saved else None
    grow = saved is not None and not settings.resumed  # a resume's vocabulary is fixed
    corpus = sources.load_corpus(cfg, tokenizer, settings.model_cfg.vocab_size, grow)
    if corpus.old_ids:
        new = [i for i, old in enumerate(corpus.old_ids) if old is None]
        added = corpus.tokenizer.decode(new)[:60]
        cli.log(f"added {len(new)} token(s) {added!r} to the vocabulary of {settings.path}")
    return corpus


def make_model(settings, corpus):
    """The GPT to train: fresh, random weights; or --init_from's (or a resume's), with a row for
    each token the text added."""
    if settings.saved is None:
        return GPT(replace(settings.model_cfg, vocab_size=corpus.tokenizer.vocab_size))
    model, _ = saved_model(settings, corpus)
    if settings.saved.get("lora"):  # a LoRA adapter's model (finetune.py), trained in full
        from lora import merge

        model = merge(model)
    return model


def saved_model(settings, corpus):
    """The model a run starts from (--init_from's or a resume's) with a row for each token the
    corpus added; and rows, None if it added none: each row's row in the saved model, or None."""
    model = checkpoint.model_of(settings.saved, settings.path)
    rows = None
    if corpus.old_ids:
        rows = checkpoint.grow_vocabulary(model, corpus.old_ids)
    return model, rows


def corpus_batches(settings, corpus, model, process):
    """{"train", "val": () -> (x, y)}: random windows of the corpus, this process's share."""
    cfg, block_size = settings.cfg, model.config.block_size
    for ids, name in ((corpus.train, "train"), (corpus.val, "validation")):
        sources.check_long_enough(ids, block_size, name, cfg.data)
    micro_batch = cfg.batch_size // process.world // cfg.grad_accum_steps
    return make_batches(corpus, block_size, micro_batch, cfg.data_fraction, process.device)


@dataclass
class Stage:
    """What a later stage adds to fit's run (pretraining and finetune.py add none): the wrapper
    its steps call around the model, model(x, y) -> (out, loss); its own figures on each
    progress line, () -> {name: number}; its checkpoints' own entries."""

    wrapper: torch.nn.Module
    figures: object = None
    entries: dict = field(default_factory=dict)


def fit(settings, process, corpus, model, batches, stage=None):
    """Train model on batches: precision, optimizer, state (a resume's as saved), loop, end; a
    summary. stage: what a later stage adds (Stage), or None."""
    cfg, last = settings.cfg, settings.saved if settings.resumed else {}  # last.pt, resumed
    hint = "out of memory: try a smaller --batch_size or model, or --grad_accum_steps 2"
    with devices.out_of_memory_as_error(hint):
        stepped = stage.wrapper if stage else model  # what a step calls
        stepped.to(process.device)  # the model, and a frozen one beside it
        dtype, why = devices.resolve_dtype(cfg.dtype, process.device)
        ctx = devices.autocast(process.device, dtype)  # the forward pass in dtype
        scaler = devices.make_scaler(process.device, dtype)  # float16's: else a disabled one
        optimizer = make_optimizer(model, cfg, process.device, dtype)
        state = TrainState(max_steps=cfg.max_steps)
        if last:
            scaler.load_state_dict(last["scaler"])
            state = restore(settings, optimizer, process)
        if process.world > 1 and len(last.get("rngs", [])) != process.world:  # own batches
            devices.seed_everything((cfg.seed + 1000 * process.rank + 7919 * state.step) % 2**32)
        if settings.options.overfit_batch:  # a sanity check: every step trains on one batch
            fixed = batches["train"]()
            batches["train"] = lambda: fixed
            cli.log("overfit_batch: one fixed batch, writing nothing; the loss should fall to 0")
        stepped = process.wrap(torch.compile(stepped) if cfg.compile else stepped)
        if cfg.compile:
            compile_first(model, stepped, batches["train"](), ctx, scaler)
        options = settings.options
        if options.overwrite and not options.overfit_batch and not last and process.rank == 0:
            checkpoint.clear_out_dir(cfg.out_dir)  # the old run's files go now, bad input refused
        if not cfg.time_budget and cfg.max_steps <= cfg.warmup_steps and process.rank == 0:
            steps = f"--max_steps {cfg.max_steps} ends within the warmup ({cfg.warmup_steps} steps)"
            cli.warn(f"{steps}: the LR never decays")
        run = Run(
            cfg=cfg,
            stage=settings.stage,
            preset=settings.preset,
            process=process,
            corpus=corpus,
            model=model,
            stepped=stepped,
            optimizer=optimizer,
            dtype=dtype,
            why=why,
            ctx=ctx,
            scaler=scaler,
            batches=batches,
            state=state,
            stop=cli.StopRequest(announce=process.rank == 0),
            figures=stage.figures if stage else None,
            entries=stage.entries if stage else {},
            writes_files=not options.overfit_batch,
            started=STARTED,
        )
        print_header(run)
        return loop(run)


@dataclass
class Run:
    """What the loop reads: the run's pieces, made by fit."""

    cfg: TrainConfig
    stage: str  # the script that runs it: train, finetune, distill, dpo
    preset: str
    process: devices.Process  # this process's rank of world (1 without torchrun), and its device
    corpus: Corpus
    model: torch.nn.Module  # the GPT trained and saved
    stepped: torch.nn.Module  # what a step calls: the model or a stage's wrapper; compiled, DDP
    optimizer: torch.optim.Optimizer
    dtype: str  # the forward pass's precision, and why it is that one
    why: str
    ctx: object  # its autocast
    scaler: torch.amp.GradScaler  # float16's loss scaler; in another dtype a disabled one
    batches: dict  # "train", "val": () -> (x, y), this process's share of a batch
    state: "TrainState"
    stop: cli.StopRequest  # Ctrl-C, SIGTERM or a reader gone, during the loop
    figures: object  # a stage's own figures on each progress line: () -> {name: number}, or None
    entries: dict  # a stage's own checkpoint entries
    writes_files: bool  # not --overfit_batch, a check that writes nothing
    started: float  # when its time began, in perf_counter seconds: a time budget counts from it

    @property
    def master(self):  # rank 0 alone prints and writes
        return self.process.rank == 0

    @property
    def tokens_per_step(self):
        return self.cfg.batch_size * self.model.config.block_size

    def say(self, text):  # a line from rank 0 (cli.log); its reader gone stops the run
        self.stop.say(text)


def compile_first(model, stepped, batch, ctx, scaler):
    """--compile's first forward and backward, now: a missing compiler is one error line before
    anything is written. They leave no trace: no gradient, every random generator as it was."""
    rngs = checkpoint.rng_state()
    try:
        with ctx:
            scaler.scale(stepped(*batch)[1]).backward()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # torch 2.5 raises a missing compiler as a plain RuntimeError
        failed = f"--compile failed on this machine ({cli.first_line(e)})"
        raise TinyLLMError(f"{failed}; run without it") from None
    finally:
        checkpoint.set_rng_state(rngs)
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------- the state: where the run ends


@dataclass
class TrainState:
    """How far the run is, where it ends, and what it has seen: every checkpoint saves it and
    --resume puts it back. The end of training is here: the run ends at step max_steps, where
    the schedule's decay ends (get_lr). A --time_budget sets max_steps before every step: the
    steps that fit in the time left (budget_end)."""

    step: int = 0  # the steps taken
    max_steps: int = 0  # the step the run ends at: --max_steps, or a time budget's plan
    lr: float = 0.0  # the latest step's
    seconds: float = 0.0  # the run's wall time before this process (a resume's)
    eval_seconds: float = 0.0  # the latest evaluation's: a time budget keeps as much at its end
    best_val_loss: float = float("inf")
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    history: list = field(default_factory=list)  # a row per progress line and per evaluation
    window: list = field(default_factory=list)  # each step's figures since the last line


def time_left(state, budget, now):
    """Seconds left for steps of a budget of seconds, now seconds into the run: 99% of it (1%: the
    closing sample, the exit), less the last evaluation's time. None: no budget (--max_steps)."""
    return None if budget is None else 0.99 * budget - state.eval_seconds - now


def budget_end(state, cfg, left, pace):
    """The step a --time_budget run ends at: as many steps as fit in the seconds left, at pace
    (a step's seconds in this process so far, 0 before its first; an evaluation is no step, and
    the time it took is no longer left). Planned again before every step, so a machine that
    slows down ends the run on time, its schedule ending with it. Never within the warmup; and
    a run whose time ran out before the step its plan ended at takes one more, its last."""
    if state.step <= cfg.warmup_steps and left <= 0:
        raise TinyLLMError(
            f"--time_budget {cfg.time_budget} is too short here: it was spent before the "
            f"warmup's {cfg.warmup_steps} steps; give more time or fewer --warmup_steps"
        )
    if not pace:  # no step yet: the plan a resume saved, or the warmup's
        return max(state.max_steps, cfg.warmup_steps + 1)
    planned = state.step + math.floor(left / pace)
    if planned <= state.step:  # out of time: the step before was the last, or this one is
        planned = min(state.max_steps, state.step + 1)
    return max(cfg.warmup_steps + 1, planned)


def restore(settings, optimizer, process):
    """The state of a resumed run as saved, its optimizer and random numbers put back. A field
    added to TrainState since the checkpoint was written takes its default."""
    saved, cfg = settings.saved, settings.cfg
    checkpoint.load_optimizer(optimizer, saved["optimizer"], settings.path)
    state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
    rngs = saved.get("rngs") or [saved["rng"]]
    checkpoint.set_rng_state(rngs[process.rank] if len(rngs) == process.world else rngs[0])
    if not cfg.time_budget:  # a resume may give a new --max_steps
        if state.step >= cfg.max_steps and cfg.max_steps != saved["train_config"]["max_steps"]:
            stop = f"--max_steps {cfg.max_steps} trains no more"
            raise TinyLLMError(f"the run is at step {state.step}: {stop}")
        state.max_steps = cfg.max_steps
    return state


# ----------------------------------------------------------------- the schedule and the optimizer


def get_lr(step, max_steps, cfg):
    """The learning rate of a step: a linear warmup up to cfg.lr over warmup_steps steps, then a
    decay from lr to min_lr as the run's progress goes from 0 (the warmup's end) to 1 at step
    max_steps, where the run ends (TrainState): the last step, max_steps - 1, is a step short of
    it, as in nanoGPT. A new shape is a choice of lr_schedule in config.py and a formula here."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.lr_schedule == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"get_lr has no formula for lr_schedule {cfg.lr_schedule!r}")


def param_groups(model, cfg):
    """The trained parameters in groups, each group with its own settings: weight decay on the
    matrices (embeddings, linear weights), not on biases or norm gains; under Muon, its own group
    for the blocks' matrices. A group's lr_scale multiplies the schedule's learning rate for its
    parameters (train_step). names: what a group holds, so that a resume finds it again."""
    muon = dict(lr_scale=cfg.muon_lr / cfg.lr, weight_decay=0.0, muon=True)
    decayed, not_decayed = dict(weight_decay=cfg.weight_decay), dict(weight_decay=0.0)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and p.dim() == 2 and name.startswith("blocks."):
            group = muon
        else:
            group = decayed if p.dim() >= 2 else not_decayed
        group.setdefault("names", []).append(name)
        group.setdefault("params", []).append(p)
    return [group for group in (muon, decayed, not_decayed) if "params" in group]


def make_optimizer(model, cfg, device, dtype="float32"):
    """AdamW (or Muon, for --optimizer muon: muon.py) over the model's parameter groups. dtype:
    the run's precision, which Muon's orthogonalization takes (bfloat16 halves its cost)."""
    groups, betas = param_groups(model, cfg), (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        from muon import Muon

        ns_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        return Muon(groups, lr=cfg.lr, betas=betas, dtype=ns_dtype)
    # fused: one kernel per tensor, faster on CPUs too; not on a Mac, whose fused kernel
    # mishandles float16's skipped steps in torch 2.5-2.7 (docs/platforms.md)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=device.type in ("cuda", "cpu"))


# ------------------------------------------------------------------------- one step, an evaluation


def train_step(model, optimizer, next_batch, lr, cfg, ctx, scaler):
    """One optimizer step. Its figures stay tensors: reading one makes a GPU wait, so the loop
    reads them at the next progress line. A new figure is a new entry here, one number a step:
    it reaches the progress line and history. model may be wrapped (DDP, compile, a stage's)."""
    for group in optimizer.param_groups:  # 1. this step's learning rate, times a group's multiple
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)  # 2. forget the last step's gradients
    batch_loss = 0.0
    for micro_step in range(cfg.grad_accum_steps):  # a batch may come in micro-batches
        x, y = next_batch()  # 3. a batch: y is x shifted by one token
        # DDP averages the gradients once a step, at the last micro-batch
        last = micro_step == cfg.grad_accum_steps - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if last else model.no_sync():
            with ctx:
                _, loss = model(x, y)  # 4. forward, 5. the loss
            loss = loss / cfg.grad_accum_steps  # the micro-batches' gradients add up
            scaler.scale(loss).backward()  # 6. backward (float16 scales: no underflow)
        batch_loss = batch_loss + loss.detach()
    scaler.unscale_(optimizer)  # float16's scaler: the true gradient, to clip
    # 7. clip the gradient's norm (grad_clip 0: only measure it)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    scaler.step(optimizer)  # 8. update the weights (float16: unless it overflowed)
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


# -------------------------------------------------------------------------------------- the loop


def loop(run):
    """Evaluate now and then and take steps until the run's end (state.max_steps) or an early
    stop; then finish."""
    cfg, state, process = run.cfg, run.state, run.process
    first_step = state.step  # this process's pace counts from here
    first_seconds = elapsed(run)
    line_step = state.step  # the progress line's pace counts from here
    line_started = time.perf_counter()
    budget = parse_duration(cfg.time_budget)  # seconds, or None: a run of --max_steps
    stop_reason, signum = None, 0
    with run.stop as stop:
        while True:
            # by the ranks' mean clock: theirs differ, and all must decide alike
            now = process.mean([elapsed(run)])[0] if cfg.time_budget else 0.0
            left = time_left(state, budget, now)
            if left is not None:  # a time budget: where the run ends, at its pace so far
                steps = state.step - first_step
                pace = (now - first_seconds) / steps if steps else 0.0
                state.max_steps = budget_end(state, cfg, left, pace)
            at_end = state.step >= state.max_steps
            # evaluate every eval_interval steps (under a time budget, if time is left for steps
            # after it) and at the end, never twice at one step (a resume starts at its last one)
            room = left is None or left > state.eval_seconds
            due = at_end or (state.step % cfg.eval_interval == 0 and room)
            if due and state.step != state.last_eval_step:
                stop_reason = evaluate(run) or stop_reason  # --patience, --target_loss
                first_seconds += state.eval_seconds  # no step: the paces leave it out
                line_started += state.eval_seconds
                continue  # it took time: plan again
            # Ctrl-C or SIGTERM on any rank stops all; under DDP they compare at progress lines
            if process.world == 1 or state.step % cfg.log_interval == 0 or at_end or stop_reason:
                signum = max(process.every_rank(stop.signum or 0))
            if at_end or stop_reason or signum:
                break

            # one step at the schedule's learning rate
            state.lr = get_lr(state.step, state.max_steps, cfg)
            batch = run.batches["train"]
            figures = train_step(
                run.stepped, run.optimizer, batch, state.lr, cfg, run.ctx, run.scaler
            )
            state.window.append(figures)
            state.step += 1

            if state.step % cfg.log_interval == 0:
                seconds = (time.perf_counter() - line_started) / (state.step - line_step)
                stop_reason = log_progress(run, seconds)  # --overfit_batch done
                line_step = state.step
                line_started = time.perf_counter()
            if cfg.save_interval and state.step % cfg.save_interval == 0 and run.writes_files:
                save(run, f"ckpt_{state.step:07d}.pt")
                if run.master:
                    checkpoint.keep_newest(cfg.out_dir, cfg.keep_last)
    if signum:
        stop_reason = f"stopped by signal {signum}"
    return finish(run, stop_reason, signum)


def elapsed(run):
    """The run's seconds: this process's since it started, plus those before a resume."""
    return run.state.seconds + time.perf_counter() - run.started


# ---------------------------------------------------------------------------------- progress lines


def read_window(state):
    """The figures of the steps since the last progress line, as numbers (a GPU waits for them)."""
    state.window = [{k: float(v) for k, v in row.items()} for row in state.window]
    return state.window


def check_finite(run):
    """A loss or a gradient that is not finite stops the run, before it is saved."""
    rows = read_window(run.state)
    for n, row in enumerate(rows, run.state.step - len(rows)):
        # float16 skips a step whose gradient overflowed: the step changed nothing
        finite_grad = math.isfinite(row.get("grad_norm", 0.0)) or run.scaler.is_enabled()
        if not (math.isfinite(row["loss"]) and finite_grad):
            raise TinyLLMError(
                f"step {n}: the loss or the gradient is not finite (loss {row['loss']}); nothing "
                f"non-finite was saved. Try a lower --lr, --grad_clip 1, or --dtype float32"
            )


FORMATS = {"loss": ".4f", "lr": ".2e", "grad_norm": ".3f"}  # how a figure prints (others: .4g)


def log_progress(run, seconds):
    """A line and a history row: the mean of each figure over the steps since the last line (a
    resume's saved rows may lack a figure added since), and seconds, a step's; why overfit_batch
    stops."""
    state = run.state
    check_finite(run)
    rows = read_window(state)
    figures = {}
    for name in rows[-1]:
        values = [row[name] for row in rows if name in row]
        figures[name] = sum(values) / len(values)
    tokens_per_s = run.tokens_per_step / seconds if seconds else 0.0
    eta = cli.format_seconds((state.max_steps - state.step) * seconds)
    if run.figures:  # a stage's own: a preference run's held-out pairs
        figures |= run.figures()
    shown = " | ".join(f"{k} {format(v, FORMATS.get(k, '.4g'))}" for k, v in figures.items())
    pace = f"{1000 * seconds:.1f} ms/step | {tokens_per_s:,.0f} tok/s | ETA {eta}"
    run.say(f"step {state.step:>6}/{state.max_steps} | {shown} | {pace}")
    row = {"kind": "train", "step": state.step, **figures, "ms_per_step": 1000 * seconds}
    state.history.append(row | {"tok_per_s": tokens_per_s, "seconds": elapsed(run)})
    state.window = []
    # --overfit_batch: done when the processes' mean loss is near 0 (each has its own batch)
    if not run.writes_files and run.process.mean([figures["loss"]])[0] < 0.01:
        return f"overfit_batch: loss below 0.01 at step {state.step}"


# ------------------------------------------------------------------------------ evaluations, saves


def evaluate(run):
    """Both splits' losses, a line, a history row, the run's files; why the run stops, or None.
    The baseline, before any step, is printed and kept in the history: no best, nothing written."""
    cfg, state, started = run.cfg, run.state, time.perf_counter()
    iters = math.ceil(cfg.eval_iters / run.process.world)
    losses = estimate_loss(run.stepped, run.batches, iters, run.ctx)
    # the ranks' mean, the same on every rank
    train_loss, val_loss = run.process.mean([losses["train"], losses["val"]])
    state.last_eval_step = state.step
    row = dict(kind="eval", step=state.step, train_loss=train_loss, val_loss=val_loss)
    state.history.append(row | dict(lr=state.lr, seconds=elapsed(run)))
    bits = bits_per_char(val_loss, run.corpus.chars_per_token)
    baseline = state.step == 0  # before any step: nothing to keep yet
    end = "?" if baseline and cfg.time_budget else state.max_steps  # no pace yet
    line = f"eval {state.step:>6}/{end} | train {train_loss:.4f} | val {val_loss:.4f} "
    line += f"({bits:.3f} bits/char)"
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
    # a time budget keeps as much time for the last evaluation, saves included
    state.eval_seconds = run.process.mean([time.perf_counter() - started])[0]
    if cfg.patience and state.evals_without_improvement >= cfg.patience:
        evals = f"{cfg.patience} evaluations (best {state.best_val_loss:.4f})"
        return f"early stop: val loss has not improved for {evals}"
    if cfg.target_loss and val_loss <= cfg.target_loss and not baseline:
        return f"target reached: val loss {val_loss:.4f} <= {cfg.target_loss:g} at {state.step}"


def save(run, name):
    """out_dir/name: the model and tokenizer, all --resume needs to go on exactly (the optimizer,
    the state, every rank's random state), and where and how it trained, for its model card
    (tools.export). Every rank calls it; rank 0 writes."""
    check_finite(run)
    rngs = run.process.every_rank(checkpoint.rng_state())
    if not run.master:
        return
    state = asdict(run.state) | {"seconds": elapsed(run)}
    if run.process.world > 1:
        state["rngs"] = rngs
    saved = checkpoint.create(
        run.model,
        run.corpus.tokenizer.to_dict(),
        stage=run.stage,
        optimizer=run.optimizer.state_dict(),
        scaler=run.scaler.state_dict(),  # {}: float16's alone has a state
        rng=rngs[0],
        train_config=asdict(run.cfg),
        preset=run.preset,
        device=devices.name(run.process.device),
        dtype=run.dtype,
        chars_per_token=run.corpus.chars_per_token,
        **state,
        **run.entries,  # a stage's own: dpo.py's reference
    )
    checkpoint.save(os.path.join(run.cfg.out_dir, name), saved)


# --------------------------------------------------------------------- the opening lines, the end


def print_header(run):
    """The run's opening lines: device and precision, model, tokens, and how it ends."""
    cfg, m, model, process = run.cfg, run.model.config, run.model, run.process
    why = f": {run.why}" if cfg.dtype == "auto" else ""
    threads = f"{torch.get_num_threads()} threads"
    device = f"{devices.name(process.device)} ({run.dtype}{why}, {threads})"
    device += f" x {process.world} processes" if process.world > 1 else ""
    run.say(f"device {device} | preset {run.preset} | data {cfg.data}")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    part = f" ({trained:,} trained: {100 * trained / model.num_params():.2f}%)"
    shape = f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}"
    shown = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # the rest: every variant
    parts = ", ".join(f"{k} {v}" for k, v in vars(m).items() if k not in shown)
    params = f"{model.num_params():,} parameters{part if trained < model.num_params() else ''}"
    run.say(f"model {params}: {shape}, vocab {m.vocab_size} | {parts} | optimizer {cfg.optimizer}")
    micro = process.world * cfg.grad_accum_steps
    split = f" ({process.world} processes x {cfg.grad_accum_steps} micro-batches)"
    tokens = f"train {len(run.corpus.train):,} tokens, val {len(run.corpus.val):,} tokens"
    batch = f"batch {cfg.batch_size} x block {m.block_size}{split if micro > 1 else ''}"
    run.say(f"tokens per step {run.tokens_per_step:,} = {batch} | {tokens}")
    if cfg.time_budget:
        schedule = f"after the warmup the {cfg.lr_schedule} schedule ends as the time does"
        run.say(f"time budget {cfg.time_budget}: {schedule}")
    elif run.state.step:  # a resumed run: where it is in the schedule of its --max_steps
        state = run.state
        now = get_lr(state.step, state.max_steps, cfg)
        end = f"{get_lr(state.max_steps, state.max_steps, cfg):.3g} at step {state.max_steps}"
        run.say(f"from step {state.step}: {cfg.lr_schedule} LR {now:.3g} now, {end}")


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
            resume = f"python {run.stage}.py --resume --out_dir {cfg.out_dir}"
            run.say(f"saved {last} at step {state.step}. Resume with: {resume}")
        run.process.leave_together()
        sys.exit(128 + signum)
    if stop_reason:
        run.say(stop_reason)
    files = "best.pt, last.pt, history.csv" + (", loss.png" if cfg.plots else "")
    files = f" | {cfg.out_dir}/: {files}" if run.writes_files else ""
    total = cli.format_seconds(elapsed(run))
    best = f"best val loss {state.best_val_loss:.4f}"
    run.say(f"done: {state.step} steps | {best} | total time {total}{files}")
    if cfg.time_budget:
        end = get_lr(state.max_steps, state.max_steps, cfg)
        last_lr = f"the last at LR {state.lr:.4g} (the schedule's end: {end:.4g})"
        used = f"{cli.format_seconds(elapsed(run))} used, {state.step:,} steps"
        run.say(f"time budget {cfg.time_budget}: {used}, {last_lr}")
    if cfg.sample_tokens and run.master:
        run.say("sample:\n" + closing_sample(run, cfg.sample_tokens))
    run.process.leave_together()
    return {
        "step": state.step,
        "best_val_loss": state.best_val_loss,
        "history": state.history,
        "stop_reason": stop_reason,
        "seconds": elapsed(run),
        "model": run.model,
        "corpus": run.corpus,
        "tokens_per_step": run.tokens_per_step,
        "dtype": run.dtype,
    }


# ------------------------------------------------------------------------------- the command line


def flags(argv=None, stage="train", doc=__doc__):
    """The flags given, {name: value}: what to do, the model, the training (config.py's settings;
    a later stage's own too, config.STAGE_SETTINGS). --help shows this machine's preset."""
    here = devices.choose_device("auto")
    preset, machine = devices.machine_preset(here, {})
    presets, may_change = ", ".join(config.PRESETS), ", ".join(config.RESUME_MAY_CHANGE)
    parser = cli.ArgumentParser(
        description=doc.split("\n")[0],  # the script's docstring's first line
        epilog=f"Presets: {presets}. Without --preset this machine uses '{preset}', whose defaults "
        f"are shown. --resume may change only: {may_change}.",
    )
    defaults = {k: (v, f"preset {preset}") for k, v in config.PRESETS[preset].items()}
    defaults |= devices.auto_meanings(here) | {"preset": (preset, f"for {machine} here")}
    stages_own = {name for names in config.STAGE_SETTINGS.values() for name in names}
    names = [f.name for f in fields(TrainConfig) if f.name not in stages_own]
    config.add_flags(parser, config.RunOptions, defaults, title="what to do")
    config.add_flags(parser, config.GPTConfig, defaults, title="model")
    config.add_flags(parser, TrainConfig, defaults, names, title="training")
    if stage in config.STAGE_SETTINGS:
        own = config.STAGE_SETTINGS[stage]
        config.add_flags(parser, TrainConfig, defaults, own, title=f"{stage}.py's own")
    return vars(parser.parse_args(argv))


def main(argv=None, stage="train", run=train, doc=__doc__):
    """train.py's command line, and each later stage's: its flags, its settings settled, then
    --eval_only, --plot_lr, or its run(settings)."""
    given = flags(argv, stage, doc)
    settings = settle.settle(given, stage)  # every setting decided, and checked, here
    options, cfg = settings.options, settings.cfg
    if options.eval_only is not None:  # --eval_only alone: best.pt's
        from machinery.evaluation import evaluate_checkpoint

        evaluate_checkpoint(options.eval_only or f"{cfg.out_dir}/best.pt", given.get("data"), cfg)
    elif options.plot_lr:
        from machinery.plots import draw_lr_schedule

        draw_lr_schedule(cfg, get_lr)
    else:
        run(settings)


if __name__ == "__main__":
    cli.run_cli(main)  # bad input: one error: line and exit status 2
