"""Never lose a run: what a checkpoint holds, how it is written so a crash never leaves a
broken file, how it is read back without ever running code from it, how a run folder is
protected from a second run, what a resumed run may change, and how Ctrl-C saves first.

A checkpoint is a dict of tensors and plain Python data:
    model         the weights (state_dict)          model_config   GPTConfig as a dict
    tokenizer     the tokenizer as plain data       step, best_val_loss, history, ...
and, in last.pt, what --resume needs: optimizer, train_config, rng, scaler.
"""

import contextlib
import dataclasses
import os
import pickle
import signal
import warnings

import torch

from config import GPTConfig, TinyLLMError, TrainConfig, check_writable, first_line, log
from model import GPT
from tokenizer import tokenizer_from_dict

CHECKPOINT_KEYS = ("model", "model_config", "tokenizer")


def save_checkpoint(path, checkpoint):
    """Write atomically: a temp file in the same folder, flushed and fsynced, then renamed
    over the target. A crash at any moment leaves the old file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def load_checkpoint(path):
    """Read a checkpoint onto the CPU without ever running code from it (weights_only=True),
    and check it is ours. Every problem is one TinyLLMError naming the file."""
    if not os.path.isfile(path):
        raise TinyLLMError(f"checkpoint {path} not found (train one with: python train.py)")
    try:
        with warnings.catch_warnings():  # torch warns at length about old pickle protocols
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise TinyLLMError(f"checkpoint {path} contains objects other than tensors and plain data "
                               f"(or was not written by torch.save); tinyllm loads only those, so that "
                               f"loading a file never runs code") from None
        raise TinyLLMError(f"checkpoint {path} could not be loaded (truncated or corrupt): {first_line(e)}") from None
    except Exception as e:  # a truncated zip, random bytes, an empty file...
        raise TinyLLMError(f"checkpoint {path} could not be loaded (truncated or corrupt): {first_line(e)}") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        raise TinyLLMError(f"checkpoint {path} is not a tinyllm checkpoint (missing model, config or tokenizer)")
    model = checkpoint["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        raise TinyLLMError(f"checkpoint {path} is not a tinyllm checkpoint (its model is not a set of named tensors)")
    if not isinstance(checkpoint["model_config"], dict) or not isinstance(checkpoint["tokenizer"], dict):
        raise TinyLLMError(f"checkpoint {path} is not a tinyllm checkpoint (model_config and tokenizer must be dicts)")
    return checkpoint


def model_from_checkpoint(checkpoint, path="checkpoint", dropout=None):
    """Build the GPT a checkpoint describes and load its weights, refusing non-finite ones;
    dropout, when given, replaces the saved one (it changes no weight)."""
    try:
        config = GPTConfig(**{**checkpoint["model_config"], **({} if dropout is None else {"dropout": dropout})})
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
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TinyLLMError(f"{path}: non-finite weights (NaN or inf) in {bad[0]}" +
                           (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
    return model


def tokenizer_of(checkpoint, vocab_size, path="checkpoint"):
    """The checkpoint's tokenizer, checked to fit a model of vocab_size token embeddings."""
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    if tokenizer.vocab_size > vocab_size:
        raise TinyLLMError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{vocab_size} token embeddings")
    return tokenizer


def load_model(path):
    """(model, tokenizer, checkpoint) for sampling or evaluation: loaded on the CPU, model in
    eval mode (move it where it should run), optimizer state dropped, since only training
    needs it and on a GPU it would take as much memory again as the weights."""
    checkpoint = load_checkpoint(path)
    checkpoint.pop("optimizer", None)
    model = model_from_checkpoint(checkpoint, path).eval()
    return model, tokenizer_of(checkpoint, model.config.vocab_size, path), checkpoint


def make_checkpoint(model, model_cfg, tokenizer, **extra):
    """A checkpoint dict: the weights, the model's shape and the tokenizer, plus extra entries."""
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model_cfg),
            "tokenizer": tokenizer.to_dict(), **extra}


# ----------------------------------------------------------------------------- runs on disk

def run_files(out_dir):
    """The checkpoint files of a run folder, newest name last ([] when there are none)."""
    if not os.path.isdir(out_dir):
        return []
    names = os.listdir(out_dir)
    periodic = sorted(n for n in names if n.startswith("ckpt_") and n.endswith(".pt"))
    return [n for n in ("best.pt", "last.pt") if n in names] + periodic


def describe_checkpoint(checkpoint):
    """'step 900, best val 1.5123': where a checkpoint's run stood."""
    val = checkpoint.get("best_val_loss")
    return f"step {checkpoint.get('step', '?')}" + (f", best val {val:.4f}" if isinstance(val, float) else "")


def describe_run(out_dir):
    """A few words about the run in out_dir, from its last.pt (or best.pt)."""
    for name in ("last.pt", "best.pt"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            try:
                checkpoint = load_checkpoint(path)
            except TinyLLMError:
                return f"{name} (unreadable)"
            return f"{name} at {describe_checkpoint(checkpoint)}"
    return ", ".join(run_files(out_dir))


def claim_out_dir(out_dir, overwrite, master=True, say=log, keep=""):
    """Refuse to start a fresh run over another run's checkpoints, and find out now, not after
    an hour of training, whether the folder can be written. With overwrite, clear the old run,
    unless that would delete keep (the checkpoint this run fine-tunes from)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TinyLLMError(f"--out_dir {out_dir} is a file, not a folder")
    existing = run_files(out_dir)
    if existing and not overwrite:
        raise TinyLLMError(f"{out_dir} already holds a run ({describe_run(out_dir)}); to keep it, continue it with "
                           f"--resume or pick another --out_dir (or --tag NAME); to replace it, add --overwrite")
    doomed = {os.path.realpath(os.path.join(out_dir, name)) for name in existing}
    if keep and os.path.realpath(keep) in doomed:
        raise TinyLLMError(f"--overwrite would delete {keep}, the checkpoint --init_from starts from; "
                           f"fine-tune into another --out_dir (or --tag NAME)")
    if not master:
        return
    check_writable(os.path.join(out_dir, f".write_test.{os.getpid()}"), "--out_dir", make_folder=True)
    if existing:
        say(f"--overwrite: removing the previous run's {', '.join(existing)} from {out_dir}")
        for name in existing + ["history.csv", "history.json"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))


def prune_periodic(out_dir, keep_last):
    """Keep only the newest keep_last ckpt_STEP.pt files."""
    periodic = [n for n in run_files(out_dir) if n.startswith("ckpt_")]
    for name in periodic[:-keep_last]:
        os.remove(os.path.join(out_dir, name))


# ----------------------------------------------------------------------------- resuming and stopping

# Settings a resumed run may change: how often it reports and saves, how long it runs, and
# where it runs. The rest (model shape, tokenizer, data, batch, optimizer) define the run.
CHANGEABLE_ON_RESUME = {"max_steps", "eval_interval", "eval_iters", "log_interval", "save_interval", "keep_last",
                        "patience", "target_loss", "plots", "sample_tokens", "device", "dtype", "compile", "threads",
                        "grad_accum_steps", "out_dir", "tag"}


def conflicting_flags(given, saved, changeable, words):
    """The flags given that contradict a checkpoint's saved settings, as '--k v (words saved)'."""
    return [f"--{k} {v} ({words} {saved[k]})" for k, v in given.items()
            if k in saved and k not in changeable and v != saved[k]]


def resume_configs(checkpoint, given, path):
    """The configs of a resumed run: the saved ones, overridden by the flags given this time
    that can safely change mid-run. A flag that would change anything else is refused."""
    saved = checkpoint["train_config"]
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved, dict) or set(saved) - names:
        unknown = sorted(set(saved) - names) if isinstance(saved, dict) else ["(not a dict)"]
        raise TinyLLMError(f"{path}: unknown train_config setting(s) {', '.join(unknown)} (written by another "
                           f"version of tinyllm?); fine-tune from its weights with --init_from instead")
    try:
        model_cfg = GPTConfig(**checkpoint["model_config"])
        train_cfg = TrainConfig(**saved)
    except TypeError as e:
        raise TinyLLMError(f"{path}: unreadable settings ({e})") from None
    current = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(train_cfg)}
    refused = conflicting_flags(given, current, CHANGEABLE_ON_RESUME, "the run has")
    if refused:
        raise TinyLLMError(f"--resume continues the run in {path}, which cannot change " + "; ".join(refused) +
                           ". Drop the flag, or start a new run with another --out_dir (or --tag)")
    changes = {k: v for k, v in given.items() if k in CHANGEABLE_ON_RESUME}
    return model_cfg, dataclasses.replace(train_cfg, **changes)


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to finish its step, save and exit; a second Ctrl-C aborts."""

    def __init__(self, announce=True):
        self.signum = None
        self.announce = announce

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            log(f"\n{signal.Signals(signum).name} received: finishing this step, then saving last.pt")

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
