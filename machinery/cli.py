"""The scripts' command line: bad input as one `error:` line (exit 2), an exit status for Ctrl-C and
a reader gone; and printing. config.add_flags makes a flag of each setting."""

import argparse
import contextlib
import os
import sys
import traceback

from config import TinyLLMError, require


def log(*args):
    """A line, flushed at once so that a reader sees progress as it comes; rank 0 alone prints."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, flush=True)


def silence_stdout():
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def format_seconds(seconds):
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def resume_command(stage, out_dir):
    return f"python {stage}.py --resume --out_dir {out_dir}"


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def check_writable(path, flag, make_folder=False):
    """Before long work: path can be written (make_folder: its folder made, as a save would)."""
    require(not os.path.isdir(path), f"{flag} {path} is a folder")
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
    """Run main(argv): bad input, or a file it cannot read or write: one `error:` line, exit 2."""
    # a file or pipe gets UTF-8, a legacy console (cp1252) an escape (\u0416)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):  # no reconfigure, closed
            if stream.encoding.lower().replace("-", "").replace("_", "") != "utf8":
                encoding = stream.encoding if stream.isatty() else "utf-8"
                stream.reconfigure(encoding=encoding, errors="backslashreplace")
    try:
        main(argv)
    except TinyLLMError as e:
        fail(str(e))
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # `| head` stopped reading
            silence_stdout()  # no second error at exit
            leave(141)
        fail(f"{e.strerror or e}: {e.filename}" if e.filename else f"{e.strerror or e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        leave(130)
    except SystemExit as e:  # a stop signal's 130 or 143, or argparse's
        code = 0 if e.code is None else e.code  # as sys.exit: None is 0, a message 1
        leave(code if isinstance(code, int) else 1)
    except Exception:
        if not in_process_group():
            raise
        traceback.print_exc()  # a bug under torchrun: its traceback, then out at once
        leave(1)
    leave(0)


def in_process_group():
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def leave(code):
    """Exit; under torchrun at once (os._exit): the process group's threads can abort a teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    if in_process_group() or os.environ.get("WORLD_SIZE", "1") != "1":
        os._exit(code)
    sys.exit(code)


def fail(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    leave(2)
