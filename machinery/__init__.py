"""What a run needs besides the lesson. Imported before torch, it notes the start time (STARTED:
a time budget starts there) and sets GOMP_SPINCOUNT=10000: OpenMP's long idle spin made a
2-thread step 2-9x slower beside a busy process on 2 cores. A user's OMP_WAIT_POLICY or
GOMP_SPINCOUNT wins."""

import os
import time

STARTED = time.perf_counter()

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def seconds():
    """This process's seconds so far: python train.py's time budget counts them."""
    return time.perf_counter() - STARTED


def stopwatch():
    """A clock from now: () -> the seconds since this call (a run started inside a program)."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
