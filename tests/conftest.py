"""Shared fixtures: tiny models and tiny data, so the whole suite runs in seconds on a CPU."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import GPTConfig, TrainConfig  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def _tree_state():
    """Tracked changes, untracked files and ignored files of the checkout (caches aside)."""
    done = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None  # not a git checkout: nothing to compare
    return sorted(line for line in done.stdout.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line)


@pytest.fixture(scope="session", autouse=True)
def tests_leave_the_tree_as_they_found_it():
    """Tests write only into their temporary folders: the checkout must look the same afterwards."""
    before = _tree_state()
    yield
    after = _tree_state()
    if before is not None and after != before:
        raise AssertionError(f"the tests changed the checkout: {sorted(set(after) ^ set(before))}")


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


def cli(capsys, main, *argv):
    """Run a script's main() in this process, as its command line would: (exit code, stdout, stderr)."""
    from cli import run_cli
    code = 0
    try:
        run_cli(main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *words):
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0], lines[0]


# float32 on any CPU: --dtype auto picks bfloat16 only where the CPU has it natively, and the
# suite must behave the same on every CI machine (the bfloat16 path has tests of its own)
TINY_SHAPE = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--batch_size", "8",
              "--device", "cpu", "--dtype", "float32"]
TINY_FLAGS = TINY_SHAPE + ["--eval_iters", "2", "--sample_tokens", "0", "--plots", "false"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny model trained for 60 steps on the first 20,000 characters of the corpus: (run folder, data file)."""
    folder = tmp_path_factory.mktemp("trained")
    with open(os.path.join(ROOT, "data", "input.txt"), encoding="utf-8") as f:
        (folder / "data.txt").write_text(f.read(20_000), encoding="utf-8")
    import train
    torch.manual_seed(0)
    cfg = tiny_train_config(str(folder / "data.txt"), folder / "run", max_steps=60, eval_interval=30, lr=1e-2)
    train.train(tiny_model_config(), cfg)
    return folder / "run", folder / "data.txt"
