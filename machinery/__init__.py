"""What a run needs besides the lesson, a module per stage. Imported first, before torch, it notes the time (STARTED:
a time budget counts from the process's start) and sets GOMP_SPINCOUNT=10000, so an idle OpenMP thread soon sleeps:
with the long default spin, a second busy process on 2 cores made a 2-thread step 2 to 9 times slower. A user's own
OMP_WAIT_POLICY or GOMP_SPINCOUNT wins; imported after torch (which reads it once), it affects only child processes."""

import os
import time

STARTED = time.perf_counter()

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
