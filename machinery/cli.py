"""The scripts' command line: flags from config.py's settings, bad input as one `error:` line (status 2), outputs
checked before long work, Ctrl-C or SIGTERM letting a training step finish and save first; and what the scripts
print: flushed lines, warnings, durations."""

import argparse
import contextlib
import dataclasses
import errno
import os
import signal
import sys
import traceback

from config import TinyLLMError


# ----------------------------------------------------------------------------- printing

def log(*args):
    """Print one flushed line, so output reads well in a Colab cell and in a log file. If its reader has gone (`| head`,
    `| tee` ended by the same Ctrl-C; Windows: EINVAL), a training loop saves and stops (StopRequest); else exit 141."""
    try:
        print(*args, flush=True)
    except OSError as e:
        if StopRequest.active is None or not (isinstance(e, BrokenPipeError) or e.errno == errno.EINVAL):
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        StopRequest.active.signum = StopRequest.active.signum or StopRequest.OUTPUT_GONE


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def format_seconds(seconds):
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ----------------------------------------------------------------------------- flags from settings

class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag as one `error:` line."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def bool_flag(text):
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return words[text.lower()]


def add_config_flags(parser, cls, defaults=None, names=None, title=None):
    """One --flag per field of cls; one not given is None, so the user's choices can be told from the defaults."""
    group = parser.add_argument_group(title or cls.__name__, cls.__doc__)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        meta = f.metadata
        flags = [f"--{f.name}", *meta.get("aliases", ())]
        default, source = (defaults or {}).get(f.name, (f.default, None))
        shown = "none" if default in ("", None) else default
        help = meta["help"] + (f" [{'|'.join(meta['choices'])}]" if meta.get("choices") else "")
        help = (help + f" (default: {shown}" + (f", {source})" if source else ")")).replace("%", "%%")
        if f.type is bool:  # a bare --flag means true; --flag false still works
            group.add_argument(*flags, dest=f.name, type=bool_flag, nargs="?", const=True, default=None,
                               metavar="BOOL", help=help)
        elif f.name == "eval_only":  # --eval_only alone means OUT_DIR/best.pt
            group.add_argument(*flags, dest=f.name, nargs="?", const="", default=None, metavar="PATH.pt", help=help)
        else:
            group.add_argument(*flags, dest=f.name, type=f.type, default=None, metavar=f.name.upper(), help=help)


def explicit_flags(args):
    return {k: v for k, v in vars(args).items() if v is not None}


# ----------------------------------------------------------------------------- errors

def check_writable(path, flag, make_folder=False):
    """Check before long work that path can be written (make_folder: make its folder, as a save would)."""
    if os.path.isdir(path):
        raise TinyLLMError(f"{flag} {path} is a folder")
    existed = os.path.exists(path)
    try:
        if make_folder:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "a", encoding="utf-8").close()
    except OSError as e:
        raise TinyLLMError(f"cannot write {flag} {path}: {e.strerror or e}") from None
    if not existed:
        os.remove(path)


def run_cli(main, argv=None):
    """Run a script's main(): a user error, or a file it cannot read or write, is one `error:` line and status 2."""
    # any character a model writes: a file or pipe gets UTF-8, a legacy code page (cp1252) an escape (\u0416)
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "utf-8").lower().replace("-", "").replace("_", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            with contextlib.suppress(ValueError, OSError):  # a stream closed or detached: leave it as it is
                stream.reconfigure(errors="backslashreplace", **({} if stream.isatty() else {"encoding": "utf-8"}))
    try:
        main(argv)
    except TinyLLMError as e:
        fail(str(e))
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # output piped into a reader that stopped, e.g. `| head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            leave(141)
        fail(f"{e.strerror or e}: {e.filename}" if e.filename else f"{e.strerror or e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        leave(130)
    except SystemExit as e:  # a stop signal's 130 or 143, or argparse's own exit
        leave(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
    except Exception:
        if not in_process_group():
            raise
        traceback.print_exc()  # a bug: its traceback, then out without the usual teardown
        leave(1)
    leave(0)


def in_process_group():
    dist = sys.modules.get("torch.distributed")  # (imported by then if it is; no import here)
    return dist is not None and dist.is_available() and dist.is_initialized()


def leave(code):
    """Exit with code, under torchrun at once (os._exit): the process group's threads could abort the teardown (-6)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if in_process_group() or ("RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1"):
        os._exit(code)
    sys.exit(code)


def fail(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    leave(2)


# ----------------------------------------------------------------------------- stopping

class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to finish its step, save and exit; a second Ctrl-C aborts. So does a reader of
    the output gone (log). active: the request of the loop running now, else None."""
    active = None
    OUTPUT_GONE = 13  # the signal number a stop for a reader gone stands for: exit 141, as SIGPIPE's

    def __init__(self, announce=True):
        self.signum, self.announce = None, announce

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        StopRequest.active = self
        return self

    def handle(self, signum, frame):
        if self.signum not in (None, self.OUTPUT_GONE) and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum  # (after a reader gone: the Ctrl-C that ended `| tee` too, exit 130)
        if self.announce:
            log(f"\n{signal.Signals(signum).name} received: finishing this step, then saving last.pt")

    def __exit__(self, *exc):
        StopRequest.active = None
        for s, handler in self.previous.items():
            signal.signal(s, handler)
