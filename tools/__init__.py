"""Commands that stand alone, each run as python -m tools.NAME: a corpus prepared, pictures of a
model, runs compared, and the experiments (ablation, decoding, scaling)."""
