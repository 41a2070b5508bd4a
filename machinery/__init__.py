"""The machinery beside the lesson: everything that keeps a run safe, measured and convenient
on every machine, one module per concern. The lesson's files (config.py, utils.py,
model.py, optim.py, train.py, sampling.py, generate.py) reach each piece in one visible line;
read a module here when you need to know how that piece works. Importing the package does
nothing but note the time: python train.py's first line imports it, before torch loads, and its
time budget counts from there."""

import time

FIRST_IMPORT = time.perf_counter()  # the start of python train.py, as its time budget counts it
