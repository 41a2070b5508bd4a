"""What a training run needs besides the lesson, as plain functions: the set-up that train.set_up
calls in order (the settings, checked against a resumed or fine-tuned checkpoint; the data and
the model, with new tokens and LoRA; the precision; the opening lines), the time budget's clock,
the closing sample, and train.py's command line."""

import functools
import os
from dataclasses import asdict, dataclass, field, replace

import torch

import lora
from config import (
    ASSISTANT,
    PRESETS,
    RESUME_MAY_CHANGE,
    USER,
    GPTConfig,
    RunOptions,
    SamplerConfig,
    TinyLLMError,
    TrainConfig,
    build_configs,
    default_preset,
    from_saved,
    make_config,
)
from machinery import checkpoint, cli, ddp, sources
from machinery import device as devices
from model import GPT
from optim import Steps, TimeBudget, get_lr, progress
from sampling import generate
from utils import get_batch


@dataclass
class TrainState:
    """What the steps change: saved in every checkpoint, put back by --resume."""

    step: int = 0
    best_val_loss: float = float("inf")
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    lr: float = 0.0  # the latest step's
    grad_norm: float = None  # the latest step's (None before the first)
    progress: float = 0.0  # the latest step's: 0 through the warmup, 1 at the run's end
    seconds: float = 0.0  # the run's wall time before this process (a resume's)
    decay_start: float = None  # under a time budget: the seconds at the warmup's end
    eval_seconds: float = 0.0  # the latest evaluation's: a budget keeps as much for the last
    history: list = field(default_factory=list)  # a row per progress line and per evaluation
    window: list = field(default_factory=list)  # the figures of the steps since the last line


@dataclass
class Run:
    """What the loop works with; state holds what a checkpoint saves, the rest is this process's."""

    cfg: TrainConfig
    options: RunOptions
    preset: str
    rank: int  # this process, of world (1 without torchrun)
    world: int
    device: torch.device
    corpus: sources.Corpus
    model: GPT
    train_model: torch.nn.Module  # the model as the steps call it: compiled, wrapped in DDP
    optimizer: torch.optim.Optimizer
    batches: dict  # "train", "val": () -> (x, y), this process's share of a batch
    state: TrainState
    clock: object  # () -> this process's seconds so far: a time budget counts them
    budget: object  # how far the run is: optim.Steps, or optim.TimeBudget
    lora: dict  # a LoRA run's base and adapter settings, else None
    dtype: str = "float32"
    dtype_why: str = ""  # how --dtype auto chose it
    ctx: object = None  # the forward pass's autocast
    scaler: object = None  # float16's
    line: tuple = None  # (step, clock) of the last progress line; pauses move the clock

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
        return self.state.seconds + self.clock()


def make_batches(corpus, block_size, cfg, world, device):
    """{split: () -> (x, y)}: random windows of block_size tokens, this process's share of a
    batch, in micro-batches; the train split cut to its first --data_fraction."""
    micro_batch = cfg.batch_size // world // cfg.grad_accum_steps
    n = max(block_size + 1, int(len(corpus.train) * cfg.data_fraction))
    splits = {
        "train": (corpus.train[:n], corpus.train_targets),
        "val": (corpus.val, corpus.val_targets),
    }  # targets: a conversation's answers
    return {
        split: functools.partial(get_batch, ids, micro_batch, block_size, device, targets=targets)
        for split, (ids, targets) in splits.items()
    }


# ------------------------------------------------------------------------------------ the settings


def settings(model_cfg, cfg, options, preset, given, world, say):
    """The settings, what the run starts from and whether it resumes: (model_cfg, cfg, preset,
    source, its path, resumed); the source is last.pt when it resumes, --init_from's model when it
    fine-tunes, else None."""
    last = os.path.join(cfg.out_dir, "last.pt")
    if options.resume and os.path.isfile(last):
        source = checkpoint.load(last)
        say(f"resuming {last} at {checkpoint.describe(source)}")
        if options.preset and options.preset != source.get("preset"):
            raise TinyLLMError(
                f"{last} is a run of preset {source.get('preset')!r}: --resume keeps it"
            )
        model_cfg, cfg = resumed_settings(source, cfg, given, last)
        check_batch(cfg, world)
        return model_cfg, cfg, source.get("preset", preset), source, last, True
    if options.resume:  # the same command starts the run now and continues it later
        say(f"--resume: no {last} yet, starting a fresh run")
    if not options.overfit_batch:
        checkpoint.claim_out_dir(cfg.out_dir, options.overwrite, keep=options.init_from)
    source = None
    if options.init_from:  # fine-tuning: that model and its tokenizer, a fresh optimizer
        source, last = fine_tune_source(options.init_from, given), options.init_from
        cfg = replace(cfg, tokenizer=source["tokenizer"].get("kind", "char"))
    if sources.is_prepared(cfg.data):  # tools.prepare fixed its tokenizer
        meta = sources.prepared_meta(cfg.data)
        made = {
            "vocab_size": meta["vocab_size"],
            "clean": meta["clean"],
            "tokenizer": meta["tokenizer"]["kind"],
        }
        refused = contradicted(given, made, ())
        if refused:
            raise TinyLLMError(
                f"{cfg.data} was made by tools.prepare with its own tokenizer and "
                f"text: drop {refused}"
            )
        cfg = replace(cfg, tokenizer=made["tokenizer"])
    if options.overfit_batch:  # to a loss near 0, or to max_steps: never to a time budget
        cfg = replace(cfg, time_budget="")
    if cfg.lora_rank and not options.init_from:
        raise TinyLLMError("--lora_rank adapts a trained model: give it with --init_from")
    check_batch(cfg, world)
    return model_cfg, cfg, preset, source, last, False


def check_batch(cfg, world):
    """A batch splits evenly into the processes' micro-batches."""
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise TinyLLMError(
            f"batch_size ({cfg.batch_size}) is not divisible by grad_accum_steps "
            f"({cfg.grad_accum_steps}) times the processes ({world})"
        )


def resumed_settings(source, cfg, given, last):
    """(model_cfg, cfg) of the run in last.pt, with the flags --resume may change."""
    saved = source.get("train_config")
    required = ["optimizer", "rng", *asdict(TrainState())]
    if any(k not in source for k in required) or set(saved or ()) != set(asdict(cfg)):
        raise TinyLLMError(
            f"{last} was written by another version of tinyllm and cannot be "
            f"resumed; fine-tune from its weights with --init_from instead"
        )
    model_cfg = from_saved(GPTConfig, source["model_config"], last)
    saved = from_saved(TrainConfig, saved, last)
    refused = contradicted(given, asdict(model_cfg) | asdict(saved), RESUME_MAY_CHANGE)
    if refused:
        raise TinyLLMError(
            f"--resume continues the run in {last}, which cannot change {refused}; "
            f"drop the flag, or start a new run with another --out_dir"
        )
    changes = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    changes["out_dir"] = cfg.out_dir
    if "max_steps" in given:
        changes["time_budget"] = ""
    return model_cfg, replace(saved, **changes)


def contradicted(given, saved, may_change):
    """The flags given that contradict saved settings: '--n_layer 4 (it has 2)', or ''."""
    refused = []
    for k, v in given.items():
        if k in saved and k not in may_change and v != saved[k]:
            refused.append(f"--{k} {v} (it has {saved[k] if saved[k] != '' else 'none'})")
    return "; ".join(refused)


def fine_tune_source(path, given):
    """--init_from: a checkpoint, or GPT-2's weights. Only --dropout may change: it is no weight."""
    if path.lower().endswith(".pt"):
        source = checkpoint.load(path)
    else:
        from machinery.hf_gpt2 import gpt2_checkpoint  # needs transformers: imported only here

        source = gpt2_checkpoint(path)
    has = {**source["model_config"], "tokenizer": source["tokenizer"].get("kind", "char")}
    refused = contradicted(given, has, ("dropout",))
    if refused:
        raise TinyLLMError(
            f"--init_from {path} keeps that model's shape and tokenizer: drop {refused}"
        )
    if "dropout" in given:
        source["model_config"]["dropout"] = given["dropout"]
    return source


# ---------------------------------------------------------------------------------- data and model


def data_and_model(model_cfg, cfg, source, path, options, say):
    """The text as train and val token ids (by the source's tokenizer, if any), the GPT to train,
    and a LoRA run's adapter settings (else None)."""
    model = tokenizer = None
    if source:
        model = checkpoint.model_of(source, path)
        tokenizer = checkpoint.tokenizer_of(source, model.config.vocab_size, path)
    extend = bool(options.init_from)  # a fine-tune's new characters grow the vocabulary
    corpus = sources.load_corpus(cfg, tokenizer, model_cfg.vocab_size, extend=extend)
    block_size = (model.config if model else model_cfg).block_size
    sources.check_long_enough(corpus.train, block_size, "train", cfg.data)
    sources.check_long_enough(corpus.val, block_size, "validation", cfg.data)
    if model is None:  # a fresh GPT, random weights
        return corpus, GPT(replace(model_cfg, vocab_size=corpus.tokenizer.vocab_size)), None
    rows = None  # per embedding row, its row in the source model (None: a new token)
    if corpus.added:
        rows = grow_vocabulary(model, corpus.old_ids, tokenizer.vocab_size)
        added = "".join(corpus.added)[:60]
        say(f"added {len(corpus.added)} token(s) {added!r} to the vocabulary of {path}")
    if not cfg.lora_rank:  # an adapter's model fine-tuned in full is merged first
        return corpus, lora.merge(model), None
    adapter = source.get("lora")
    if not adapter:  # a new adapter: the model frozen, small matrices trained beside it
        lora.add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_mlp)
        adapter = dict(
            base=os.path.abspath(path),
            rows=rows,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            mlp=cfg.lora_mlp,
        )  # its checkpoints name its base
    elif rows:  # an adapter trained on with new tokens: its rows mapped on to the base's
        mapped = adapter["rows"]
        adapter = adapter | {"rows": [i if i is None or not mapped else mapped[i] for i in rows]}
    return corpus, model, adapter


def grow_vocabulary(model, old_ids, old_size):
    """New tokens' embedding rows, each the old rows' mean plus a little noise (under LoRA, no two
    new rows alike). old_ids: per new row, its old row or None. Returns the rows' sources."""
    old = model.wte.weight.detach()
    rows = old_ids + list(range(old_size, len(old)))  # the old model's extra rows stay
    mean = old[[i for i in rows if i is not None]].mean(0)
    new = [old[i] if i is not None else mean + 0.02 * torch.randn_like(mean) for i in rows]
    checkpoint.with_embedding(model, torch.stack(new))
    return rows


def restore(source, optimizer, cfg, rank, world, say):
    """A resumed run's state, optimizer and random numbers as saved; a new --max_steps is a new
    schedule."""
    # keep this machine's optimizer kernel (fused, foreach): torch places the saved step tensors
    groups = []
    for saved, group in zip(source["optimizer"]["param_groups"], optimizer.param_groups):
        groups.append(saved | {k: group[k] for k in ("fused", "foreach") if k in group})
    optimizer.load_state_dict({**source["optimizer"], "param_groups": groups})
    state = TrainState(**{k: source[k] for k in asdict(TrainState())})
    rngs = source.get("rngs") or [source["rng"]]
    devices.set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    saved = source["train_config"]
    if not cfg.time_budget and (saved["time_budget"] or cfg.max_steps != saved["max_steps"]):
        if state.step >= cfg.max_steps:
            raise TinyLLMError(
                f"the run is at step {state.step} already: "
                f"--max_steps {cfg.max_steps} trains no more"
            )
        now = get_lr(state.step, progress(state.step, cfg), cfg)
        end = get_lr(cfg.max_steps, 1.0, cfg)
        say(
            f"--max_steps {cfg.max_steps}: the schedule of a run of {cfg.max_steps} steps from "
            f"here, LR {now:.3g} now, {end:.3g} at its end"
        )
    return state


# --------------------------------------------------------------------------------------- precision


def set_precision(run, saved, step):
    """The run's dtype, autocast and scaler (float16's, as saved); --compile tries a step first."""
    cfg, device = run.cfg, run.device
    run.dtype, run.dtype_why = devices.resolve_dtype(cfg.dtype, device)
    run.ctx = devices.autocast(device, run.dtype)
    run.scaler = devices.make_scaler(device, run.dtype)
    if saved.get("scaler") and run.scaler:
        run.scaler.load_state_dict(saved["scaler"])
    if cfg.compile:
        try:
            with devices.trial(run.model, run.optimizer, run.scaler):
                step(run, run.ctx, run.scaler)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # torch 2.5 raises a missing compiler as a plain RuntimeError
            raise TinyLLMError(
                f"--compile failed on this machine ({cli.first_line(e)}); run without it"
            ) from None


# -------------------------------------------------------------------------------------- the header


def print_header(run):
    """The run's opening lines: device and precision, model, tokens, and how it ends."""
    cfg, m, model = run.cfg, run.model.config, run.model
    precision = run.dtype + (f": {run.dtype_why}" if cfg.dtype == "auto" else "")
    processes = f" x {run.world} processes" if run.world > 1 else ""
    run.say(
        f"device {devices.describe(run.device)} ({precision}, {torch.get_num_threads()} "
        f"threads){processes} | preset {run.preset} | data {cfg.data}"
    )
    part = ""
    if run.lora:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        part = f" ({trained:,} trained: {100 * trained / model.num_params():.2f}%, LoRA)"
    run.say(
        f"model {model.num_params():,} parameters{part}: {m.n_layer} layers, {m.n_head} "
        f"heads, {m.n_embd} wide, block {m.block_size}, vocab {m.vocab_size} | norm {m.norm}, "
        f"mlp {m.mlp}, pos {m.pos} | optimizer {cfg.optimizer}"
    )
    split = ""
    if run.world * cfg.grad_accum_steps > 1:
        split = f" ({run.world} processes x {cfg.grad_accum_steps} micro-batches)"
    run.say(
        f"tokens per step {cfg.batch_size * m.block_size:,} = batch {cfg.batch_size} x block "
        f"{m.block_size}{split} | train {len(run.corpus.train):,} tokens, val "
        f"{len(run.corpus.val):,} tokens"
    )
    if cfg.time_budget:
        run.say(
            f"time budget {cfg.time_budget}: after the warmup the {cfg.lr_schedule} schedule "
            f"runs over the time left"
        )
    elif cfg.max_steps <= cfg.warmup_steps:
        cli.warn(
            f"--max_steps {cfg.max_steps} ends within the warmup ({cfg.warmup_steps} "
            f"steps): the LR never decays"
        )


# ------------------------------------------------------------------------- the time budget's clock


def run_length(cfg, clock, world, device):
    """How far the run is: by its steps, or by a time budget's clock, the ranks' mean (their clocks
    differ, and all must decide alike)."""
    if not cfg.time_budget:
        return Steps(cfg)
    return TimeBudget(cfg, lambda: ddp.mean([clock()], world, device)[0])


# ------------------------------------------------------------------------------ the closing sample


def time_closing_sample(run):
    """The closing sample's seconds, timed on 16 tokens, with a margin: a budget keeps them free."""
    closing_sample(run, 2)  # the first pays for allocations
    start = run.clock()
    closing_sample(run, 16)
    seconds = (run.clock() - start) / 16 * run.cfg.sample_tokens * 1.2
    return ddp.mean([seconds], run.world, run.device)[0]


def closing_sample(run, tokens):
    """A sample as generate.py draws it (its seed, in float32: bfloat16 is no faster here). A chat
    model answers the validation split's first question, in the chat template."""
    tokenizer, stop = run.corpus.tokenizer, None
    start = sources.start_ids(tokenizer)
    if ASSISTANT in tokenizer.special_tokens:
        ids = run.corpus.val[: 4 * run.model.config.block_size].tolist()
        user, assistant = tokenizer.special_tokens[USER], tokenizer.special_tokens[ASSISTANT]
        if user in ids and assistant in ids[ids.index(user) :]:
            first = ids.index(user)
            start, stop = ids[first : ids.index(assistant, first) + 1], tokenizer.eot_id
    out = generate(
        run.model.eval(),
        torch.tensor([start], device=run.device),
        tokens,
        SamplerConfig(),
        stop_token=stop,
        generator=torch.Generator(run.device).manual_seed(run.cfg.seed),
    )[0].tolist()
    run.model.train()
    return tokenizer.decode(out[: out.index(stop)] if stop in out else out)


# -------------------------------------------------------------------------------- the command line


def parse_flags(argv=None):
    """(options, model_cfg, train_cfg, preset, given): the flags given, on top of --preset or
    this machine's."""
    here = devices.choose_device("auto")
    preset, machine = machine_preset(here, {})
    parser = cli.ArgumentParser(
        description="Train a GPT language model on a text file.",
        epilog=(
            f"Presets: {', '.join(PRESETS)}. Without --preset this machine uses '{preset}', whose "
            f"defaults are shown. --resume may change only: {', '.join(RESUME_MAY_CHANGE)}."
        ),
    )
    defaults = {k: (v, f"preset {preset}") for k, v in PRESETS[preset].items()}
    defaults |= devices.auto_meanings(here)
    defaults["preset"] = (preset, f"for {machine} here")
    for cls, title in ((RunOptions, "what to do"), (GPTConfig, "model"), (TrainConfig, "training")):
        cli.add_config_flags(parser, cls, defaults, title=title)
    given = cli.given_flags(parser.parse_args(argv))
    options = make_config(RunOptions, given)
    if "device" in given:
        here = devices.choose_device(given["device"])
    preset, machine = machine_preset(here, given)
    if options.preset:
        preset = options.preset
    elif os.environ.get("RANK", "0") == "0" and not options.resume:
        cli.log(f"no --preset given: using '{preset}' for {machine}")
    return options, *build_configs(given, preset), preset, given


def machine_preset(device, given):
    """(the preset a run without --preset trains here, the facts that chose it): the device, the
    precision --dtype gives (auto: by what the device is) and the threads."""
    dtype, threads = given.get("dtype", "auto"), given.get("threads") or torch.get_num_threads()
    if device.type == "cuda":  # small whatever its precision: asking would start CUDA
        return default_preset("cuda", dtype, threads), "cuda"
    if dtype == "auto":
        dtype = devices.auto_dtype(device)[0]
    why = f"{device.type} in {dtype} on {threads} threads"
    return default_preset(device.type, dtype, threads), why
