"""The two scripts as a user runs them: bad input is one clear line and a non-zero exit,
and the same seed prints the same text."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_model_config
from model import GPT
from utils import save_checkpoint


def run(script, *args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for w in words:
        assert w in lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    text = open(os.path.join(ROOT, "data", "input.txt"), encoding="utf-8").read(5000)
    chars = sorted(set(text))
    model = GPT(tiny_model_config(vocab_size=len(chars)))
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_config": vars(model.config).copy(),
                           "tokenizer": {"kind": "char", "chars": chars}, "step": 0, "best_val_loss": 4.0})
    return path


def test_generate_same_seed_same_text(checkpoint, tmp_path):
    args = ["--checkpoint", checkpoint, "--seed", "42", "--max_new_tokens", "60", "--prompt", "ROMEO:"]
    a, b = run("generate.py", *args), run("generate.py", *args)
    c = run("generate.py", *args[:3], "43", *args[4:])
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout != c.stdout
    assert a.stdout.startswith("ROMEO:")
    out = tmp_path / "samples.txt"
    d = run("generate.py", *args, "--num_samples", "3", "--output_file", str(out))
    assert d.returncode == 0
    written = out.read_text()
    assert "seed=42" in written and "temperature=0.8" in written and checkpoint in written
    assert written.count("--- sample") == 3


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "-1"], ["--temperature"]),
    (["--top_p", "1.5"], ["--top_p"]),
    (["--top_k", "-3"], ["--top_k"]),
    (["--num_samples", "0"], ["--num_samples"]),
    (["--prompt", "\u00e9\u00e8"], ["vocabulary"]),
])
def test_generate_rejects_bad_flags(checkpoint, flags, words):
    assert_one_line_error(run("generate.py", "--checkpoint", checkpoint, *flags), *words)


def test_generate_missing_and_corrupt_checkpoint(tmp_path):
    assert_one_line_error(run("generate.py", "--checkpoint", str(tmp_path / "none.pt")), "not found")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    assert_one_line_error(run("generate.py", "--checkpoint", str(bad)), str(bad))


def test_train_rejects_bad_input(tmp_path):
    assert_one_line_error(run("train.py", "--n_embd", "30", "--n_head", "4"), "n_embd (30)", "n_head (4)")
    assert_one_line_error(run("train.py", "--lr", "-1"), "lr")
    assert_one_line_error(run("train.py", "--data", str(tmp_path / "missing.txt")), "not found")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be")
    assert_one_line_error(run("train.py", "--data", str(short), "--out_dir", str(tmp_path)), "block_size")
    assert_one_line_error(run("train.py", "--resume", "--out_dir", str(tmp_path / "empty")), "last.pt")


def test_train_end_to_end_then_generate(tmp_path):
    text = open(os.path.join(ROOT, "data", "input.txt"), encoding="utf-8").read(20_000)
    data = tmp_path / "small.txt"
    data.write_text(text)
    out = tmp_path / "run"
    result = run("train.py", "--data", str(data), "--out_dir", str(out), "--n_layer", "1", "--n_embd", "32",
                 "--n_head", "2", "--block_size", "16", "--batch_size", "8", "--max_steps", "20",
                 "--eval_interval", "10", "--eval_iters", "2", "--sample_tokens", "20", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for words in ("preset tiny", "parameters", "tokens per step", "ln(V)", "sample:"):
        assert words in result.stdout
    sample = run("generate.py", "--checkpoint", str(out / "best.pt"), "--max_new_tokens", "10")
    assert sample.returncode == 0 and len(sample.stdout) >= 10


def test_sweep_script_writes_reproducible_files(checkpoint, tmp_path):
    env = dict(os.environ, TEMPS="1.0", TOP_KS="0 5", NUM_SAMPLES="2", MAX_NEW_TOKENS="20", OMP_NUM_THREADS="1")
    outputs = []
    for run_dir in ("a", "b"):
        env["OUT_DIR"] = str(tmp_path / run_dir)
        result = subprocess.run(["bash", os.path.join(ROOT, "sweep.sh"), checkpoint], capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        outputs.append({p.name: p.read_text() for p in (tmp_path / run_dir).iterdir()})
    assert sorted(outputs[0]) == ["samples_T1.0.txt", "samples_T1.0_k5.txt"]
    assert outputs[0] == outputs[1]
    assert "temperature=1.0 top_k=5" in outputs[0]["samples_T1.0_k5.txt"] and "seed=42" in outputs[0]["samples_T1.0.txt"]
    assert outputs[0]["samples_T1.0.txt"].split("--- sample 1")[1] != outputs[0]["samples_T1.0_k5.txt"].split("--- sample 1")[1]


def test_kill_9_at_random_moments_leaves_a_loadable_last_pt(shakespeare_head, tmp_path):
    """SIGKILL gives the process no chance to clean up; atomic writes must still leave a
    last.pt that loads and resumes to the end."""
    import random
    import signal
    import time
    from utils import load_checkpoint
    rng = random.Random(0)
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", shakespeare_head, "--out_dir", str(out),
           "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--batch_size", "8",
           "--max_steps", "300", "--eval_interval", "5", "--eval_iters", "1", "--sample_tokens", "0", "--device", "cpu",
           "--plots", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for _ in range(3):
        deadline = time.time() + 60
        while not (out / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        killed_mid_run = proc.poll() is None  # on a busy machine the run may not have got far, or may be done
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(str(out / "last.pt"))
        assert 0 <= ckpt["step"] < 300 if killed_mid_run else ckpt["step"] == 300
        proc = subprocess.Popen(cmd + ["--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert load_checkpoint(str(out / "last.pt"))["step"] == 300
