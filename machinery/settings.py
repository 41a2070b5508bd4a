"""Reads the command line of a training script into its Settings, once, before anything is written.

Each layer overrides the one before: the default of each setting (config.py), then the preset
(this machine's unless --preset names one), then the flags given. Then the run picks what it
starts from: a fresh model; its own last.pt when it resumes (--resume may change only some
settings); or a trained model when it fine-tunes (--init_from). A fine-tune keeps the shape and
tokenizer of that model, and by default its dropout. Each flag is checked against the starting
point, and bad input gives one error line."""

import os
from dataclasses import asdict, dataclass, fields, replace

import torch

from config import (
    PRESETS,
    RESUME_MAY_CHANGE,
    GPTConfig,
    RunOptions,
    TinyLLMError,
    TrainConfig,
    add_flags,
    from_trained,
    make_config,
    require,
)
from machinery import checkpoint, cli, devices, sources


@dataclass
class Settings:
    """The settings of one run.

    `stage` is the script that runs it. `saved` is the checkpoint the run goes on from, read from
    `path`: its own last.pt when it resumes, the --init_from model when it fine-tunes, else None.
    `device` is where it trains. `started` is when its time began, in perf_counter seconds."""

    model_cfg: GPTConfig
    cfg: TrainConfig
    options: RunOptions
    stage: str
    preset: str
    device: torch.device
    saved: dict = None  # train.fit loads its weights and optimizer state into place, once
    path: str = ""
    resumed: bool = False
    started: float = 0.0


def read_settings(argv, stage, doc, started, needs=None):
    """Returns the Settings of the command line of a training script.

    `stage` is the script's name, `doc` its docstring for --help, and `started` when its time
    began. `needs` names the flag a fresh run of the script cannot go without (--init_from for
    finetune.py)."""
    given = flags(argv, stage, doc, needs)
    return settle(given, stage, started, needs)


def flags(argv=None, stage="train", doc="", needs=None):
    """Parses the flags given into {name: value}.

    The flags cover what to do, the model, the training, and the flags of this stage alone (fields
    whose stages name it). --help shows the defaults of this machine's preset. Where the stage
    needs --init_from, it shows the defaults of a run from a trained model."""
    here = devices.choose_device("auto")
    preset, machine = machine_preset(here, {})
    parser = cli.ArgumentParser(
        description=doc.split("\n")[0],
        epilog=f"Presets: {', '.join(PRESETS)}. Without --preset this machine uses '{preset}', "
        f"whose defaults are shown. --resume may change only: {', '.join(RESUME_MAY_CHANGE)}.",
    )
    defaults = {k: (v, f"preset {preset}") for k, v in PRESETS[preset].items()}
    defaults |= devices.auto_meanings(here) | {"preset": (preset, f"for {machine} here")}
    if needs == "init_from":
        defaults |= {k: (v, "from a trained model") for k, v in from_trained({}).items()}
        defaults["dropout"] = ("the checkpoint's", None)

    def names(cls):  # fields of cls this stage takes: the shared ones and its own
        return [
            f.name for f in fields(cls) if stage in f.metadata["stages"] or not f.metadata["stages"]
        ]

    add_flags(parser, RunOptions, defaults, names(RunOptions), title="what to do")
    add_flags(parser, GPTConfig, defaults, title="model")
    add_flags(parser, TrainConfig, defaults, names(TrainConfig), title="training")
    given, unknown = parser.parse_known_args(argv)
    for f in fields(RunOptions) + fields(TrainConfig):  # a flag of another stage: name its script
        if f"--{f.name}" in [word.split("=")[0] for word in unknown]:
            scripts = " and ".join(f"{name}.py" for name in f.metadata["stages"])
            parser.error(f"--{f.name} is a flag of {scripts}")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return vars(given)


def machine_preset(device, given):
    """Returns (the preset a run without --preset uses here, the reason).

    The choice depends on what the machine is, never on a timing. It picks small on a CUDA GPU,
    mini on a CPU that trains in bfloat16 on 2 or more threads, and tiny elsewhere
    (docs/training.md)."""
    dtype = given.get("dtype", "auto")
    threads = given.get("threads") or torch.get_num_threads()
    if device.type == "cuda":  # small at any precision: asking the GPU would start CUDA
        return "small", "cuda"
    if dtype == "auto":
        dtype = devices.auto_dtype(device)[0]
    why = f"{device.type} in {dtype} on {threads} threads"
    if device.type == "cpu" and dtype == "bfloat16" and threads >= 2:
        return "mini", why
    return "tiny", why


def settle(given, stage="train", started=0.0, needs=None):
    """Returns the Settings for the flags given.

    It picks the preset (without --preset, this machine's, and says why), then what the run starts
    from, and checks each flag against that."""
    options = make_config(RunOptions, given)
    device = devices.choose_device(given.get("device", "auto"))
    preset, machine = machine_preset(device, given)
    trains = not options.plot_lr
    if options.preset:
        preset = options.preset
    elif trains and not options.resume:  # a resumed run keeps the preset it started with
        cli.log(f"no --preset given: using '{preset}' for {machine}")
    require(preset in PRESETS, f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    model_cfg, cfg = build_configs(given, PRESETS[preset])
    settings = Settings(model_cfg, cfg, options, stage, preset, device, started=started)
    return settle_run(settings, given, needs) if trains else settings


def build_configs(given, settings):
    """Returns GPTConfig and TrainConfig, built in layers.

    Each layer overrides the one before: the defaults; `settings` (a preset, or the settings of a
    resumed run); the settings for a run from a trained model (config.from_trained); the flags
    given. --max_steps turns off the time budget of the preset. --tag names the run folder
    checkpoints/TAG, unless --out_dir is given."""
    given_both = given.get("time_budget") and "max_steps" in given
    require(not given_both, "give --time_budget or --max_steps, not both")
    values = {**settings, **(from_trained(given) if given.get("init_from") else {}), **given}
    if "max_steps" in given:
        values["time_budget"] = ""
    if values.get("tag") and "out_dir" not in given:
        values["out_dir"] = f"checkpoints/{values['tag']}"
    return make_config(GPTConfig, values), make_config(TrainConfig, values)


def settle_run(settings, given, needs=None):
    """Returns the Settings of a run that trains.

    They are as given, or those of the run it resumes. A fine-tune takes the shape and tokenizer of
    the model it starts from, and a prepared corpus fixes the tokenizer."""
    cfg = settings.cfg
    options = settings.options
    last = os.path.join(cfg.out_dir, "last.pt")
    if options.resume and os.path.isfile(last):
        return settings_to_resume(last, settings, given)
    if needs and not given.get(needs):
        meaning = {f.name: f.metadata["help"] for f in fields(RunOptions) + fields(TrainConfig)}
        raise TinyLLMError(f"{settings.stage}.py needs --{needs}: {meaning[needs]}")
    if options.resume:  # the same command starts the run now and continues it later
        cli.log(f"--resume: no {last} yet, starting a fresh run")
    devices.check_processes(settings.device, cfg)
    if options.init_from:  # fine-tuning keeps that model and its tokenizer, with a fresh optimizer
        saved = fine_tune_checkpoint(options.init_from, given)
        model_cfg = checkpoint.from_saved(GPTConfig, saved["model_config"], options.init_from)
        settings = replace(settings, model_cfg=model_cfg, saved=saved, path=options.init_from)
        cfg = replace(cfg, tokenizer=saved["tokenizer"]["kind"])
        adapter = saved.get("lora")
        if adapter and cfg.lora_rank:  # a saved adapter keeps its own alpha and mlp settings
            cfg = replace(cfg, lora_alpha=adapter["alpha"], lora_mlp=adapter["mlp"])
    if sources.is_prepared(cfg.data):  # tools.prepare already chose the tokenizer of this data
        meta = sources.prepared_meta(cfg.data)
        made = dict(vocab_size=meta["vocab_size"], clean=meta["clean"])
        made["tokenizer"] = meta["tokenizer"]["kind"]
        refused = contradicted(given, made)
        why = f"{cfg.data} was made by tools.prepare, with its own tokenizer"
        require(not refused, f"{why}: drop {refused}")
        cfg = replace(cfg, tokenizer=made["tokenizer"])
    if options.overfit_batch:  # it trains to a loss near 0 or to max_steps, never to a budget
        cfg = replace(cfg, time_budget="")
    else:
        checkpoint.claim_out_dir(cfg.out_dir, options.overwrite, keep=options.init_from)
    return replace(settings, cfg=cfg)


def settings_to_resume(last, settings, given):
    """Returns the Settings of a run that goes on from its last.pt.

    Only the flags in RESUME_MAY_CHANGE may differ from the saved settings."""
    saved = checkpoint.load(last)
    cli.log(f"resuming {last} at {checkpoint.summary(saved)}")
    ran = saved.get("stage", settings.stage)  # no stage: another version wrote it (refused below)
    again = cli.resume_command(ran, settings.cfg.out_dir)
    require(ran == settings.stage, f"{last} is a run of {ran}.py: resume it with {again}")
    if settings.options.preset and settings.options.preset != saved.get("preset"):
        raise TinyLLMError(f"{last} is a run of preset {saved.get('preset')!r}: --resume keeps it")
    complete = all(k in saved for k in ("stage", "optimizer", "rng", "step", "history"))
    why = f"{last} was written by another version of tinyllm and cannot be resumed"
    require(complete, f"{why}; fine-tune from its weights with finetune.py --init_from")
    model_cfg = checkpoint.from_saved(GPTConfig, saved["model_config"], last)
    saved_cfg = checkpoint.from_saved(TrainConfig, saved["train_config"], last)
    values = asdict(model_cfg) | asdict(saved_cfg)
    refused = contradicted(given, values, may_change=RESUME_MAY_CHANGE)
    why = f"--resume continues the run in {last}, which cannot change {refused}"
    require(not refused, f"{why}; drop the flag, or start a new run with another --out_dir")
    changes = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    model_cfg, cfg = build_configs(changes | {"out_dir": settings.cfg.out_dir}, values)
    device = devices.choose_device(cfg.device)
    devices.check_processes(device, cfg)
    changed = dict(model_cfg=model_cfg, cfg=cfg, device=device, path=last, saved=saved)
    return replace(settings, resumed=True, preset=saved.get("preset", "custom"), **changed)


def fine_tune_checkpoint(path, given):
    """Loads the model of --init_from: a checkpoint, or the weights of GPT-2.

    Only --dropout may change, because dropout is not a weight. A LoRA adapter keeps training as it
    is, so any LoRA flag given must agree with it."""
    if path.lower().endswith(".pt"):
        saved = checkpoint.load(path)
    else:
        saved = checkpoint.gpt2_checkpoint(path)  # it imports transformers only then
    has = {**saved["model_config"], "tokenizer": saved["tokenizer"]["kind"]}
    adapter = saved.get("lora")
    if adapter and given.get("lora_rank"):
        has |= dict(lora_rank=adapter["rank"], lora_alpha=adapter["alpha"], lora_mlp=adapter["mlp"])
    refused = contradicted(given, has, may_change=("dropout",))
    why = f"--init_from {path} keeps that model's shape, tokenizer and adapter"
    require(not refused, f"{why}: drop {refused}")
    if "dropout" in given:
        saved["model_config"]["dropout"] = given["dropout"]
    return saved


def contradicted(given, saved, may_change=()):
    """Returns the flags given that contradict the saved settings, e.g. '--n_layer 4 (it has 2)'.

    Returns '' when none does."""
    refused = []
    for k, v in given.items():
        if k in saved and k not in may_change and v != saved[k]:
            refused.append(f"--{k} {v} (it has {saved[k] if saved[k] != '' else 'none'})")
    return "; ".join(refused)
