"""A run's folder (--out_dir): a fresh run never takes one that holds another run's checkpoints (--overwrite
replaces them), and a run keeps only its newest periodic checkpoints (--keep_last)."""

import contextlib
import os

from config import TinyLLMError

from machinery.checkpoint import describe_checkpoint, load_checkpoint
from machinery.cli import check_writable, log


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


def claim_out_dir(out_dir, overwrite, master=True, say=log, keep=""):
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
    if not master:
        return
    check_writable(os.path.join(out_dir, f".write_test.{os.getpid()}"), "--out_dir", make_folder=True)
    if existing:
        say(f"--overwrite: removing the previous run's {', '.join(existing)} from {out_dir}")
        for name in existing + ["history.csv", "history.json"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))


def keep_newest(out_dir, keep_last):
    """Delete the periodic checkpoints (ckpt_STEP.pt) of out_dir but the newest keep_last."""
    for name in [n for n in run_files(out_dir) if n.startswith("ckpt_")][:-keep_last]:
        os.remove(os.path.join(out_dir, name))
