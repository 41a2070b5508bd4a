"""A run's start, in the order it begins: where it starts from (a fresh run; its own last.pt when
it resumes; a trained model when it fine-tunes, in full or through LoRA), each setting given
checked against that before anything is written; then the corpus, the model, the optimizer and,
on a resume, the state as it was saved. set_up gives the Run (machinery/runs.py) the loop reads."""

import os
from dataclasses import asdict, dataclass, replace

import torch

from config import (
    PRESETS,
    RESUME_MAY_CHANGE,
    GPTConfig,
    RunOptions,
    TinyLLMError,
    TrainConfig,
    build_configs,
    make_config,
    require,
)
from machinery import checkpoint, cli, devices, sources
from machinery.checkpoint import claim_out_dir, clear_out_dir
from machinery.runs import Budget, Meter, Run, TrainState, Variant, restore, resumable
from model import GPT
from optim import make_optimizer
from utils import make_batches

# -------------------------------------------------------------------- the run's settings, once


@dataclass(frozen=True)
class Settings:
    """A run's settings, settled before anything is set up; nothing changes them afterwards. saved:
    the checkpoint it goes on from (read from path), its own last.pt when it resumes, --init_from's
    model when it fine-tunes, else None. device: where it trains."""

    model_cfg: GPTConfig
    cfg: TrainConfig
    options: RunOptions = RunOptions()
    preset: str = "custom"
    device: torch.device = None
    saved: dict = None
    path: str = ""
    resumed: bool = False


def settle(given):
    """The settings of train.py's flags given: the preset (without --preset, this machine's,
    saying why), then what the run starts from, each flag checked against it."""
    options = make_config(RunOptions, given)
    device = devices.choose_device(given.get("device", "auto"))
    preset, machine = devices.machine_preset(device, given)
    trains = options.eval_only is None and not options.plot_lr
    if options.preset:
        preset = options.preset
    elif trains and not options.resume:  # a resume keeps its run's preset
        cli.log(f"no --preset given: using '{preset}' for {machine}")
    require(preset in PRESETS, f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    model_cfg, cfg = build_configs(given, PRESETS[preset])
    if not trains:
        return Settings(model_cfg, cfg, options, preset, device)
    return settle_configs(model_cfg, cfg, options, given, preset, device)


def settle_configs(model_cfg, cfg, options=None, given=None, preset="custom", device=None):
    """The Settings of a run of these configs: as given, or those of the run it resumes, or with
    the shape and tokenizer of the model it fine-tunes, or of a prepared corpus."""
    options, given = options or RunOptions(), given or {}
    last = os.path.join(cfg.out_dir, "last.pt")
    if options.resume and os.path.isfile(last):
        return settings_to_resume(last, cfg, options, given)
    if options.resume:  # the same command starts the run now and continues it later
        cli.log(f"--resume: no {last} yet, starting a fresh run")
    device = device or devices.choose_device(cfg.device)
    devices.check_processes(device, cfg)
    if not options.overfit_batch:
        claim_out_dir(cfg.out_dir, options.overwrite, keep=options.init_from)
    saved = None
    if options.init_from:  # fine-tuning: that model and its tokenizer, a fresh optimizer
        saved = fine_tune_checkpoint(options.init_from, given)
        model_cfg = checkpoint.from_saved(GPTConfig, saved["model_config"], options.init_from)
        cfg = replace(cfg, tokenizer=saved["tokenizer"]["kind"])
    elif cfg.lora_rank:
        raise TinyLLMError("--lora_rank adapts a trained model: give it with --init_from")
    if sources.is_prepared(cfg.data):  # tools.prepare fixed its tokenizer
        meta = sources.prepared_meta(cfg.data)
        made = dict(vocab_size=meta["vocab_size"], clean=meta["clean"])
        made["tokenizer"] = meta["tokenizer"]["kind"]
        refused = contradicted(given, made)
        if refused:
            why = f"{cfg.data} was made by tools.prepare, with its own tokenizer"
            raise TinyLLMError(f"{why}: drop {refused}")
        cfg = replace(cfg, tokenizer=made["tokenizer"])
    if options.overfit_batch:  # to a loss near 0, or to max_steps: never to a time budget
        cfg = replace(cfg, time_budget="")
    return Settings(model_cfg, cfg, options, preset, device, saved, options.init_from)


def settings_to_resume(last, cfg, options, given):
    """The Settings of a run going on from its last.pt, with the flags --resume may change."""
    saved = checkpoint.load(last)
    cli.log(f"resuming {last} at {checkpoint.summary(saved)}")
    if options.preset and options.preset != saved.get("preset"):
        raise TinyLLMError(f"{last} is a run of preset {saved.get('preset')!r}: --resume keeps it")
    if not resumable(saved):
        raise TinyLLMError(
            f"{last} was written by another version of tinyllm and cannot be resumed; "
            f"fine-tune from its weights with --init_from instead"
        )
    model_cfg = checkpoint.from_saved(GPTConfig, saved["model_config"], last)
    saved_cfg = checkpoint.from_saved(TrainConfig, saved["train_config"], last)
    settings = asdict(model_cfg) | asdict(saved_cfg)
    refused = contradicted(given, settings, may_change=RESUME_MAY_CHANGE)
    if refused:
        raise TinyLLMError(
            f"--resume continues the run in {last}, which cannot change {refused}; "
            f"drop the flag, or start a new run with another --out_dir"
        )
    changes = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    model_cfg, cfg = build_configs(changes | {"out_dir": cfg.out_dir}, settings)
    device = devices.choose_device(cfg.device)
    devices.check_processes(device, cfg)
    preset = saved.get("preset", "custom")
    return Settings(model_cfg, cfg, options, preset, device, saved, last, resumed=True)


def fine_tune_checkpoint(path, given):
    """--init_from: a checkpoint, or GPT-2's weights. Only --dropout may change: it is no weight."""
    if path.lower().endswith(".pt"):
        saved = checkpoint.load(path)
    else:
        from machinery.hf_gpt2 import gpt2_checkpoint  # needs transformers: imported only here

        saved = gpt2_checkpoint(path)
    has = {**saved["model_config"], "tokenizer": saved["tokenizer"]["kind"]}
    refused = contradicted(given, has, may_change=("dropout",))
    if refused:
        why = f"--init_from {path} keeps that model's shape and tokenizer"
        raise TinyLLMError(f"{why}: drop {refused}")
    if "dropout" in given:
        saved["model_config"]["dropout"] = given["dropout"]
    return saved


def contradicted(given, saved, may_change=()):
    """The flags given that contradict saved settings: '--n_layer 4 (it has 2)', or ''."""
    refused = []
    for k, v in given.items():
        if k in saved and k not in may_change and v != saved[k]:
            refused.append(f"--{k} {v} (it has {saved[k] if saved[k] != '' else 'none'})")
    return "; ".join(refused)


# ----------------------------------------------------------------------------------- the start


def set_up(settings, clock):
    """The Run of settled settings: everything before the first step, in order, each input
    checked before anything is written; last, --overwrite's old files go."""
    cfg, options = settings.cfg, settings.options
    process = devices.setup_process(settings.device)
    devices.set_threads(cfg.threads)
    devices.seed_everything(cfg.seed)  # the same initial weights on every rank
    corpus = corpus_for(settings)
    model = model_for(settings, corpus)
    variant = variant_of(settings, corpus, model)
    variant.model.to(process.device)  # the model, and a frozen one beside it
    saved = settings.saved if settings.resumed else {}
    precision = devices.precision(cfg.dtype, process.device, saved.get("scaler"))
    optimizer = make_optimizer(model, cfg, process.device, precision.dtype)  # optim.py
    state, rows = restore(settings, optimizer, process) if saved else (TrainState(), [])
    if process.world > 1 and len(saved.get("rngs", [])) != process.world:  # each its own batches
        devices.seed_everything((cfg.seed + 1000 * process.rank + 7919 * state.step) % 2**32)
    micro_batch = cfg.batch_size // process.world // cfg.grad_accum_steps
    if variant.batches:
        batches = variant.batches(micro_batch, process.device)
    else:
        for ids, name in ((corpus.train, "train"), (corpus.val, "validation")):
            sources.check_long_enough(ids, model.config.block_size, name, cfg.data)
        block_size = model.config.block_size
        batches = make_batches(corpus, block_size, micro_batch, cfg.data_fraction, process.device)
    if options.overfit_batch:  # a sanity check: every step trains on one batch
        fixed = batches["train"]()
        batches["train"] = lambda: fixed
        cli.log("overfit_batch: one fixed batch, writing nothing; the loss should fall towards 0")
    train_model = process.wrap(torch.compile(variant.model) if cfg.compile else variant.model)
    if cfg.compile:
        compile_first(model, train_model, batches["train"](), precision)
    # by the ranks' mean clock: theirs differ, and all must decide alike
    budget = Budget(cfg, lambda: process.mean([clock()])[0])
    if saved:
        budget.load_state_dict(saved["budget"])
    if options.overwrite and not options.overfit_batch and not saved and process.rank == 0:
        clear_out_dir(cfg.out_dir)  # the old run's files go now, bad input refused
    if not cfg.time_budget and cfg.max_steps <= cfg.warmup_steps and process.rank == 0:
        steps = f"--max_steps {cfg.max_steps} ends within the warmup ({cfg.warmup_steps} steps)"
        cli.warn(f"{steps}: the LR never decays")
    return Run(
        cfg=cfg,
        preset=settings.preset,
        process=process,
        corpus=corpus,
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        precision=precision,
        batches=batches,
        state=state,
        meter=Meter(clock, rows),
        clock=clock,
        budget=budget,
        stop=cli.StopRequest(announce=process.rank == 0),
        variant=variant,
        overfit_batch=options.overfit_batch,
    )


def compile_first(model, train_model, batch, precision):
    """--compile's first forward and backward, now: a missing compiler is one error line before
    anything is written. They leave no trace: no gradient, every random generator as it was."""
    rngs = checkpoint.rng_state()
    try:
        with precision.ctx:
            train_model(*batch)[1].backward()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # torch 2.5 raises a missing compiler as a plain RuntimeError
        failed = f"--compile failed on this machine ({cli.first_line(e)})"
        raise TinyLLMError(f"{failed}; run without it") from None
    finally:
        checkpoint.set_rng_state(rngs)
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------ the corpus, the model


def corpus_for(settings):
    """The text as train and val token ids: by the tokenizer of the model it starts from (grown
    by a fine-tune's new tokens), else by a new one."""
    tokenizer = checkpoint.tokenizer_of(settings.saved, settings.path) if settings.saved else None
    grow = settings.saved is not None and not settings.resumed  # a resume's vocabulary is fixed
    corpus = sources.load_corpus(settings.cfg, tokenizer, settings.model_cfg.vocab_size, grow)
    if corpus.old_ids:
        new = [i for i, old in enumerate(corpus.old_ids) if old is None]
        added = corpus.tokenizer.decode(new)[:60]
        cli.log(f"added {len(new)} token(s) {added!r} to the vocabulary of {settings.path}")
    return corpus


def model_for(settings, corpus):
    """The GPT to train: fresh weights, or those of the model it starts from, with rows for new
    tokens, and, when a setting or that model asks for them, LoRA's matrices beside them (lora.py,
    read only then)."""
    if settings.saved is None:  # a fresh GPT, random weights
        return GPT(replace(settings.model_cfg, vocab_size=corpus.tokenizer.vocab_size))
    model = checkpoint.model_of(settings.saved, settings.path)
    rows = None  # per embedding row, its row in the source model (None: a new token)
    if corpus.old_ids:
        rows = checkpoint.grow_vocabulary(model, corpus.old_ids)
    if not (settings.cfg.lora_rank or settings.saved.get("lora")):
        return model
    import lora

    return lora.adapting(settings.cfg, model, settings.saved, settings.path, rows)


def variant_of(settings, corpus, model):
    """What the steps train: the model, or a variant's plug-in (docs/changing.md) whose file is read
    only when a setting asks for it: tuning.py's teacher (--distill_from), or preference pairs."""
    if settings.cfg.distill_from:
        import tuning

        return tuning.distilling(settings.cfg, model, corpus.tokenizer)
    pairs = sources.preference_pairs(settings.cfg.data)
    if pairs is not None:
        import tuning

        return tuning.preferring(settings, model, corpus.tokenizer, pairs)
    return Variant(model)
