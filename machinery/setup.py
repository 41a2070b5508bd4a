"""Setting a run up around train.py's lesson, fresh, resumed or fine-tuned: where the run starts (start_run, a Start:
processes, device, run folder, the checkpoint it continues or fine-tunes), the Run the loop works with; what comes
before its first step (random states, --overfit_batch, the precision) and what the user is told of it."""

import dataclasses
import os
from dataclasses import dataclass

import torch

from config import SHAPE, GPTConfig, RunOptions, TinyLLMError, TrainConfig, check_batch_split

from machinery.checkpoint import (claim_out_dir, clear_out_dir, conflicting_flags, load_checkpoint, load_resumable,
                                  model_from_checkpoint, resume_configs, tokenizer_of)
from machinery.cli import first_line, log, warn
from machinery.ddp import every_rank, rank_seed, setup_distributed
from machinery.device import (autocast, choose_device, configure_matmul, describe, explain_dtype, make_scaler,
                              measure_dtype, measured_on, mfu_note, resolve_dtype, seed_everything, set_rng_state,
                              set_threads, trial)
from machinery.sources import check_long_enough, load_corpus, prepared_meta


@dataclass(frozen=True)
class Start:
    """A run before its model is built (start_run makes it): its settings, processes, device and the checkpoint it
    starts from."""
    options: RunOptions
    preset: str
    model_cfg: GPTConfig
    cfg: TrainConfig
    started: float              # when the run began: a time budget counts from here
    rank: int                   # this process, of world processes (1 without torchrun)
    world: int
    device: torch.device
    source: dict                # the checkpoint it resumes (options.resume) or fine-tunes (options.init_from), or None
    source_path: str
    resumed: bool               # source is this run's own last.pt (--resume found one), not a fine-tune's start

    @property
    def master(self):  # rank 0: the only process that prints and writes files
        return self.rank == 0

    @property
    def writes_files(self):  # --overfit_batch, a sanity check, writes nothing
        return not self.options.overfit_batch

    @property
    def micro_batch(self):  # sequences per forward pass of this process
        return self.cfg.batch_size // self.world // self.cfg.grad_accum_steps

    def say(self, text):
        if self.master:
            log(text)


@dataclass(frozen=True)
class Run(Start):
    """What the loop works with, made once by train.setup_run and then only read: the Start, and what was built for
    the first step. What changes as the run trains is inside its state."""
    corpus: object       # utils.Corpus: the train and val token streams, and their tokenizer
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    next_batch: object   # () -> (x, y): a training batch of this process
    val_batch: object
    train_model: torch.nn.Module  # the model as the steps call it: compiled and/or wrapped in DDP
    dtype: str           # the forward pass's precision: its autocast context, and float16's scaler (or None)
    ctx: object
    scaler: object
    train_step: object   # lr -> figures: train.train_step with this run's model, optimizer, batches and precision
    sample_seconds: float  # the closing sample's, timed before the first step for a time budget to keep
    state: object        # train.TrainState: the numbers that change as the run trains


# ----------------------------------------------------------------------------- before the model is built

def start_run(model_cfg, train_cfg, options, preset, given, started):
    """Processes, device, run folder, the checkpoint to start from, and the seed (every rank's: the same weights)."""
    rank, world, device = setup_distributed(choose_device(train_cfg.device))
    say = log if rank == 0 else (lambda *a: None)
    out_dir, last = train_cfg.out_dir, os.path.join(train_cfg.out_dir, "last.pt")
    source = load_resumable(last) if options.resume and os.path.isfile(last) else None
    if options.resume:  # without a last.pt yet, the same command starts the run now and continues it later
        say(f"resuming {last} at step {source['step']}" if source
            else f"--resume: no {last} yet, starting a fresh run")
    if source:
        model_cfg, train_cfg = resume_configs(source, given, last)
        train_cfg = dataclasses.replace(train_cfg, out_dir=out_dir)
        preset = source.get("preset", preset)  # a resumed run keeps the preset it was started with
        if options.preset and options.preset != preset:
            raise TinyLLMError(f"{out_dir}/last.pt is a run of preset '{preset}'; --resume cannot switch it to "
                               f"--preset {options.preset} (drop the flag, or start another --out_dir)")
    elif not options.overfit_batch:
        claim_out_dir(out_dir, options.overwrite, rank == 0, keep=options.init_from)
    check_batch_split(train_cfg.batch_size, train_cfg.grad_accum_steps, world)
    if options.overfit_batch:  # trains to a loss near 0, or to max_steps: never to a time budget
        train_cfg = dataclasses.replace(train_cfg, time_budget="")
    resumed = source is not None
    if options.init_from and not resumed:
        source, last = load_source(options.init_from, given), options.init_from
        train_cfg = dataclasses.replace(train_cfg, tokenizer=tokenizer_kind(source))  # what it trains with
    if meta := prepared_meta(train_cfg.data):  # a tools.prepare folder: its tokenizer and text are made
        made = {k: meta[k] for k in ("vocab_size", "clean") if k in meta} | {"tokenizer": meta["tokenizer"].get("kind")}
        if differ := conflicting_flags(given, made, (), "it has"):
            raise TinyLLMError(f"{train_cfg.data} was made by tools.prepare, which fixed its tokenizer and text: "
                               f"drop {', '.join(differ)}, or prepare it again with them")
        train_cfg = dataclasses.replace(train_cfg, tokenizer=made["tokenizer"])  # what it trains with
    configure_matmul(device)
    set_threads(train_cfg.threads)
    seed_everything(train_cfg.seed)
    return Start(options, preset, model_cfg, train_cfg, started, rank, world, device, source, last, resumed)


def load_source(path, given):
    """A fine-tuning run's start (a .pt, or GPT-2's): its shape stays; --dropout may change (it changes no weight)."""
    if path.lower().endswith(".pt"):
        source = load_checkpoint(path)
    else:
        from machinery.hf_gpt2 import gpt2_checkpoint, load_gpt2  # needs transformers: imported only when asked
        source = gpt2_checkpoint(load_gpt2(path))
    has = {**source["model_config"], "tokenizer": tokenizer_kind(source)}  # its ids are the model's embedding rows
    if differ := conflicting_flags(given, has, ("dropout",), "it has"):
        raise TinyLLMError(f"--init_from {path} keeps that model's shape and tokenizer; drop {', '.join(differ)}")
    if "dropout" in given:
        source["model_config"] = {**source["model_config"], "dropout": given["dropout"]}
    return source


def tokenizer_kind(checkpoint):
    return (checkpoint.get("tokenizer") or {}).get("kind", "char")


def load_corpus_and_model(start):
    """(corpus, model): the checked text, and the GPT a resumed or fine-tuned run starts from (else None)."""
    cfg, model, tokenizer = start.cfg, None, None
    if start.source:
        model = model_from_checkpoint(start.source, start.source_path)
        tokenizer = tokenizer_of(start.source, model.config.vocab_size, start.source_path)
    # vocab_size is BPE's target size; the GPT's own comes from the tokenizer
    corpus = load_corpus(cfg, tokenizer, start.model_cfg.vocab_size, extend=bool(start.options.init_from))
    block_size = (model.config if model else start.model_cfg).block_size  # refused before the model is built
    check_long_enough(corpus.train, block_size, "train", cfg.data)
    check_long_enough(corpus.val, block_size, "validation", cfg.data)
    if model is not None and corpus.added:  # characters the checkpoint never saw: a new embedding row each
        grow_vocabulary(model, corpus.old_ids + list(range(tokenizer.vocab_size, model.config.vocab_size)))
        start.say(f"added {len(corpus.added)} character(s) {''.join(corpus.added)[:60]!r} that {start.source_path} "
                  f"lacked to the vocabulary ({tokenizer.vocab_size} -> {corpus.tokenizer.vocab_size} tokens)")
    return corpus, model


@torch.no_grad()
def grow_vocabulary(model, old_ids):
    """Token i's embedding becomes old row old_ids[i], or where None the mean of the old rows: a neutral start."""
    old = model.wte.weight
    known = [i for i in old_ids if i is not None]
    rows = [old[i] if i is not None else old[known].mean(dim=0) for i in old_ids]
    model.wte = torch.nn.Embedding(len(old_ids), model.config.n_embd, device=old.device, dtype=old.dtype)
    model.wte.weight.copy_(torch.stack(rows))
    model.lm_head = torch.nn.Linear(model.config.n_embd, len(old_ids), bias=False, device=old.device, dtype=old.dtype)
    model.lm_head.weight = model.wte.weight
    model.config = dataclasses.replace(model.config, vocab_size=len(old_ids))


# ----------------------------------------------------------------------------- after the model is built

def set_random_state(start, state):
    """Every RNG as saved on --resume (under torchrun each rank's); else under torchrun each rank a seed of its own,
    so that each draws its own batches (the weights are alike: start_run seeded every rank alike before the build)."""
    rngs = (start.source.get("rngs") or [start.source["rng"]]) if start.resumed else []
    if rngs:
        set_rng_state(rngs[start.rank] if len(rngs) == start.world else rngs[0])
    if start.world > 1 and len(rngs) != start.world:
        seed_everything(rank_seed(start.cfg.seed, start.rank, state.step))


def one_fixed_batch(start, next_batch):
    """--overfit_batch: () -> the same batch every step, drawn once (after the seeds are set)."""
    fixed = next_batch()
    start.say("overfit_batch: training on one fixed batch, writing nothing; the loss should fall towards 0")
    return lambda: fixed


def precision(start, model, optimizer, plan, trial_step):
    """(dtype, ctx, scaler, plan): the forward pass's precision, its autocast, float16's scaler (else None), and what
    --dtype auto measured ({"dtype", "dtype_note"}; plan: a resumed run's as saved, else None)."""
    cfg, device = start.cfg, start.device
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.compile:
        check_compiles(trial_step, model, optimizer, autocast(device, dtype), make_scaler(device, dtype))
    if cfg.dtype == "auto" and measured_on(device):  # a resumed run keeps what its first process measured
        if not (plan or {}).get("dtype"):
            # timings differ between processes: every rank takes rank 0's choice
            plan = every_rank(measure_dtype(trial_step, model, optimizer, device), start.world)[0]
        dtype = plan["dtype"]
    scaler = make_scaler(device, dtype)
    if start.resumed and start.source.get("scaler") and scaler:
        scaler.load_state_dict(start.source["scaler"])
    return dtype, autocast(device, dtype), scaler, plan


def check_compiles(step, model, optimizer, ctx, scaler):
    """One trial step before the run writes anything: --compile fails without a C++ compiler (Windows: Visual C++)."""
    try:
        with trial(model, optimizer, scaler):
            step(ctx, scaler)
    except torch.OutOfMemoryError:
        raise  # train()'s own line says what to try
    except Exception as e:  # torch 2.5 raises a missing compiler as a plain RuntimeError: any error counts
        raise TinyLLMError(f"--compile failed on this machine ({first_line(e)}); run without --compile") from None


def clear_replaced_run(start):
    """--overwrite: the previous run's files go only now, after every check of the new run's input and set-up."""
    if start.options.overwrite and start.master and not start.resumed and start.writes_files:
        clear_out_dir(start.cfg.out_dir, start.say)


# ----------------------------------------------------------------------------- what the user is told

def print_header(start, model, corpus, dtype, state):
    """What the run is: device and precision, the model, the tokens of a step and of the data, the run's end."""
    m, cfg, say = model.config, start.cfg, start.say
    processes = f" x {start.world} processes" if start.world > 1 else ""
    precision = (state.plan or {}).get("dtype_note") or explain_dtype(cfg.dtype, dtype)
    say(f"device {describe(start.device)} ({precision}, {torch.get_num_threads()} threads){processes} "
        f"| preset {start.preset} | data {cfg.data}")
    if note := mfu_note(start.device, dtype):
        say(note)
    variants = ", ".join(f"{f.name} {getattr(m, f.name)}" for f in dataclasses.fields(m)  # a number's 0: off, unsaid
                         if f.name not in SHAPE and getattr(m, f.name) not in (0, False))
    say(f"model {model.num_params():,} parameters: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
        f"block {m.block_size}, vocab {m.vocab_size} | {variants} | optimizer {cfg.optimizer}")
    split = [f"{start.world} processes"] if start.world > 1 else []
    split += [f"{cfg.grad_accum_steps} micro-batches"] if cfg.grad_accum_steps > 1 else []
    say(f"tokens per step {cfg.batch_size * m.block_size:,} = batch {cfg.batch_size} x block {m.block_size}"
        + (f" ({' x '.join(split)} of {start.micro_batch})" if split else "")
        + f" | train {len(corpus.train):,} tokens, val {len(corpus.val):,} tokens")
    if cfg.time_budget:
        say(f"time budget {cfg.time_budget}: after the warmup the LR decays over the time left, less the "
            f"closing evaluation and sample" + (", continuing" if state.step else ""))
    elif cfg.max_steps <= cfg.warmup_steps:
        warn(f"--max_steps {cfg.max_steps} ends within the warmup or with it ({cfg.warmup_steps} steps): the LR "
             f"never decays; use a smaller --warmup_steps")
