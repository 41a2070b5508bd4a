"""What a run needs besides the lesson, a module per stage. Importing it does two things, which is why
the scripts import it first, before torch loads:
- it notes the time (STARTED), so that a time budget counts from the process's start;
- it tells OpenMP that an idle thread spins only briefly before it sleeps (GOMP_SPINCOUNT=10000, read once,
  when torch loads OpenMP): with the long default spin, a second busy process on a 2-core machine made a
  2-thread training step 2 to 9 times slower. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins; imported
  after torch, it affects only child processes."""

import os
import time

STARTED = time.perf_counter()

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
