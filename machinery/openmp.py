"""The one module whose import does something: the scripts import it first, before torch
loads OpenMP, so that an idle OpenMP thread spins only briefly before it sleeps
(GOMP_SPINCOUNT=10000, read once when torch loads its OpenMP library). With OpenMP's long
default spin, a second busy process on a 2-core machine made a 2-thread training step 2 to 9
times slower (docs/platforms.md, Threads). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
Imported after torch, it changes nothing but the environment its child processes inherit."""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
