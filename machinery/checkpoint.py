"""Checkpoint files, written atomically and read without running code, and turned back into a model and tokenizer;
the run folder that holds them (a fresh run never takes one holding another run's checkpoints, --overwrite replaces
them; --keep_last); and --resume, which puts a run back exactly: its optimizer, train_config, every process's random
state, scaler and TrainState (an older version's checkpoint read in this one's format)."""

import contextlib
import dataclasses
import os
import pickle
import time
import warnings

import torch

from config import GPTConfig, TinyLLMError, TrainConfig, drop_budget_for_max_steps, from_saved
from model import GPT
from optim import get_lr, progress

from machinery.cli import check_writable, first_line, log
from machinery.ddp import every_rank
from machinery.device import rng_state
from machinery.sources import tokenizer_from_dict


def save_checkpoint(path, checkpoint):
    """Write atomically (a temp file beside it, fsynced, renamed over it): a crash leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk: said with the file's name (torch's error has it underneath)
        error = e if isinstance(e, OSError) else e.__context__
        if not isinstance(error, OSError):
            raise
        raise OSError(error.errno, error.strerror, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def replace_file(src, dst):
    """os.replace, retried for seconds on PermissionError: on Windows a file held open elsewhere cannot be replaced."""
    for wait in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, None):
        try:
            return os.replace(src, dst)
        except PermissionError:
            if wait is None:
                raise
            time.sleep(wait)


def load_checkpoint(path):
    """Read a checkpoint onto the CPU without ever running code from it (weights_only=True), and check it is ours."""
    if not os.path.isfile(path):
        raise TinyLLMError(f"checkpoint {path} not found (train one with: python train.py)")
    try:
        with warnings.catch_warnings():  # torch warns at length about old pickle protocols
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, random bytes, an empty file...
        if isinstance(e, pickle.UnpicklingError) and refused_as_unsafe(e):
            raise unsafe_file(f"checkpoint {path}") from None
        raise TinyLLMError(f"checkpoint {path} could not be loaded (truncated or corrupt): {first_line(e)}") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in ("model", "model_config", "tokenizer")):
        raise TinyLLMError(f"checkpoint {path} is not a tinyllm checkpoint (missing model, config or tokenizer)")
    model = checkpoint["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        raise TinyLLMError(f"checkpoint {path} is not a tinyllm checkpoint (its model is not a set of named tensors)")
    if not isinstance(checkpoint["model_config"], dict) or not isinstance(checkpoint["tokenizer"], dict):
        raise TinyLLMError(f"checkpoint {path} is not a tinyllm checkpoint (model_config and tokenizer must be dicts)")
    return checkpoint


def refused_as_unsafe(error):
    """Whether torch.load(weights_only=True) refused a file, anywhere in the chain (transformers wraps the error)."""
    seen = set()
    while error is not None and id(error) not in seen:  # a chain can loop back on itself
        if "weights only" in str(error).lower():
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def unsafe_file(what):
    return TinyLLMError(f"{what} contains objects other than tensors and plain data (or was not written by "
                        f"torch.save); tinyllm loads only those, so that loading a file never runs code")


def model_from_checkpoint(checkpoint, path="checkpoint"):
    try:
        config = from_saved(GPTConfig, checkpoint["model_config"])
    except TypeError as e:
        raise TinyLLMError(f"{path}: unreadable model config ({e})") from None
    except TinyLLMError as e:
        raise TinyLLMError(f"{path}: invalid model config: {e}") from None
    model = GPT(config)
    # weights saved from torch.compile or DDP wrappers carry a prefix; drop it
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in checkpoint["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise TinyLLMError(f"{path}: weights do not fit the model config ({first_line(e)})") from None
    if bad := [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
        raise TinyLLMError(f"{path}: non-finite weights (NaN or inf) in {bad[0]}" +
                           (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
    return model


def tokenizer_of(checkpoint, vocab_size, path="checkpoint"):
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    if tokenizer.vocab_size > vocab_size:
        raise TinyLLMError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{vocab_size} token embeddings")
    return tokenizer


def load_model(path, device="cpu"):
    """(model in eval mode on device, tokenizer, checkpoint read on the CPU less the optimizer state: training's)."""
    checkpoint = load_checkpoint(path)
    checkpoint.pop("optimizer", None)
    model = model_from_checkpoint(checkpoint, path).to(device).eval()
    return model, tokenizer_of(checkpoint, model.config.vocab_size, path), checkpoint


def make_checkpoint(model, tokenizer, **extra):
    return dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config), tokenizer=tokenizer, **extra)


def save(path, checkpoint, world, master):
    """checkpoint and every process's random state (each rank calls this), written to path by rank 0."""
    rngs = every_rank(rng_state(), world)
    if master:
        save_checkpoint(path, {**checkpoint, "rng": rngs[0], **({"rngs": rngs} if world > 1 else {})})


def describe_checkpoint(checkpoint):
    """'step 900, best val 1.5123': where a checkpoint's run stood."""
    val = checkpoint.get("best_val_loss")
    return f"step {checkpoint.get('step', '?')}" + (f", best val {val:.4f}" if isinstance(val, float) else "")


# ----------------------------------------------------------------------------- the run folder (--out_dir)

def run_files(out_dir):
    """The checkpoint files of a run folder, newest name last ([] when there are none)."""
    if not os.path.isdir(out_dir):
        return []
    names = os.listdir(out_dir)
    periodic = sorted(n for n in names if n.startswith("ckpt_") and n.endswith(".pt"))
    return [n for n in ("best.pt", "last.pt") if n in names] + periodic


def describe_run(out_dir):
    for name in ("last.pt", "best.pt"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            try:
                return f"{name} at {describe_checkpoint(load_checkpoint(path))}"
            except TinyLLMError:
                return f"{name} (unreadable)"
    return ", ".join(run_files(out_dir))


def claim_out_dir(out_dir, overwrite, master=True, keep=""):
    """Refuse a fresh run over another run's checkpoints; check it can write before, not after, an hour of training."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TinyLLMError(f"--out_dir {out_dir} is a file, not a folder")
    existing = run_files(out_dir)
    if existing and not overwrite:
        raise TinyLLMError(f"{out_dir} already holds a run ({describe_run(out_dir)}); to keep it, continue it with "
                           f"--resume or pick another --out_dir (or --tag NAME); to replace it, add --overwrite")
    if keep and os.path.realpath(keep) in {os.path.realpath(os.path.join(out_dir, name)) for name in existing}:
        raise TinyLLMError(f"--overwrite would delete {keep}, the checkpoint --init_from starts from; "
                           f"fine-tune into another --out_dir (or --tag NAME)")
    if master:
        check_writable(os.path.join(out_dir, f".write_test.{os.getpid()}"), "--out_dir", make_folder=True)


def clear_out_dir(out_dir, say=log):
    """--overwrite: the previous run's checkpoints and history go, once its replacement is set up (bad input first)."""
    if existing := run_files(out_dir):
        say(f"--overwrite: removing the previous run's {', '.join(existing)} from {out_dir}")
        for name in existing + ["history.csv", "history.json"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))


def keep_newest(out_dir, keep_last):
    """Delete the periodic checkpoints (ckpt_STEP.pt) of out_dir but the newest keep_last."""
    for name in [n for n in run_files(out_dir) if n.startswith("ckpt_")][:-keep_last]:
        os.remove(os.path.join(out_dir, name))


# ----------------------------------------------------------------------------- --resume

# what --resume needs: TrainState's fields of every version (a step's figures are in its history rows, any name)
RESUMABLE = ("optimizer", "train_config", "rng", "step", "best_val_loss", "evals_without_improvement",
             "last_eval_step", "lr", "grad_norm", "history")
RETIRED = {"replans"}  # settings that older versions saved and this one lacks: a resume drops them


def load_resumable(path):
    """A checkpoint that --resume can continue, in this version's format (upgrade)."""
    checkpoint = load_checkpoint(path)
    if missing := [k for k in RESUMABLE if k not in checkpoint]:
        raise TinyLLMError(f"{path} lacks the training state --resume needs (missing: {', '.join(missing)}); "
                           f"fine-tune from its weights with --init_from instead")
    return upgrade(checkpoint)


def upgrade(checkpoint):
    """An older version's resumable checkpoint in this format: RETIRED settings dropped, history rows given a kind,
    (loss, norm) windows as dicts, the latest step's progress where it saved none (a lacking setting: `before`)."""
    saved, step = checkpoint["train_config"], checkpoint["step"]
    if not isinstance(saved, dict):
        return checkpoint  # refused by the resume with a reason
    for name in RETIRED & set(saved):
        del saved[name]
    for row in checkpoint["history"]:
        row.setdefault("kind", "eval")
    window = checkpoint.get("window")
    if window and not isinstance(window[0], dict):
        checkpoint["window"] = [{"loss": loss, "lr": checkpoint["lr"], "grad_norm": norm} for loss, norm in window]
    older = {"progress_from", "decay_from"} & set(checkpoint) or "progress" not in checkpoint
    at0, progress0 = checkpoint.pop("progress_from", None) or [saved["warmup_steps"], 0.0]
    # [step, lr, progress]: where a moved decay went on from (the oldest form, [step, lr], resumes by steps)
    if (moved := checkpoint.pop("decay_from", None)) and len(moved) == 3:
        at0, progress0 = moved[0], moved[2]
    if older and not (saved.get("time_budget") and "progress" in checkpoint):
        end = checkpoint.get("end_step") or (checkpoint.get("plan") or {}).get("max_steps") or saved["max_steps"]
        at = step - 1  # the latest step
        checkpoint["progress"] = (1.0 if at >= end else progress0 if at <= at0 else
                                  progress0 + (1 - progress0) * (at - at0) / (end - at0))
    return checkpoint


# settings a resumed run may change; the rest (model shape, tokenizer, data, batch, optimizer) define the run
CHANGEABLE_ON_RESUME = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["changeable"]}


def resume_configs(checkpoint, given, path):
    """The saved configs, overridden by the flags given that may change mid-run; any other flag is refused."""
    saved, names = checkpoint["train_config"], {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - names) if isinstance(saved, dict) else ["(not a dict)"]
    if unknown:
        raise TinyLLMError(f"{path}: unknown train_config setting(s) {', '.join(unknown)} (written by another "
                           f"version of tinyllm?); fine-tune from its weights with --init_from instead")
    try:
        model_cfg, train_cfg = from_saved(GPTConfig, checkpoint["model_config"]), from_saved(TrainConfig, saved)
    except TypeError as e:
        raise TinyLLMError(f"{path}: unreadable settings ({e})") from None
    current = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(train_cfg)}
    if refused := conflicting_flags(given, current, CHANGEABLE_ON_RESUME, "the run has"):
        raise TinyLLMError(f"--resume continues the run in {path}, which cannot change " + "; ".join(refused) +
                           ". Drop the flag, or start a new run with another --out_dir (or --tag)")
    changes = drop_budget_for_max_steps({k: v for k, v in given.items() if k in CHANGEABLE_ON_RESUME}, given)
    return model_cfg, dataclasses.replace(train_cfg, **changes)


def conflicting_flags(given, saved, changeable, words):
    """The flags given that contradict a checkpoint's saved settings, as '--k v (words saved)'."""
    return [f"--{k} {v} ({words} {saved[k] if saved[k] != '' else 'none'})" for k, v in given.items()
            if k in saved and k not in changeable and v != saved[k]]


def restore(start, optimizer, state_type):
    """A resumed run's state (a state_type: train.TrainState) and optimizer exactly as saved; a new --max_steps is a
    new schedule."""
    checkpoint, cfg = start.source, start.cfg
    # this machine's kernel (optim.py), not the saver's, given before loading: torch places each saved tensor for it
    kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    groups = [{**saved, **kernel} for saved, kernel in zip(checkpoint["optimizer"]["param_groups"], kernels)]
    optimizer.load_state_dict({**checkpoint["optimizer"], "param_groups": groups})
    names = {f.name for f in dataclasses.fields(state_type)}
    state = state_type(**{k: checkpoint[k] for k in names if k in checkpoint})
    saved = checkpoint["train_config"]  # the saved run's end: its max_steps, or None for a time budget
    old_end = None if saved.get("time_budget") else saved["max_steps"]
    if not cfg.time_budget and cfg.max_steps != old_end:  # a new --max_steps
        if state.step >= cfg.max_steps:
            raise TinyLLMError(f"the run is already at step {state.step}; --max_steps {cfg.max_steps} "
                               f"would not train it further")
        lr = get_lr(state.step, progress(state.step, cfg), cfg)  # the LR at this step of a run that long
        start.say(f"--max_steps {cfg.max_steps}: the schedule of a run of {cfg.max_steps} steps, whose LR at step "
                  f"{state.step} is {lr:.3g} (the last step's was {state.lr:.3g}), down to {cfg.min_lr:g} at its end")
    return state
