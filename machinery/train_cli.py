"""train.py's command line: flags on top of the preset this machine gets (--help saying what "auto" means here),
and the modes that do not train, --eval_only (evaluation.py) and --plot_lr (plots.py); what flags mean: config.py."""

import os

from config import PRESETS, GPTConfig, RunOptions, TrainConfig, build_configs, default_preset, make_config

from machinery import cli, plots
from machinery.device import choose_device, measured_on, resolve_dtype, set_threads
from machinery.evaluation import evaluate_checkpoint


def build_parser(device):
    preset = default_preset(device.type)
    # (a GPU is not asked: that would start CUDA in every process, --device cpu or not)
    dtype = ("bfloat16 from compute capability 8.0, else float16" if device.type == "cuda" else "measured at start-up "
             "here" if measured_on(device) else f"{resolve_dtype('auto', device)} here")
    auto = {"device": ("auto", f"{device.type} here"), "dtype": ("auto", dtype),
            "threads": (0, f"{set_threads(0)} here"), "preset": (preset, f"on this machine ({device.type})")}
    epilog = (f"Presets: {', '.join(PRESETS)}. Without --preset this machine uses '{preset}', and the defaults "
              f"shown are that preset's where it sets them. Flags override the preset.")
    parser = cli.ArgumentParser(description="Train a GPT language model on a text file.", epilog=epilog)
    cli.add_config_flags(parser, RunOptions, auto, title="what to do")
    defaults = {**{k: (v, f"preset {preset}") for k, v in PRESETS[preset].items()}, **auto}  # what --help shows
    cli.add_config_flags(parser, GPTConfig, defaults, title="model (GPTConfig)")
    cli.add_config_flags(parser, TrainConfig, defaults, title="training (TrainConfig)")
    return parser


def parse_flags(argv=None):
    """(options, model_cfg, train_cfg, preset, given): the flags given on top of --preset or this machine's."""
    given = cli.explicit_flags(build_parser(choose_device("auto")).parse_args(argv))
    options = make_config(RunOptions, given)
    device = choose_device(given.get("device", "auto"))
    preset = options.preset or default_preset(device.type)
    if not options.preset and os.environ.get("RANK", "0") == "0" and not options.resume:
        cli.log(f"no --preset given: using '{preset}' for {device.type}")
    model_cfg, train_cfg = build_configs(given, preset)
    return options, model_cfg, train_cfg, preset, given


def eval_or_plot(options, train_cfg, given):
    """--eval_only or --plot_lr: do it and return True. False: this run trains."""
    if options.eval_only is not None:
        path = options.eval_only or os.path.join(train_cfg.out_dir, "best.pt")  # --eval_only alone: best.pt
        evaluate_checkpoint(path, given.get("data"), train_cfg.device, train_cfg.batch_size, train_cfg.threads)
    elif options.plot_lr:
        plots.draw_lr_schedule(train_cfg)
    else:
        return False
    return True
