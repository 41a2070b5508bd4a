"""train.py's command line: flags on top of the preset this machine gets (--help saying what "auto" means
here), and the modes that do not train, --eval_only and --plot_lr. What each flag means is in config.py."""

import math
import os

import numpy as np
import torch

from config import PRESETS, GPTConfig, RunOptions, TrainConfig, build_configs, default_preset, make_config
from model import lm_loss

from machinery import cli, plots
from machinery.checkpoint import load_model
from machinery.device import choose_device, measured_on, resolve_dtype, set_threads
from machinery.sources import validation_split


def build_parser(device):
    preset = default_preset(device.type)
    if device.type == "cuda":  # (asking the GPU would start CUDA in every process, --device cpu or not)
        dtype = "bfloat16 from compute capability 8.0, else float16"
    else:
        dtype = "measured at start-up here" if measured_on(device) else f"{resolve_dtype('auto', device)} here"
    auto = {"device": ("auto", f"{device.type} here"), "dtype": ("auto", dtype),
            "threads": (0, f"{set_threads(0)} here"), "preset": (preset, f"on this machine ({device.type})")}
    parser = cli.ArgumentParser(
        description="Train a GPT language model on a text file.",
        epilog=f"Presets: {', '.join(PRESETS)}. Without --preset this machine uses '{preset}', and the defaults "
               f"shown are that preset's where it sets them. Flags override the preset.")
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


def evaluate_checkpoint(path, data, device_name, batch_size, threads=0):
    """Loss, perplexity and bits per character on every position of the checkpoint's val split (or data's)."""
    device = choose_device(device_name)
    set_threads(threads)
    model, tokenizer, checkpoint = load_model(path)
    model.to(device)
    corpus, data = validation_split(checkpoint, tokenizer, data)
    val_ids = torch.as_tensor(np.asarray(corpus.val, dtype=np.int64))
    loss = token_losses(model, val_ids, batch_size).mean().item()
    bpc = loss / corpus.chars_per_token / math.log(2)
    cli.log(f"{path} on the val split of {data} ({len(val_ids):,} tokens, every position once):")
    cli.log(f"loss {loss:.4f} nats/token | perplexity {math.exp(loss):.3f} | {bpc:.4f} bits per character")
    return {"loss": loss, "perplexity": math.exp(loss), "bpc": bpc}


@torch.no_grad()
def token_losses(model, ids, batch_size=1):
    """The loss (nats) of every token of ids (n,) but the first, (n - 1,), each once (estimate_loss samples windows)."""
    model.eval()
    T, device = model.config.block_size, model.wte.weight.device
    n = (len(ids) - 1) // T  # whole windows; a split shorter than one is all tail
    windows = ids[:n * T + 1].unfold(0, T + 1, T) if n else ids[:0].view(0, T + 1)  # (n, T + 1)
    chunks = [windows[i:i + batch_size] for i in range(0, n, batch_size)]
    tail = len(ids) - 1 - n * T
    chunks += [ids[-tail - 1:][None]] if tail > 0 else []
    losses = []
    for rows in chunks:  # (b, t + 1): t inputs, each with its next token
        logits, _ = model(rows[:, :-1].to(device))  # (b, t, V)
        losses.append(lm_loss(logits, rows[:, 1:].to(device), reduction="none").cpu())  # (b * t,)
    return torch.cat(losses)
