"""Commands that stand alone, each run as python -m tools.NAME: a corpus prepared, pictures of a
model, runs compared, and the experiments (ablation, decoding, precision, scaling), which train
through experiment()."""

from config import PRESETS, build_configs


def experiment(given, preset="tiny"):
    """train.py's run of the settings given, in this process, without plots or a closing sample:
    its summary."""
    import train  # here, not above: the tools that only read files need no torch

    given = {"plots": False, "sample_tokens": 0} | given
    return train.train(*build_configs(given, PRESETS[preset]), preset=preset, given=given)
