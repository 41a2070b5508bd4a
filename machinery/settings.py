"""A run's settings: train.py's command line, the preset of this machine, and the settings checked
against what the run starts from (its last.pt when it resumes, a model when it fine-tunes)."""

from machinery import checkpoint, cli, devices, sources
from machinery.checkpoint import TrainState

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
    default_preset,
    from_saved,
    make_config,
)

# ------------------------------------------------------------------------------ the command line


def parse_flags(argv=None):
    """(options, given): what train.py is asked to do, and the settings given as flags."""
    here = devices.choose_device("auto")
    preset, machine = machine_preset(here, {})
    parser = cli.ArgumentParser(
        description="Train a GPT language model on a text file.",
        epilog=f"Presets: {', '.join(PRESETS)}. Without --preset this machine uses '{preset}', "
        f"whose defaults are shown. --resume may change only: {', '.join(RESUME_MAY_CHANGE)}.",
    )
    defaults = {k: (v, f"preset {preset}") for k, v in PRESETS[preset].items()}
    defaults |= devices.auto_meanings(here)
    defaults["preset"] = (preset, f"for {machine} here")
    for cls, title in ((RunOptions, "what to do"), (GPTConfig, "model"), (TrainConfig, "training")):
        cli.add_config_flags(parser, cls, defaults, title=title)
    given = cli.given_flags(parser.parse_args(argv))
    return make_config(RunOptions, given), given


def preset_of(options, given, say=cli.log):
    """--preset, or this machine's, saying why (but for a resume: it keeps the run's own)."""
    if options.preset:
        return options.preset
    preset, machine = machine_preset(devices.choose_device(given.get("device", "auto")), given)
    if not options.resume and os.environ.get("RANK", "0") == "0":  # rank 0 alone, under torchrun
        say(f"no --preset given: using '{preset}' for {machine}")
    return preset


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


# ---------------------------------------------------------------------- where the run starts from


@dataclass
class Start:
    """A run's settings, and the checkpoint it starts from: its last.pt when it resumes,
    --init_from's model when it fine-tunes, else None."""

    model_cfg: GPTConfig
    cfg: TrainConfig
    preset: str
    source: dict = None
    path: str = ""  # the source's
    resumed: bool = False


def start(model_cfg, cfg, options, preset, given, world, say):
    """The Start of a run, each setting checked against what it starts from, before it writes."""
    last = os.path.join(cfg.out_dir, "last.pt")
    if options.resume and os.path.isfile(last):
        source = checkpoint.load(last)
        say(f"resuming {last} at {checkpoint.where(source)}")
        if options.preset and options.preset != source.get("preset"):
            raise TinyLLMError(
                f"{last} is a run of preset {source.get('preset')!r}: --resume keeps it"
            )
        model_cfg, cfg = resumed_settings(source, cfg, given, last)
        check_batch(cfg, world)
        return Start(model_cfg, cfg, source.get("preset", preset), source, last, resumed=True)
    if options.resume:  # the same command starts the run now and continues it later
        say(f"--resume: no {last} yet, starting a fresh run")
    if not options.overfit_batch:
        checkpoint.claim_out_dir(cfg.out_dir, options.overwrite, keep=options.init_from)
    source = None
    if options.init_from:  # fine-tuning: that model and its tokenizer, a fresh optimizer
        source = fine_tune_source(options.init_from, given)
        cfg = replace(cfg, tokenizer=source["tokenizer"]["kind"])
    if sources.is_prepared(cfg.data):  # tools.prepare fixed its tokenizer
        meta = sources.prepared_meta(cfg.data)
        made = {"vocab_size": meta["vocab_size"], "clean": meta["clean"]}
        made["tokenizer"] = meta["tokenizer"]["kind"]
        refused = contradicted(given, made, ())
        if refused:
            raise TinyLLMError(
                f"{cfg.data} was made by tools.prepare, with its own tokenizer: drop {refused}"
            )
        cfg = replace(cfg, tokenizer=made["tokenizer"])
    if options.overfit_batch:  # to a loss near 0, or to max_steps: never to a time budget
        cfg = replace(cfg, time_budget="")
    if cfg.lora_rank and not options.init_from:
        raise TinyLLMError("--lora_rank adapts a trained model: give it with --init_from")
    check_batch(cfg, world)
    return Start(model_cfg, cfg, preset, source, options.init_from)


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
    current = isinstance(source.get("window"), dict)  # (older versions saved a list)
    if (
        any(k not in source for k in required)
        or set(saved or ()) != set(asdict(cfg))
        or not current
    ):
        raise TinyLLMError(
            f"{last} was written by another version of tinyllm and cannot be resumed; "
            f"fine-tune from its weights with --init_from instead"
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
    has = {**source["model_config"], "tokenizer": source["tokenizer"]["kind"]}
    refused = contradicted(given, has, ("dropout",))
    if refused:
        raise TinyLLMError(
            f"--init_from {path} keeps that model's shape and tokenizer: drop {refused}"
        )
    if "dropout" in given:
        source["model_config"]["dropout"] = given["dropout"]
    return source
