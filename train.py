"""Train a GPT on a text file: the lesson, top to bottom.

    python train.py     # data/input.txt: preset tiny on a CPU (five minutes), small on a GPU
    python train.py --preset small --max_steps 50 --seed 1

In order: one step and an evaluation, the set-up, the loop, a time budget, the end. Files, devices, processes
and printing are machinery/'s.
"""

import machinery  # noqa: F401 (first, before torch: it notes the start time and has idle OpenMP threads sleep soon)

import contextlib
import csv
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

import lora
from config import (MAX_SEED, PRESETS, RESUME_MAY_CHANGE, GPTConfig, RunOptions, SamplerConfig, TinyLLMError, TrainConfig,
                    build_configs, default_preset, from_saved, make_config, parse_duration)
from model import GPT, lm_loss
from optim import get_lr, make_optimizer, progress
from sampling import generate
from utils import bits_per_char, get_batch

from machinery import checkpoint, cli, ddp, device as devices, plots, sources


# ----------------------------------------------------------------------------- one step, and an evaluation

def train_step(model, optimizer, next_batch, lr, grad_accum_steps, grad_clip, ctx, scaler=None):
    """One optimizer step. Its figures stay tensors: reading one makes a GPU wait, so the loop reads them later."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # disabled: its calls below do nothing
    for group in optimizer.param_groups:                     # 1. this step's learning rate
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)                    # 2. forget the last step's gradients
    batch_loss = 0.0
    for micro_step in range(grad_accum_steps):               # a batch may come in micro-batches
        x, y = next_batch()                                  # 3. a batch: y is x shifted by one token
        sync = micro_step == grad_accum_steps - 1 or not hasattr(model, "no_sync")  # DDP: average once a step
        with contextlib.nullcontext() if sync else model.no_sync():
            with ctx:
                _, loss = model(x, y)                        # 4. forward, 5. the loss
            loss = loss / grad_accum_steps                   # the micro-batches' gradients add up to the batch's
            scaler.scale(loss).backward()                    # 6. backward (float16 scales the loss: no underflow)
        batch_loss = batch_loss + loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)  # 7. clip (0: measure)
    scaler.step(optimizer)                                   # 8. update the weights (float16: skipped if inf)
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


# ----------------------------------------------------------------------------- a run, and its set-up

@dataclass
class TrainState:
    """What changes as the run trains: saved in every checkpoint, put back by --resume."""
    step: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    lr: float = 0.0             # the latest step's
    grad_norm: float = None     # the latest step's (None before the first)
    progress: float = 0.0       # the latest step's: 0 until the warmup ends, 1 at the run's end
    seconds: float = 0.0        # wall time so far, the processes before a resume included
    decay_start: float = None   # under a time budget: the seconds at the warmup's end
    eval_seconds: float = 0.0   # the latest evaluation's, saves included: a budget keeps as much for the last
    history: list = field(default_factory=list)  # a row per progress line and per evaluation
    window: list = field(default_factory=list)   # the figures of the steps since the last progress line
    measured: dict = None       # what --dtype auto measured: a resume keeps its choice


@dataclass
class Run:
    """What the loop works with, set up once; what changes as it trains is in state."""
    cfg: TrainConfig
    options: RunOptions
    preset: str
    rank: int                   # this process, of world (1 without torchrun)
    world: int
    device: torch.device
    corpus: sources.Corpus
    model: GPT
    train_model: torch.nn.Module  # the model as the steps call it: compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    batches: dict               # "train", "val": () -> (x, y), this process's share of a batch
    state: TrainState
    started: float              # when this process began
    budget: float               # a --time_budget's seconds, else None
    lora: dict                  # a LoRA run's base and adapter settings, else None
    dtype: str = "float32"
    ctx: object = None          # the forward pass's autocast
    scaler: object = None       # float16's
    sample_seconds: float = 0.0  # what the closing sample takes: a budget keeps it free
    pending: list = field(default_factory=list)  # the figures of the steps taken, not read yet
    clock_start: float = 0.0    # the steps' clock: when it last started,
    step_seconds: float = 0.0   # what it counted since the last progress line,
    timed_steps: int = 0        # and in how many steps
    first: tuple = None         # (step, seconds) where this process's pace counts from
    pause: float = 0.0          # the latest evaluation's or save's seconds

    @property
    def master(self):  # rank 0 alone prints and writes
        return self.rank == 0

    @property
    def writes(self):  # --overfit_batch writes nothing
        return not self.options.overfit_batch

    def say(self, text):
        if self.master:
            cli.log(text)

    def elapsed(self):  # this process's seconds, set-up included, plus those before a resume
        return self.state.seconds + time.perf_counter() - self.started


def train(model_cfg, cfg, options=None, preset="custom", given=None, started=None):
    """Train; return a summary. Under torchrun every rank runs this; rank 0 alone prints and writes."""
    with devices.out_of_memory_as_error("out of memory: try a smaller --batch_size or model, or --grad_accum_steps 2"):
        started = time.perf_counter() if started is None else started  # a time budget counts from here
        return train_loop(set_up(model_cfg, cfg, options or RunOptions(), preset, given or {}, started))


def set_up(model_cfg, cfg, options, preset, given, started):
    """Everything before the first step, each input checked before the run writes anything."""
    rank, world, device = ddp.setup(devices.choose_device(cfg.device))
    say = cli.log if rank == 0 else (lambda text: None)
    model_cfg, cfg, preset, source, path, resumed = settings(model_cfg, cfg, options, preset, given, say)
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise TinyLLMError(f"batch_size ({cfg.batch_size}) is not divisible by grad_accum_steps "
                           f"({cfg.grad_accum_steps}) times the processes ({world})")
    devices.set_threads(cfg.threads)
    devices.seed_everything(cfg.seed)  # the same initial weights on every rank
    corpus, model, adapter = data_and_model(model_cfg, cfg, source, path, options, say)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg, device)  # optim.py
    # batches: random windows of block_size tokens; each process takes its share, in micro-batches
    block_size, micro_batch = model.config.block_size, cfg.batch_size // world // cfg.grad_accum_steps
    n = max(block_size + 1, int(len(corpus.train) * cfg.data_fraction))  # --data_fraction: the first part
    splits = {"train": (corpus.train[:n], corpus.train_targets), "val": (corpus.val, corpus.val_targets)}
    batches = {split: functools.partial(get_batch, ids, micro_batch, block_size, device, targets=targets)
               for split, (ids, targets) in splits.items()}  # targets: a conversation's answers, else None
    state = restore(source, optimizer, cfg, rank, world, say) if resumed else TrainState()
    if world > 1 and len(source.get("rngs", []) if resumed else []) != world:  # each rank draws its own batches
        devices.seed_everything((cfg.seed + 1000 * rank + 7919 * state.step) % (MAX_SEED + 1))
    if options.overfit_batch:  # a sanity check: every step trains on one batch
        fixed = batches["train"]()
        batches["train"] = lambda: fixed
        say("overfit_batch: training on one fixed batch, writing nothing; the loss should fall towards 0")
    train_model = ddp.wrap(torch.compile(model) if cfg.compile else model, world, device)
    run = Run(cfg, options, preset, rank, world, device, corpus, model, train_model, optimizer, batches, state,
              started, parse_duration(cfg.time_budget), adapter)
    set_precision(run, source if resumed else {})
    print_header(run, micro_batch)
    if options.overwrite and run.master and run.writes and not resumed:  # the old run's files go only now
        checkpoint.clear_out_dir(cfg.out_dir)
    if run.budget and cfg.sample_tokens:  # a budget keeps time for the closing sample: time 16 tokens
        closing_sample(run, 2)
        t0 = time.perf_counter()
        closing_sample(run, 16)
        run.sample_seconds = ddp.mean([(time.perf_counter() - t0) / 16 * cfg.sample_tokens * 1.2], world, device)[0]
    return run


def settings(model_cfg, cfg, options, preset, given, say):
    """The settings, what the run starts from (last.pt, --init_from's model, or None), and whether it resumes."""
    last = os.path.join(cfg.out_dir, "last.pt")
    source = checkpoint.load(last) if options.resume and os.path.isfile(last) else None
    if options.resume:  # without a last.pt yet, the same command starts the run now and continues it later
        say(f"resuming {last} at {checkpoint.where(source)}" if source else
            f"--resume: no {last} yet, starting a fresh run")
    if source:
        saved, required = source.get("train_config"), ["optimizer", "rng", *asdict(TrainState())]
        if any(k not in source for k in required) or set(saved or ()) != set(asdict(cfg)):
            raise TinyLLMError(f"{last} was written by another version of tinyllm and cannot be resumed; "
                               f"fine-tune from its weights with --init_from instead")
        model_cfg, saved = from_saved(GPTConfig, source["model_config"], last), from_saved(TrainConfig, saved, last)
        if refused := contradicted(given, {**asdict(model_cfg), **asdict(saved)}, RESUME_MAY_CHANGE):
            raise TinyLLMError(f"--resume continues the run in {last}, which cannot change {refused}; drop the "
                               f"flag, or start a new run with another --out_dir")
        if options.preset and options.preset != source.get("preset"):
            raise TinyLLMError(f"{last} is a run of preset {source.get('preset')!r}: --resume keeps it")
        changes = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE} | {"out_dir": cfg.out_dir}
        cfg = replace(saved, **changes | ({"time_budget": ""} if "max_steps" in given else {}))
        return model_cfg, cfg, source.get("preset", preset), source, last, True
    if not options.overfit_batch:
        checkpoint.claim_out_dir(cfg.out_dir, options.overwrite, keep=options.init_from)
    if options.init_from:  # fine-tuning: that model and its tokenizer, a fresh optimizer
        source, last = fine_tune_source(options.init_from, given), options.init_from
        cfg = replace(cfg, tokenizer=source["tokenizer"].get("kind", "char"))
    if os.path.isfile(os.path.join(cfg.data, "meta.json")):  # tools.prepare fixed its tokenizer and text
        meta = sources.load_prepared(cfg.data)[0]
        made = {"vocab_size": meta["vocab_size"], "clean": meta["clean"], "tokenizer": meta["tokenizer"]["kind"]}
        if refused := contradicted(given, made, ()):
            raise TinyLLMError(f"{cfg.data} was made by tools.prepare with its own tokenizer and text: drop {refused}")
        cfg = replace(cfg, tokenizer=made["tokenizer"])
    if options.overfit_batch:  # to a loss near 0, or to max_steps: never to a time budget
        cfg = replace(cfg, time_budget="")
    if cfg.lora_rank and not options.init_from:
        raise TinyLLMError("--lora_rank adapts a trained model: give it with --init_from")
    return model_cfg, cfg, preset, source, last, False


def contradicted(given, saved, may_change):
    """The flags given that contradict saved settings: '--n_layer 4 (it has 2)', or ''."""
    return "; ".join(f"--{k} {v} (it has {saved[k] if saved[k] != '' else 'none'})" for k, v in given.items()
                     if k in saved and k not in may_change and v != saved[k])


def fine_tune_source(path, given):
    """--init_from: a checkpoint, or GPT-2's weights. Only --dropout may change (it is no weight)."""
    if path.lower().endswith(".pt"):
        source = checkpoint.load(path)
    else:
        from machinery.hf_gpt2 import gpt2_checkpoint  # needs transformers: imported only here
        source = gpt2_checkpoint(path)
    has = {**source["model_config"], "tokenizer": source["tokenizer"].get("kind", "char")}
    if refused := contradicted(given, has, ("dropout",)):
        raise TinyLLMError(f"--init_from {path} keeps that model's shape and tokenizer: drop {refused}")
    source["model_config"] |= {k: v for k, v in given.items() if k == "dropout"}
    return source


def data_and_model(model_cfg, cfg, source, path, options, say):
    """The text as train and val token ids (by the source's tokenizer, if any), and the GPT to train."""
    model = tokenizer = None
    if source:
        model = checkpoint.model_of(source, path)
        tokenizer = checkpoint.tokenizer_of(source, model.config.vocab_size, path)
    corpus = sources.load_corpus(cfg, tokenizer, model_cfg.vocab_size, extend=bool(options.init_from))
    block_size = (model.config if model else model_cfg).block_size
    sources.check_long_enough(corpus.train, block_size, "train", cfg.data)
    sources.check_long_enough(corpus.val, block_size, "validation", cfg.data)
    if model is None:  # a fresh GPT, random weights
        return corpus, GPT(replace(model_cfg, vocab_size=corpus.tokenizer.vocab_size)), None
    rows = None  # per embedding row, its row in the source model (None: a new token); None: rows unchanged
    if corpus.added:  # new tokens: each a row at the old rows' mean, plus a little noise
        old, rows = model.wte.weight.detach(), corpus.old_ids + list(range(tokenizer.vocab_size, len(model.wte.weight)))
        mean = old[[i for i in rows if i is not None]].mean(0)  # noise: under LoRA no two new rows alike
        checkpoint.with_embedding(model, torch.stack([old[i] if i is not None else mean + 0.02 * torch.randn_like(mean)
                                                      for i in rows]))
        say(f"added {len(corpus.added)} token(s) {''.join(corpus.added)[:60]!r} to the vocabulary of {path}")
    if not cfg.lora_rank:  # an adapter's model fine-tuned in full is merged first
        return corpus, lora.merge(model), None
    if not (adapter := source.get("lora")):  # a new adapter: the model frozen, small matrices trained beside it
        lora.add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_mlp)
        return corpus, model, dict(base=os.path.abspath(path), rows=rows, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                   mlp=cfg.lora_mlp)  # a LoRA run's checkpoints name its base
    if rows:  # an adapter trained on with new tokens: its rows mapped on to the base's
        adapter = adapter | {"rows": [i if i is None or not adapter["rows"] else adapter["rows"][i] for i in rows]}
    return corpus, model, adapter


def restore(source, optimizer, cfg, rank, world, say):
    """A resumed run's state, optimizer and random numbers as saved; a new --max_steps is a new schedule."""
    # keep this machine's optimizer kernel (fused, foreach): torch places the saved step tensors for it
    groups = [{**saved, **{k: g[k] for k in ("fused", "foreach") if k in g}}
              for saved, g in zip(source["optimizer"]["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**source["optimizer"], "param_groups": groups})
    state = TrainState(**{k: source[k] for k in asdict(TrainState())})
    rngs = source.get("rngs") or [source["rng"]]
    devices.set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    saved = source["train_config"]
    if not cfg.time_budget and (saved["time_budget"] or cfg.max_steps != saved["max_steps"]):
        if state.step >= cfg.max_steps:
            raise TinyLLMError(f"the run is at step {state.step} already: --max_steps {cfg.max_steps} trains no more")
        say(f"--max_steps {cfg.max_steps}: the schedule of a run of {cfg.max_steps} steps from here, LR "
            f"{get_lr(state.step, progress(state.step, cfg), cfg):.3g} now, down to {cfg.min_lr:g} at its end")
    return state


def set_precision(run, saved):
    """The run's dtype, autocast and scaler; --compile and --dtype auto take trial steps first."""
    cfg, device, state = run.cfg, run.device, run.state
    step = functools.partial(train_step, run.train_model, run.optimizer, run.batches["train"],
                             grad_accum_steps=cfg.grad_accum_steps, grad_clip=cfg.grad_clip)
    dtype = devices.resolve_dtype(cfg.dtype, device)
    if cfg.compile:
        try:
            with devices.trial(run.model, run.optimizer, scaler := devices.make_scaler(device, dtype)):
                step(cfg.lr, ctx=devices.autocast(device, dtype), scaler=scaler)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # torch 2.5 raises a missing compiler as a plain RuntimeError
            raise TinyLLMError(f"--compile failed on this machine ({cli.first_line(e)}); run without it") from None
    if cfg.dtype == "auto" and device.type == "cpu" and devices.native_bf16(device):  # bfloat16 if it is faster
        if not state.measured:  # timings differ between processes: every rank takes rank 0's choice
            measured = devices.measure_dtype(lambda ctx: step(cfg.lr, ctx=ctx), run.model, run.optimizer, device)
            state.measured = ddp.every_rank(measured, run.world)[0]
        dtype = state.measured["dtype"]
    run.dtype, run.ctx, run.scaler = dtype, devices.autocast(device, dtype), devices.make_scaler(device, dtype)
    if saved.get("scaler") and run.scaler:
        run.scaler.load_state_dict(saved["scaler"])


def print_header(run, micro_batch):
    """The run's opening lines: device and precision, model, tokens, and how it ends."""
    cfg, m = run.cfg, run.model.config
    precision = (run.state.measured or {}).get("dtype_note") or run.dtype + (" auto" if cfg.dtype == "auto" else "")
    processes = f" x {run.world} processes" if run.world > 1 else ""
    run.say(f"device {devices.describe(run.device)} ({precision}, {torch.get_num_threads()} threads){processes} | "
            f"preset {run.preset} | data {cfg.data}")
    trained = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    part = f" ({trained:,} trained: {100 * trained / run.model.num_params():.2f}%, LoRA)" if run.lora else ""
    run.say(f"model {run.model.num_params():,} parameters{part}: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
            f"block {m.block_size}, vocab {m.vocab_size} | norm {m.norm}, mlp {m.mlp}, pos {m.pos} | "
            f"optimizer {cfg.optimizer}")
    split = f" ({run.world} processes x {cfg.grad_accum_steps} micro-batches of {micro_batch})"
    split = split if run.world * cfg.grad_accum_steps > 1 else ""
    run.say(f"tokens per step {cfg.batch_size * m.block_size:,} = batch {cfg.batch_size} x block {m.block_size}{split}"
            f" | train {len(run.corpus.train):,} tokens, val {len(run.corpus.val):,} tokens")
    if run.budget:
        run.say(f"time budget {cfg.time_budget}: after the warmup the LR decays over the time left")
    elif cfg.max_steps <= cfg.warmup_steps:
        cli.warn(f"--max_steps {cfg.max_steps} ends within the warmup ({cfg.warmup_steps} steps): the LR never decays")


# ----------------------------------------------------------------------------- the loop

def train_loop(run):
    """Evaluate now and then and take steps until the run's end or an early stop; finish says why."""
    cfg, state = run.cfg, run.state
    run.clock_start, run.first = time.perf_counter(), (state.step, clock(run))
    stop_reason, signum = None, 0
    with cli.StopRequest(announce=run.master) as stop:
        while True:
            seconds = clock(run) if run.budget else 0.0
            at_end = state.progress >= 1.0 if run.budget else state.step >= cfg.max_steps
            # evaluate every eval_interval steps (under a budget, if time is left for steps after it) and
            # at the end, never twice at one step (a resumed run starts at its last evaluation)
            room = not run.budget or seconds + state.eval_seconds < budget_end(run)
            if (at_end or state.step % cfg.eval_interval == 0 and room) and state.step != state.last_eval_step:
                stop_reason = evaluate(run) or stop_reason  # --patience, --target_loss
                seconds = clock(run) if run.budget else 0.0
            if at_end or stop_reason:  # a stop signal during the last evaluation still counts
                signum = max(ddp.every_rank(stop.signum or 0, run.world))
                break

            # one step at the schedule's learning rate: by how far the run is, in steps or in a --time_budget
            state.progress = budget_progress(run, seconds) if run.budget else progress(state.step, cfg)
            lr = get_lr(state.step, state.progress, cfg)
            run.pending.append(train_step(run.train_model, run.optimizer, run.batches["train"], lr,
                                          cfg.grad_accum_steps, cfg.grad_clip, run.ctx, run.scaler))
            state.step += 1

            if state.step % cfg.log_interval == 0:
                stop_reason = log_progress(run)  # --overfit_batch done
            if cfg.save_interval and state.step % cfg.save_interval == 0 and run.writes:
                save(run, f"ckpt_{state.step:07d}.pt")
                if run.master:
                    checkpoint.keep_newest(cfg.out_dir, cfg.keep_last)
            # Ctrl-C or SIGTERM on any rank stops all; they compare only at progress lines (a wait)
            if run.world == 1 or state.step % cfg.log_interval == 0:
                signum = max(ddp.every_rank(stop.signum or 0, run.world))
            if signum:
                stop_reason = f"stopped by signal {signum}"
                break
    read_figures(run)  # the steps since the last line, before the last save
    return finish(run, stop_reason, signum)


def read_figures(run):
    """The pending steps' figures into the window, read in one wait for the device; stops at a non-finite loss."""
    tensors = [v.detach().float().reshape(()) for f in run.pending for v in f.values() if torch.is_tensor(v)]
    values = iter(torch.stack(tensors).tolist() if tensors else [])
    for n, figures in enumerate(run.pending, run.state.step - len(run.pending)):
        figures = {k: next(values) if torch.is_tensor(v) else float(v) for k, v in figures.items()}
        if not math.isfinite(figures["loss"]) or not (run.scaler or math.isfinite(figures["grad_norm"])):
            raise TinyLLMError(f"step {n}: the loss or the gradient is not finite (loss {figures['loss']}); nothing "
                               f"non-finite was saved. Try a lower --lr, --grad_clip 1, or --dtype bfloat16 or float32")
        run.state.window.append(figures)
        run.state.lr = figures["lr"]
        run.state.grad_norm = figures["grad_norm"] if math.isfinite(figures["grad_norm"]) else None  # a float16 skip
    now = time.perf_counter()
    run.step_seconds, run.timed_steps = run.step_seconds + now - run.clock_start, run.timed_steps + len(run.pending)
    run.clock_start, run.pending = now, []


@contextlib.contextmanager
def paused(run):
    """Around an evaluation or a save: the steps' figures read first, its time kept off the steps' clock."""
    read_figures(run)
    start = time.perf_counter()
    yield
    run.clock_start = time.perf_counter()
    run.pause = run.clock_start - start


FORMATS = {"loss": ".4f", "lr": ".2e", "grad_norm": ".3f"}  # how a figure prints (others: .4g)


def log_progress(run):
    """A progress line and a history row: the mean figures of the steps since the last; why --overfit_batch stops."""
    state = run.state
    read_figures(run)
    figures = {k: sum(v) / len(v) if (v := [r[k] for r in state.window if r[k] is not None]) else None
               for k in state.window[0]}
    ms, state.window = 1000 * run.step_seconds / max(1, run.timed_steps), []
    run.step_seconds, run.timed_steps = 0.0, 0
    tokens_per_s = run.cfg.batch_size * run.model.config.block_size / ms * 1000 if ms else 0.0
    end = end_step(run, ms / 1000)
    eta = cli.format_seconds((end - state.step) * ms / 1000) if end else "?"
    shown = " | ".join(f"{k} {'-' if v is None else format(v, FORMATS.get(k, '.4g'))}" for k, v in figures.items())
    run.say(f"step {state.step:>6}/{end or '?'} | {shown} | {ms:.1f} ms/step | {tokens_per_s:,.0f} tok/s | ETA {eta}")
    state.history.append({"kind": "train", "step": state.step, **figures, "ms_per_step": ms,
                          "tok_per_s": tokens_per_s, "seconds": run.elapsed()})
    # --overfit_batch: done when the processes' mean loss is near 0 (each has its own batch)
    if run.options.overfit_batch and ddp.mean([figures["loss"]], run.world, run.device)[0] < 0.01:
        return f"overfit_batch: loss below 0.01 at step {state.step}"


def evaluate(run):
    """Both splits' losses, a line, a history row and the run's files; returns why the run stops early, or None."""
    cfg, state = run.cfg, run.state
    with paused(run):
        losses = estimate_loss(run.train_model, run.batches, math.ceil(cfg.eval_iters / run.world), run.ctx)
        train_loss, val_loss = ddp.mean([losses["train"], losses["val"]], run.world, run.device)  # same on all ranks
        improved = val_loss < state.best_val_loss
        state.best_val_loss = min(val_loss, state.best_val_loss)
        state.evals_without_improvement = 0 if improved else state.evals_without_improvement + 1
        state.last_eval_step = state.step
        state.history.append({"kind": "eval", "step": state.step, "train_loss": train_loss, "val_loss": val_loss,
                              "lr": state.lr, "grad_norm": state.grad_norm, "seconds": run.elapsed()})
        bits = bits_per_char(val_loss, run.corpus.chars_per_token)
        baseline = f" | uniform baseline ln(V) = {math.log(run.model.config.vocab_size):.4f}" if state.step == 0 else ""
        run.say(f"eval {state.step:>6}/{end_step(run) or '?'} | train {train_loss:.4f} | val {val_loss:.4f} "
                f"({bits:.3f} bits/char){baseline}{' | new best' if improved else ''}")
        if run.writes:
            save(run, "last.pt")
            if improved:
                save(run, "best.pt")
            if run.master:
                write_history(run)
    state.eval_seconds = ddp.mean([run.pause], run.world, run.device)[0]  # a budget keeps as much for the last
    if cfg.patience and state.evals_without_improvement >= cfg.patience:
        return f"early stop: val loss has not improved for {cfg.patience} evaluations (best {state.best_val_loss:.4f})"
    if cfg.target_loss and val_loss <= cfg.target_loss:
        return f"target reached: val loss {val_loss:.4f} <= {cfg.target_loss:g} at step {state.step}"


def write_history(run):
    """history.csv, a row per progress line and evaluation, and loss.png."""
    history = run.state.history
    with open(os.path.join(run.cfg.out_dir, "history.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in history for k in row)))
        writer.writeheader()
        writer.writerows(history)
    if run.cfg.plots:
        plots.plot_loss(history, os.path.join(run.cfg.out_dir, "loss.png"), run.model.config.vocab_size)


def save(run, name):
    """out_dir/name: all --resume needs to go on exactly, every rank's random state too. All ranks call it."""
    with paused(run):
        rngs = ddp.every_rank(devices.rng_state(), run.world)
        if run.master:
            checkpoint.save(os.path.join(run.cfg.out_dir, name), checkpoint.make(
                run.model, run.corpus.tokenizer.to_dict(), optimizer=run.optimizer.state_dict(),
                train_config=asdict(run.cfg), preset=run.preset, scaler=run.scaler and run.scaler.state_dict(), lora=run.lora,
                rng=rngs[0], **{"rngs": rngs} if run.world > 1 else {}, **asdict(run.state) | {"seconds": run.elapsed()}))


# ----------------------------------------------------------------------------- a time budget

def clock(run):
    """The run's seconds so far, the ranks' mean: their clocks differ a little, and all must decide alike."""
    return ddp.mean([run.elapsed()], run.world, run.device)[0]


def budget_end(run):
    """When the steps must end: the budget, less room for the closing evaluation and sample (and 1% to exit)."""
    return run.budget * 0.99 - run.state.eval_seconds - run.sample_seconds


def budget_progress(run, seconds):
    """How far a budgeted run is: 0 through the warmup, then the share spent of the time from the warmup's end
    to the budget's, counted at this step's end (the step that crosses it is at 1)."""
    state, cfg = run.state, run.cfg
    if state.step <= cfg.warmup_steps:
        if seconds >= budget_end(run):
            raise TinyLLMError(f"--time_budget {cfg.time_budget} is too short here: {seconds:.1f}s were gone before "
                               f"the warmup's {cfg.warmup_steps} steps; give more time or fewer --warmup_steps")
        state.decay_start = seconds
        return 0.0
    pace = (seconds - run.first[1]) / max(1, state.step - run.first[0])  # a step's seconds, evaluations included
    return min(1.0, (seconds + pace - state.decay_start) / max(1e-9, budget_end(run) - state.decay_start))


def end_step(run, pace=None):
    """The step the run ends at: max_steps, or a budget's estimate at its pace so far (None before one)."""
    if not run.budget:
        return run.cfg.max_steps
    steps, seconds = run.state.step - run.first[0], run.elapsed() - run.first[1]
    pace = seconds / steps if steps else pace
    return run.state.step + max(0, math.ceil((budget_end(run) - run.elapsed()) / pace)) if pace else None


# ----------------------------------------------------------------------------- the end

def finish(run, stop_reason, signum):
    """last.pt if steps came after the last evaluation, the closing lines and sample, a summary. Stopped by a
    signal: last.pt, how to resume, and exit status 128 + the signal (130 Ctrl-C, 143 SIGTERM)."""
    state, cfg = run.state, run.cfg
    if run.writes and (signum or state.last_eval_step != state.step):
        save(run, "last.pt")
    if signum:
        if run.writes:
            run.say(f"saved {os.path.join(cfg.out_dir, 'last.pt')} at step {state.step}. "
                    f"Resume with: python train.py --resume --out_dir {cfg.out_dir}")
        ddp.leave_together(run.world)
        sys.exit(128 + signum)
    files = f" | {cfg.out_dir}/: best.pt, last.pt, history.csv" + (", loss.png" if cfg.plots else "")
    if stop_reason:
        run.say(stop_reason)
    run.say(f"done: {state.step} steps | best val loss {state.best_val_loss:.4f} | total time "
            f"{cli.format_seconds(run.elapsed())}{files if run.writes else ''}")
    if run.budget:
        run.say(f"time budget {cfg.time_budget}: {cli.format_seconds(clock(run))} used, {state.step:,} steps, the "
                f"last at LR {state.lr:.4g} (floor {cfg.min_lr:g})")
    if cfg.sample_tokens and run.master:
        run.say("sample:\n" + closing_sample(run, cfg.sample_tokens))
    ddp.leave_together(run.world)
    return {"step": state.step, "best_val_loss": state.best_val_loss, "history": state.history, "model": run.model,
            "seconds": run.elapsed(), "stop_reason": stop_reason, "corpus": run.corpus, "dtype": run.dtype}


def closing_sample(run, tokens):
    """A sample as generate.py draws it (its seed, in float32: bfloat16 is no faster here)."""
    start = torch.tensor([sources.start_ids(run.corpus.tokenizer)], device=run.device)
    out = generate(run.model.eval(), start, tokens, SamplerConfig(),
                   generator=torch.Generator(run.device).manual_seed(run.cfg.seed))
    run.model.train()
    return run.corpus.tokenizer.decode(out[0].tolist())


# ----------------------------------------------------------------------------- --eval_only, and the command line

def evaluate_checkpoint(path, data, device, batch_size, threads):
    """Loss, perplexity and bits per character on every position of a checkpoint's val split (or data's)."""
    devices.set_threads(threads)
    model, tokenizer, saved = checkpoint.load_model(path, devices.choose_device(device))
    corpus, data = sources.validation_split(saved, tokenizer, data)
    val = torch.as_tensor(np.asarray(corpus.val, dtype=np.int64))
    losses = token_losses(model, val, batch_size)  # of tokens 1..n-1: a conversation's answers' alone
    loss = (losses if corpus.val_targets is None else losses[corpus.val_targets[1:]]).mean().item()
    cli.log(f"{path} on the val split of {data} ({len(val):,} tokens, every position once):\nloss {loss:.4f} "
            f"nats/token | perplexity {math.exp(loss):.3f} | {bits_per_char(loss, corpus.chars_per_token):.4f} "
            f"bits per character")


@torch.no_grad()
def token_losses(model, ids, batch_size=1):
    """The loss (nats) of every token of ids (n,) but the first, (n - 1,), each once, in windows of block_size."""
    model.eval()
    T, device = model.config.block_size, model.wte.weight.device
    n = (len(ids) - 1) // T  # whole windows, then the tail
    windows = ids[:n * T + 1].unfold(0, T + 1, T) if n else ids[:0].view(0, T + 1)  # (n, T + 1)
    chunks = [windows[i:i + batch_size] for i in range(0, n, batch_size)]
    tail = len(ids) - 1 - n * T
    chunks += [ids[-tail - 1:][None]] if tail > 0 else []
    losses = []
    for rows in chunks:  # (b, t + 1): t inputs, each with its next token
        logits, _ = model(rows[:, :-1].to(device))  # (b, t, V)
        losses.append(lm_loss(logits, rows[:, 1:].to(device), reduction="none").cpu())  # (b * t,)
    return torch.cat(losses)


def parse_flags(argv=None):
    """(options, model_cfg, train_cfg, preset, given): the flags given, on top of --preset or this machine's."""
    here = devices.choose_device("auto")
    preset = default_preset(here.type)
    parser = cli.ArgumentParser(description="Train a GPT language model on a text file.", epilog=(
        f"Presets: {', '.join(PRESETS)}. Without --preset this machine uses '{preset}', whose defaults are shown. "
        f"--resume may change only: {', '.join(RESUME_MAY_CHANGE)}."))
    defaults = {**{k: (v, f"preset {preset}") for k, v in PRESETS[preset].items()}, **devices.auto_meanings(here),
                "preset": (preset, f"on this machine ({here.type})")}
    for cls, title in ((RunOptions, "what to do"), (GPTConfig, "model"), (TrainConfig, "training")):
        cli.add_config_flags(parser, cls, defaults, title=title)
    given = cli.given_flags(parser.parse_args(argv))
    options = make_config(RunOptions, given)
    here = devices.choose_device(given["device"]) if "device" in given else here
    preset = options.preset or default_preset(here.type)
    if not options.preset and os.environ.get("RANK", "0") == "0" and not options.resume:
        cli.log(f"no --preset given: using '{preset}' for {here.type}")
    return options, *build_configs(given, preset), preset, given


def main(argv=None, started=None):
    options, model_cfg, cfg, preset, given = parse_flags(argv)
    if options.eval_only is not None:  # --eval_only alone: best.pt's
        path = options.eval_only or os.path.join(cfg.out_dir, "best.pt")
        evaluate_checkpoint(path, given.get("data"), cfg.device, cfg.batch_size, cfg.threads)
    elif options.plot_lr:
        plots.draw_lr_schedule(cfg)
    else:
        train(model_cfg, cfg, options, preset, given, started)


if __name__ == "__main__":
    # bad input: one error: line and exit status 2. A time budget counts from the process's start
    cli.run_cli(lambda argv: main(argv, started=machinery.STARTED))
