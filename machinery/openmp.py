"""Imported first by the scripts, before torch loads OpenMP, so that an idle OpenMP thread spins only
briefly before it sleeps (GOMP_SPINCOUNT=10000, read once, at that load): with the long default spin, a
second busy process on a 2-core machine made a 2-thread training step 2 to 9 times slower. A user's own
OMP_WAIT_POLICY or GOMP_SPINCOUNT wins; imported after torch, it affects only child processes."""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
