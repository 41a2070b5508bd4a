"""Experiments and reports that python bench.py runs: they drive train.py's own loop and
generate.py as a user runs them, and write what they measured. Nothing else imports them."""
