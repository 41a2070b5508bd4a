"""What a run needs besides the lesson, one module per concern. Importing the package does
nothing but note the time: python train.py's first line imports it, before torch loads, and a
time budget counts from there (budget.py)."""

import time

STARTED = time.perf_counter()
