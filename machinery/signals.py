"""Handles Ctrl-C and SIGTERM during the training loop.

The current step finishes. Then the run saves last.pt, says how to resume, and exits with 128 + the
signal number (130 for Ctrl-C). A second Ctrl-C aborts at once. If the reader of the output goes
away (`| head`), the run stops the same way. Under torchrun every rank stops at the same step: the
ranks agree on it at each progress line and at the end of the run."""

import errno
import os
import signal
import sys

from machinery import cli

# the number of SIGPIPE: when the reader of the output goes, the run exits 141, as a shell expects
# (Python itself ignores SIGPIPE)
OUTPUT_GONE = 13


class Signals:
    def __init__(self, process, log_interval):
        self.process = process
        self.log_interval = log_interval
        self.received = None  # a signal this process received
        self.signum = 0  # the signal every rank stops for
        self.gone = False  # True once the reader has gone; the last lines then go to stderr
        self.active = False  # True inside the loop, where a signal stops the run

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.received not in (None, OUTPUT_GONE) and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts
        self.received = signum  # a Ctrl-C that also closed a `| tee` still exits 130
        if self.process.rank == 0:  # os.write, not print: the signal may come mid-print
            name = signal.Signals(signum).name
            line = f"\n{name} received: finishing this step, then saving last.pt\n"
            try:
                os.write(sys.stdout.fileno(), line.encode())
            except BrokenPipeError:  # the same Ctrl-C ended `| tee`
                self.output_gone()
            except (OSError, ValueError):  # no file behind stdout
                pass

    def say(self, text):
        """Prints a line on rank 0.

        Inside the loop, a reader that has gone stops the run as a signal would: the run saves, and
        its last lines go to stderr. The reader may be `| head`, or a `| tee` that the same Ctrl-C
        ended; Windows reports EINVAL. Outside the loop the OSError is raised."""
        if self.gone:
            print(text, file=sys.stderr, flush=True)
            return
        try:
            cli.log(text)
        except OSError as e:
            gone = isinstance(e, BrokenPipeError) or e.errno == errno.EINVAL
            if not (self.active and gone):
                raise
            self.output_gone()

    def output_gone(self):
        """Marks the reader as gone, so no second error appears at exit.

        Inside the loop, the run then stops."""
        cli.silence_stdout()
        self.gone = True
        if self.active:
            self.received = self.received or OUTPUT_GONE

    def stop(self, state, ending):
        """Returns whether a signal reached any rank; if so, the run saves and exits.

        Under DDP the ranks ask each other at progress lines and when the run is ending."""
        compare = self.process.world == 1 or state.step % self.log_interval == 0
        if compare or ending:
            self.signum = max(self.process.every_rank(self.received or 0))
        return self.signum != 0
