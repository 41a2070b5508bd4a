"""The scripts' command line around config.py's flags: bad input as one `error:` line (exit 2),
Ctrl-C or SIGTERM finishing a training step and saving first; and printing."""

import argparse
import contextlib
import errno
import os
import signal
import sys
import traceback

from config import TinyLLMError


def log(*args):
    """A line, flushed at once (a reader sees progress as it happens), from rank 0 alone under
    torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, flush=True)


def silence_stdout():
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def format_seconds(seconds):
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def check_writable(path, flag, make_folder=False):
    """Before long work: path can be written (make_folder: its folder made, as a save would)."""
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


class StopRequest:
    """Ctrl-C, SIGTERM, or the reader of its lines gone: the loop inside it ends its step, saves
    and exits."""

    OUTPUT_GONE = 13  # Python ignores SIGPIPE: a reader gone stops the run as it would, exit 141

    def __init__(self, announce):
        self.signum = None  # the signal that stops the loop
        self.announce = announce  # rank 0 says that it stops
        self.active = False  # inside the loop
        self.gone = False  # its reader gone: its last lines go to stderr

    def say(self, text):
        """A line. Inside the loop, its reader gone (`| head`, a `| tee` the same Ctrl-C ended;
        EINVAL on Windows) is a stop: the run saves, and its last lines go to stderr; outside the
        loop, an OSError."""
        if self.gone:
            print(text, file=sys.stderr, flush=True)
            return
        try:
            log(text)
        except OSError as e:
            if not self.active or not (isinstance(e, BrokenPipeError) or e.errno == errno.EINVAL):
                raise
            self.output_gone()
            self.signum = self.signum or self.OUTPUT_GONE

    def output_gone(self):
        silence_stdout()  # no second error at exit
        self.gone = True

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self.active = True
        return self

    def handle(self, signum, frame):
        if self.signum not in (None, self.OUTPUT_GONE) and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts
        self.signum = signum  # a Ctrl-C that also ended `| tee` exits 130, as any Ctrl-C does
        if self.announce:  # os.write: the signal may have come while print was writing a line
            name = signal.Signals(signum).name
            try:
                os.write(
                    sys.stdout.fileno(),
                    f"\n{name} received: finishing this step, then saving last.pt\n".encode(),
                )
            except BrokenPipeError:  # the same Ctrl-C ended `| tee`
                self.output_gone()
            except (OSError, ValueError):  # no file behind stdout
                pass

    def __exit__(self, *exc):
        self.active = False
        for s, handler in self.previous.items():
            signal.signal(s, handler)
