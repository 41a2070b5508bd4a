"""Commands that stand alone, each run as python -m tools.NAME: a corpus prepared, pictures of a
model, runs compared, decoding methods scored, and the experiments (ablation, scaling), which
train through experiment()."""


def experiment(given):
    """train.py's run of the settings given, in this process, without plots or a closing sample."""
    import time

    import train  # here, not above: the tools that only read files need no torch
    from machinery.settings import settle

    given = {"plots": False, "sample_tokens": 0, "preset": "tiny"} | given
    return train.train(settle(given, started=time.perf_counter()))  # its time counts from now
