"""A training script's command line becomes its Settings here, once, before anything is written.

The order, each step overriding the one before: a setting's default (config.py); the preset, this
machine's unless --preset names one; the flags given. Then what the run starts from: a fresh model;
its own last.pt when it resumes (--resume may change only some settings); or a trained model when
it fine-tunes (--init_from), whose shape, tokenizer and dropout it keeps. Each flag is checked
against it, and bad input is one error line."""

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


@dataclass(frozen=True)
class Settings:
    """A run's settings. stage: the script that runs it; saved: the checkpoint it goes on from
    (read from path), its own last.pt when it resumes, --init_from's model when it fine-tunes,
    else None; device: where it trains; started: when its time began (perf_counter seconds)."""

    model_cfg: GPTConfig
    cfg: TrainConfig
    options: RunOptions
    stage: str
    preset: str
    device: torch.device
    saved: dict = None  # its weights and optimizer state go once in place (train.fit)
    path: str = ""
    resumed: bool = False
    started: float = 0.0


def read_settings(argv, stage, doc, started, needs=None):
    """The Settings of a training script's command line. stage: the script's name; doc: its
    docstring, for --help; started: when its time began; needs: the flag a fresh run of it cannot
    go without (finetune.py's --init_from)."""
    given = flags(argv, stage, doc, needs)
    return settle(given, stage, started, needs)


def flags(argv=None, stage="train", doc="", needs=None):
    """The flags given, as {name: value}: what to do, the model, the training, and the stage's own
    (a field whose stages name it). --help shows the defaults of this machine's preset, and of a
    run from a trained model where the stage needs --init_from."""
    here = devices.choose_device("auto")
    preset, machine = machine_preset(here, {})
    parser = cli.ArgumentParser(
        description=doc.split("\n")[0],  # the script's docstring's first line
        epilog=f"Presets: {', '.join(PRESETS)}. Without --preset this machine uses '{preset}', "
        f"whose defaults are shown. --resume may change only: {', '.join(RESUME_MAY_CHANGE)}.",
    )
    defaults = {k: (v, f"preset {preset}") for k, v in PRESETS[preset].items()}
    defaults |= devices.auto_meanings(here) | {"preset": (preset, f"for {machine} here")}
    if needs == "init_from":
        defaults |= {k: (v, "from a trained model") for k, v in from_trained({}).items()}
        defaults["dropout"] = ("the checkpoint's", None)

    def names(cls):  # the fields of cls this stage takes: every stage's, and its own
        return [
            f.name for f in fields(cls) if stage in f.metadata["stages"] or not f.metadata["stages"]
        ]

    add_flags(parser, RunOptions, defaults, names(RunOptions), title="what to do")
    add_flags(parser, GPTConfig, defaults, title="model")
    add_flags(parser, TrainConfig, defaults, names(TrainConfig), title="training")
    given, unknown = parser.parse_known_args(argv)
    for f in fields(RunOptions) + fields(TrainConfig):  # another stage's flag: say whose
        if f"--{f.name}" in [word.split("=")[0] for word in unknown]:
            scripts = " and ".join(f"{name}.py" for name in f.metadata["stages"])
            parser.error(f"--{f.name} is a flag of {scripts}")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return vars(given)


def machine_preset(device, given):
    """(the preset a run without --preset trains here, why), by what the machine is, never by a
    timing: small on a CUDA GPU; mini on a CPU that trains in bfloat16 on 2 threads or more; tiny
    elsewhere (docs/training.md)."""
    dtype = given.get("dtype", "auto")
    threads = given.get("threads") or torch.get_num_threads()
    if device.type == "cuda":  # small whatever its precision: asking would start CUDA
        return "small", "cuda"
    if dtype == "auto":
        dtype = devices.auto_dtype(device)[0]
    why = f"{device.type} in {dtype} on {threads} threads"
    if device.type == "cpu" and dtype == "bfloat16" and threads >= 2:
        return "mini", why
    return "tiny", why


def settle(given, stage="train", started=0.0, needs=None):
    """The settings of the flags given: the preset (without --preset, this machine's, saying why),
    then what the run starts from, each flag checked against it."""
    options = make_config(RunOptions, given)
    device = devices.choose_device(given.get("device", "auto"))
    preset, machine = machine_preset(device, given)
    trains = not options.plot_lr
    if options.preset:
        preset = options.preset
    elif trains and not options.resume:  # a resume keeps its run's preset
        cli.log(f"no --preset given: using '{preset}' for {machine}")
    require(preset in PRESETS, f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    model_cfg, cfg = build_configs(given, PRESETS[preset])
    settings = Settings(model_cfg, cfg, options, stage, preset, device, started=started)
    return settle_run(settings, given, needs) if trains else settings


def build_configs(given, settings):
    """GPTConfig and TrainConfig: the defaults, then settings (a preset's, a resumed run's), then
    a run from a trained model's own (config.from_trained), then the flags given. --max_steps
    turns the preset's time budget off; --tag names the run's folder, checkpoints/TAG, unless
    --out_dir is given."""
    given_both = given.get("time_budget") and "max_steps" in given
    require(not given_both, "give --time_budget or --max_steps, not both")
    values = {**settings, **(from_trained(given) if given.get("init_from") else {}), **given}
    if "max_steps" in given:
        values["time_budget"] = ""
    if values.get("tag") and "out_dir" not in given:
        values["out_dir"] = f"checkpoints/{values['tag']}"
    return make_config(GPTConfig, values), make_config(TrainConfig, values)


def settle_run(settings, given, needs=None):
    """The Settings of a run: as given, or those of the run it resumes, or with the shape and
    tokenizer of the model it fine-tunes, or of a prepared corpus."""
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
    if options.init_from:  # fine-tuning: that model and its tokenizer, a fresh optimizer
        saved = fine_tune_checkpoint(options.init_from, given)
        model_cfg = checkpoint.from_saved(GPTConfig, saved["model_config"], options.init_from)
        settings = replace(settings, model_cfg=model_cfg, saved=saved, path=options.init_from)
        cfg = replace(cfg, tokenizer=saved["tokenizer"]["kind"])
        adapter = saved.get("lora")
        if adapter and cfg.lora_rank:  # its record says what it trains: the adapter's settings
            cfg = replace(cfg, lora_alpha=adapter["alpha"], lora_mlp=adapter["mlp"])
    if sources.is_prepared(cfg.data):  # tools.prepare fixed its tokenizer
        meta = sources.prepared_meta(cfg.data)
        made = dict(vocab_size=meta["vocab_size"], clean=meta["clean"])
        made["tokenizer"] = meta["tokenizer"]["kind"]
        refused = contradicted(given, made)
        why = f"{cfg.data} was made by tools.prepare, with its own tokenizer"
        require(not refused, f"{why}: drop {refused}")
        cfg = replace(cfg, tokenizer=made["tokenizer"])
    if options.overfit_batch:  # to a loss near 0, or to max_steps: never to a time budget
        cfg = replace(cfg, time_budget="")
    else:
        checkpoint.claim_out_dir(cfg.out_dir, options.overwrite, keep=options.init_from)
    return replace(settings, cfg=cfg)


def settings_to_resume(last, settings, given):
    """The Settings of a run going on from its last.pt, with the flags --resume may change."""
    saved = checkpoint.load(last)
    cli.log(f"resuming {last} at {checkpoint.summary(saved)}")
    ran = saved.get("stage", settings.stage)  # one without: another version's, refused below
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
    """--init_from: a checkpoint, or GPT-2's weights. Only --dropout may change: it is no weight.
    A LoRA adapter trains on as it is: a LoRA flag must agree with it."""
    if path.lower().endswith(".pt"):
        saved = checkpoint.load(path)
    else:
        from tools.export import gpt2_checkpoint  # needs transformers: imported only here

        saved = gpt2_checkpoint(path)
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
    """The flags given that contradict saved settings: '--n_layer 4 (it has 2)', or ''."""
    refused = []
    for k, v in given.items():
        if k in saved and k not in may_change and v != saved[k]:
            refused.append(f"--{k} {v} (it has {saved[k] if saved[k] != '' else 'none'})")
    return "; ".join(refused)
