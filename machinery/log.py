"""What the scripts print: flushed lines, warnings, durations, an error's first line."""

import sys


def log(*args):
    """Print one flushed line, so output reads well in a Colab cell and in a log file."""
    print(*args, flush=True)


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def format_seconds(seconds):
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
