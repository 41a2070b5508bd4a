"""Never lose a run: a run folder is guarded from a second run, a resume may change only what does not
define the run, and Ctrl-C or SIGTERM let the step finish and save before the process leaves."""

import contextlib
import dataclasses
import os
import signal

from config import GPTConfig, TinyLLMError, TrainConfig, step_exact

from machinery.checkpoint import describe_checkpoint, load_checkpoint
from machinery.cli import check_writable, log


# ----------------------------------------------------------------------------- the run folder

def run_files(out_dir):
    """The checkpoint files of a run folder, newest name last ([] when there are none)."""
    if not os.path.isdir(out_dir):
        return []
    names = os.listdir(out_dir)
    periodic = sorted(n for n in names if n.startswith("ckpt_") and n.endswith(".pt"))
    return [n for n in ("best.pt", "last.pt") if n in names] + periodic


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
    """Refuse a fresh run over another run's checkpoints, and check now, not after an hour of training, that
    the folder is writable. overwrite clears the old run, unless that would delete keep (the --init_from)."""
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
    periodic = [n for n in run_files(out_dir) if n.startswith("ckpt_")]
    for name in periodic[:-keep_last]:
        os.remove(os.path.join(out_dir, name))


# ----------------------------------------------------------------------------- resuming

# Settings a resumed run may change; the rest (model shape, tokenizer, data, batch, optimizer) define the run
CHANGEABLE_ON_RESUME = {"max_steps", "eval_interval", "eval_iters", "log_interval", "save_interval", "keep_last",
                        "patience", "target_loss", "plots", "sample_tokens", "device", "dtype", "compile", "threads",
                        "grad_accum_steps", "out_dir", "tag"}


RETIRED = {"replans"}  # settings older versions saved that no longer exist: a resume drops them


def conflicting_flags(given, saved, changeable, words):
    """The flags given that contradict a checkpoint's saved settings, as '--k v (words saved)'."""
    return [f"--{k} {v} ({words} {saved[k]})" for k, v in given.items()
            if k in saved and k not in changeable and v != saved[k]]


def resume_configs(checkpoint, given, path):
    """The configs of a resumed run: the saved ones, overridden by the flags given this time
    that can safely change mid-run. A flag that would change anything else is refused."""
    saved = {k: v for k, v in checkpoint["train_config"].items() if k not in RETIRED} \
        if isinstance(checkpoint["train_config"], dict) else checkpoint["train_config"]
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
    changes = step_exact({k: v for k, v in given.items() if k in CHANGEABLE_ON_RESUME}, given)
    return model_cfg, dataclasses.replace(train_cfg, **changes)


def find_resume(last_path, needed, say=log):
    """The checkpoint --resume continues, or None when last_path is not there yet: the same command then
    starts a run and continues it after every disconnect. needed: the entries it must hold."""
    if not os.path.isfile(last_path):
        say(f"--resume: no {last_path} yet, starting a fresh run")
        return None
    checkpoint = load_checkpoint(last_path)
    missing = [k for k in needed if k not in checkpoint]
    if missing:
        raise TinyLLMError(f"{last_path} lacks the training state --resume needs (missing: {', '.join(missing)}); "
                           f"fine-tune from its weights with --init_from instead")
    say(f"resuming {last_path} at step {checkpoint['step']}")
    return checkpoint


# ----------------------------------------------------------------------------- stopping

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
