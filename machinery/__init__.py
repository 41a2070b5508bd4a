"""What a run needs besides the lesson, one module per concern. Importing it only notes the time:
train.py imports it first, before torch loads, so a time budget counts from there."""

import time

STARTED = time.perf_counter()
