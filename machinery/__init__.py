"""The machinery beside the lesson: everything that keeps a run safe, measured and convenient
on every machine, one module per concern. The lesson's files (config.py, utils.py,
model.py, optim.py, train.py, sampling.py, generate.py) reach each piece in one visible line;
read a module here when you need to know how that piece works. Importing the package does
nothing but note the time: python train.py's first line imports it, before torch loads, and its
time budget counts from there."""

import time


def clock():
    """Seconds on the clock that a run's time budget is kept by (time.perf_counter): every
    duration the budget is planned from is read here, the one place tests stand in for."""
    return time.perf_counter()


FIRST_IMPORT = clock()  # the start of python train.py, as its time budget counts it
