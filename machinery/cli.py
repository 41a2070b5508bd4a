"""Runs the command line of the scripts, and prints.

Bad input gives one `error:` line and exit status 2. Ctrl-C and a reader that has gone each get an
exit status of their own. config.add_flags makes a flag of each setting."""

import argparse
import contextlib
import os
import sys
import traceback

from config import TinyLLMError, require


def log(*args):
    """Prints a line and flushes it, so a reader sees progress as it comes. Only rank 0 prints."""
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
    def error(self, message):  # one line, instead of the usage block of argparse
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def check_writable(path, flag, make_folder=False):
    """Checks, before long work, that `path` can be written.

    With make_folder, it first makes the folder, as a save would."""
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
    """Runs main(argv).

    Bad input, or a file it cannot read or write, gives one `error:` line and exit status 2."""
    # a file or pipe gets UTF-8; a legacy console (cp1252) gets escapes such as \u0416
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):  # no reconfigure, or closed
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
    except SystemExit as e:  # 130 or 143 after a stop signal, or an exit from argparse
        code = 0 if e.code is None else e.code  # as in sys.exit: None means 0, a message means 1
        leave(code if isinstance(code, int) else 1)
    except Exception:
        if not in_process_group():
            raise
        traceback.print_exc()  # a bug under torchrun: print the traceback, then exit at once
        leave(1)
    leave(0)


def in_process_group():
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def leave(code):
    """Exits with `code`; under torchrun it exits at once (os._exit).

    The threads of the process group can abort a normal teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    if in_process_group() or os.environ.get("WORLD_SIZE", "1") != "1":
        os._exit(code)
    sys.exit(code)


def fail(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    leave(2)
