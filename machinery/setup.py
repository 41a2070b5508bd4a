"""Setting a run up around train.py's lesson: start (before the model exists), load_data and before_first_step (once
the model and optimizer exist) fill in a Run, only read while it trains; what changes is its TrainState,
which every checkpoint saves, so that a resumed run gets back exactly where it was."""

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from config import GPTConfig, RunOptions, TinyLLMError, TrainConfig, check_batch_split

from machinery import budget
from machinery.checkpoint import claim_out_dir, grow_vocabulary, load_checkpoint, model_from_checkpoint, tokenizer_of
from machinery.cli import first_line, log, warn
from machinery.device import (choose_device, configure_matmul, describe, seed_everything,
                              set_threads)
from machinery.distributed import rank_seed, setup_distributed, wrap
from machinery.precision import (autocast, explain_dtype, make_scaler, measure_dtype,
                                 measured_on, resolve_dtype, trial, trial_step)
from machinery.resume import (RESUMABLE, TrainState, conflicting_flags, find_resume, restore, resume_configs,
                              resumed_preset)
from machinery.sources import check_splits, load_corpus


@dataclass
class Run:
    """A run, only read while it trains: its settings and where it runs (start), what it trains (train.build: the
    corpus, model, optimizer and batches), and how (before_first_step: the state, the model as steps call it,
    the precision)."""
    options: RunOptions
    preset: str
    model_cfg: GPTConfig
    cfg: TrainConfig
    started: float              # when the run began: a time budget counts from here
    rank: int                   # this process, of world processes (1 without torchrun)
    world: int
    device: torch.device
    threads: int = 1
    source: dict = None         # the checkpoint it resumes (options.resume) or fine-tunes (options.init_from)
    source_path: str = ""
    dtype: str = "float32"      # the forward pass's precision, its autocast context and float16's scaler
    ctx: object = None
    scaler: object = None
    corpus: object = None       # utils.Corpus: the train and val token streams, and their tokenizer
    model: torch.nn.Module = None
    optimizer: torch.optim.Optimizer = None
    next_batch: object = None   # () -> (x, y): a training batch of this process
    val_batch: object = None
    train_model: torch.nn.Module = None  # the model as the steps call it: compiled and/or wrapped in DDP
    state: TrainState = None
    trained_from: float = 0.0   # when this process's training began: the run's training time counts from there

    @property
    def master(self):  # rank 0: the only process that prints and writes files
        return self.rank == 0

    @property
    def out_dir(self):
        return self.cfg.out_dir

    @property
    def eval_iters(self):  # batches per split this process evaluates: its share of cfg.eval_iters
        return math.ceil(self.cfg.eval_iters / self.world)

    @property
    def micro_batch(self):  # sequences per forward pass of this process
        return self.cfg.batch_size // self.world // self.cfg.grad_accum_steps

    def say(self, text):
        if self.master:
            log(text)


# ----------------------------------------------------------------------------- before the model is built

def start(model_cfg, train_cfg, options, preset, given, started):
    """Everything before the model is built: processes and device, the run folder, the checkpoint to start
    from, and the seed (the same on every rank: identical initial weights)."""
    rank, world, device = setup_distributed(choose_device(train_cfg.device))
    say = log if rank == 0 else (lambda *a: None)
    out_dir, last = train_cfg.out_dir, os.path.join(train_cfg.out_dir, "last.pt")
    source = find_resume(last, RESUMABLE, say) if options.resume else None
    if source:
        model_cfg, train_cfg = resume_configs(source, given, last)
        train_cfg = dataclasses.replace(train_cfg, out_dir=out_dir)
        preset = resumed_preset(source, options, preset, out_dir)
    elif not options.overfit_batch:
        claim_out_dir(out_dir, options.overwrite, rank == 0, say, keep=options.init_from)
    check_batch_split(train_cfg.batch_size, train_cfg.grad_accum_steps, world)
    if options.overfit_batch:  # trains to a loss near 0, or to max_steps: never to a time budget
        train_cfg = dataclasses.replace(train_cfg, time_budget="")
    run = Run(options, preset, model_cfg, train_cfg, started, rank, world, device, set_threads(train_cfg.threads))
    if source:
        run.source, run.source_path = source, last
    elif options.init_from:
        run.source, run.source_path = load_source(options.init_from, given), options.init_from
    configure_matmul(device)
    seed_everything(train_cfg.seed)
    return run


def load_source(path, given):
    """The checkpoint a fine-tuning run starts from: ours (.pt), or GPT-2's by name or Hugging Face folder.
    Its shape stays: differing model flags are refused, not ignored; --dropout may (it changes no weight)."""
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


def load_data(run):
    """(corpus, model): the run's text as a utils.Corpus, each split checked to hold a window; and the GPT a
    resumed or fine-tuned run starts from, on the CPU, grown by any new characters (None for a fresh run)."""
    cfg, model, tokenizer = run.cfg, None, None
    if run.source:
        model = model_from_checkpoint(run.source, run.source_path)
        tokenizer = tokenizer_of(run.source, model.config.vocab_size, run.source_path)
    # vocab_size is BPE's target size; the GPT's own comes from the tokenizer
    corpus = load_corpus(cfg, tokenizer, run.model_cfg.vocab_size, extend=bool(run.options.init_from))
    check_splits(corpus, (model.config if model else run.model_cfg).block_size, cfg.data)
    if model is not None and corpus.added:  # characters the checkpoint never saw: a new embedding row each
        grow_vocabulary(model, corpus.old_ids + list(range(tokenizer.vocab_size, model.config.vocab_size)))
        run.say(f"added {len(corpus.added)} character(s) {''.join(corpus.added)[:60]!r} that {run.source_path} "
                f"lacked to the vocabulary ({tokenizer.vocab_size} -> {corpus.tokenizer.vocab_size} tokens)")
    return corpus, model


# ----------------------------------------------------------------------------- after the model is built

def before_first_step(run, train_step):
    """Everything between building the model and the first step: resumed state, batches per process,
    compile and DDP, the precision (by train_step's trial steps if --dtype auto asks)."""
    cfg = run.cfg
    run.model_cfg = run.model.config
    run.state = restore(run, run.source) if run.options.resume and run.source else TrainState()
    if run.world > 1:  # each rank draws its own batches (resumed runs too, from the step on)
        seed_everything(rank_seed(cfg.seed, run.rank, run.state.step))
    run.train_model = wrap(torch.compile(run.model) if cfg.compile else run.model, run.world, run.device)
    if run.options.overfit_batch:  # every step trains on one batch, drawn once (after the seeds are set)
        fixed = run.next_batch()
        run.next_batch = lambda: fixed
        run.say("overfit_batch: training on one fixed batch, writing nothing; the loss should fall towards 0")
    set_precision(run, resolve_dtype(cfg.dtype, run.device))
    if cfg.compile:
        check_compiles(run, train_step)
    if cfg.dtype == "auto" and measured_on(run.device):  # a resumed run keeps what its first process measured
        plan = run.state.plan if (run.state.plan or {}).get("dtype") else measure_dtype(run, train_step)
        run.state.plan = plan
        set_precision(run, plan["dtype"])
    if run.options.resume and run.source and run.source.get("scaler") and run.scaler:
        run.scaler.load_state_dict(run.source["scaler"])
    print_header(run)
    run.trained_from = budget.now()


def check_compiles(run, train_step):
    """--compile compiles at the first step, and fails there where torch's compiler lacks what it
    needs (a C++ compiler: on Windows, Visual C++). One trial step finds out before the run writes
    anything, and keeps the compiled code for the steps that follow."""
    try:
        with trial(run):
            trial_step(run, train_step, run.ctx, run.scaler)
    except torch.OutOfMemoryError:
        raise  # train()'s own line says what to try
    except Exception as e:  # torch 2.5 raises a missing compiler as a plain RuntimeError: any error counts
        raise TinyLLMError(f"--compile failed on this machine ({first_line(e)}); run without --compile") from None


def set_precision(run, dtype):
    run.dtype, run.ctx, run.scaler = dtype, autocast(run.device, dtype), make_scaler(run.device, dtype)


# ----------------------------------------------------------------------------- what the user is told

def print_header(run):
    m, cfg, tokens = run.model_cfg, run.cfg, run.corpus
    processes = f" x {run.world} processes" if run.world > 1 else ""
    precision = (run.state.plan or {}).get("dtype_note") or explain_dtype(cfg.dtype, run.dtype)
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
    if cfg.time_budget and not run.options.overfit_batch:
        run.say(f"time budget {cfg.time_budget}: the LR decays over the run's time; the end is estimated at every "
                f"progress line from the pace of the latest steps" + (", continuing" if run.state.step else ""))
    if not cfg.time_budget and cfg.max_steps <= cfg.warmup_steps:
        warn(f"--max_steps {cfg.max_steps} ends within the warmup ({cfg.warmup_steps} steps): the LR never "
             f"reaches its peak nor decays; use a smaller --warmup_steps")
