"""Never lose a run: a run folder is guarded from a second run, and Ctrl-C or SIGTERM let the step finish
and save before the process leaves (what a resume may change: resume.py)."""

import contextlib
import os
import signal

from config import TinyLLMError

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
