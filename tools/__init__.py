"""Commands that stand alone, each run as python -m tools.NAME: a corpus prepared to disk, pictures of a
trained model, runs compared, and the experiments (ablation, decoding, scaling)."""
