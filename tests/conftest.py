"""Shared fixtures: tiny models and tiny data, so the whole suite runs in seconds on a CPU."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import GPTConfig, TrainConfig  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def shakespeare_head(tmp_path):
    """The first 30,000 characters of the bundled corpus, as a file."""
    with open(os.path.join(ROOT, "data", "input.txt"), encoding="utf-8") as f:
        text = f.read(30_000)
    path = tmp_path / "head.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def tiny_model_config(**overrides):
    values = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    values.update(overrides)
    return GPTConfig(**values)


def tiny_train_config(data, out_dir, **overrides):
    values = dict(data=data, out_dir=str(out_dir), batch_size=8, max_steps=20, lr=3e-3, min_lr=3e-4,
                  warmup_steps=5, eval_interval=5, eval_iters=2, log_interval=10, sample_tokens=0, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)
