"""On a machine with a CUDA GPU, the GPU itself: a run trains, saves, resumes and samples there
in its own precision, float16 trains with CUDA's loss scaler, the same seed samples the same
text, and the KV cache agrees with recomputation within the precision's tolerance. Everywhere
else these tests are skipped, and say why. The rest of the suite runs on the CPU whatever the
machine has (conftest.py hides CUDA from it), so these run the scripts in processes that see the GPU."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env, write_head

from machinery.checkpoint import load_checkpoint


def a_gpu_is_here():
    """Whether a CUDA GPU is visible to a fresh process (a driver first: no torch start-up where there is none)."""
    if not (glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi")):
        return False
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, env=subprocess_env(gpu=True), timeout=120)
    return probe.stdout.strip() == "True"


pytestmark = pytest.mark.skipif(not a_gpu_is_here(), reason="no CUDA GPU on this machine")


def on_gpu(script, *args, timeout=300):
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=subprocess_env(gpu=True), timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_gpu_run_trains_resumes_and_samples_the_same_text_for_the_same_seed(tmp_path):
    data = write_head(tmp_path / "data.txt", 100_000)
    flags = ["--data", data, "--out_dir", tmp_path / "run", "--n_layer", "2", "--n_embd", "64", "--n_head", "4",
             "--block_size", "64", "--batch_size", "32", "--eval_interval", "50", "--eval_iters", "4",
             "--sample_tokens", "0", "--plots", "false"]
    out = on_gpu("train.py", *flags, "--max_steps", "100")
    assert "device cuda:" in out or "device cuda (" in out
    evals = [row for row in json.loads((tmp_path / "run" / "history.json").read_text()) if row["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    out = on_gpu("train.py", *flags, "--resume", "--max_steps", "150")
    assert "resuming" in out and "done: 150 steps" in out
    texts = [on_gpu("generate.py", tmp_path / "run" / "best.pt", "--max_new_tokens", "200", "--seed", "7")
             for _ in range(2)]
    assert texts[0] == texts[1] and len(texts[0]) > 150


def test_a_float16_run_trains_with_the_cuda_loss_scaler_and_saves_its_state(tmp_path):
    """float16, the precision --dtype auto gives a T4 (no native bfloat16), trains only with torch's CUDA scaler."""
    data = write_head(tmp_path / "data.txt", 50_000)
    out = on_gpu("train.py", "--data", data, "--out_dir", tmp_path / "run", "--preset", "tiny", "--dtype", "float16",
                 "--max_steps", "30", "--eval_interval", "30", "--eval_iters", "2", "--sample_tokens", "0",
                 "--plots", "false")
    assert "float16" in out and "done: 30 steps" in out
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["scaler"]["scale"] > 0  # a resume continues its scale


def test_a_checkpoint_saved_from_the_gpu_loads_onto_the_cpu(tmp_path):
    script = ("import sys, torch; sys.path.insert(0, '.'); from machinery.checkpoint import load_checkpoint; "
              "torch.save({'model': {'w': torch.ones(2, device='cuda')}, 'model_config': {}, 'tokenizer': {}}, "
              f"{str(tmp_path / 'gpu.pt')!r}); print(load_checkpoint({str(tmp_path / 'gpu.pt')!r})['model']['w'].device)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(gpu=True), timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "cpu", done.stderr[-3000:]


def test_the_kv_cache_agrees_with_recompute_in_every_precision_the_gpu_has():
    out = on_gpu("bench.py", "gpu_check", "--quick", "--out", os.devnull, "--out_md", os.devnull, timeout=600)
    checks = [line for line in out.splitlines() if line.startswith("check ")]
    assert checks and all("KV cache agrees" in line for line in checks), out


REPLAY = """
import torch
import sampling
from deep_dives import graphs
from config import GREEDY, GPTConfig
from model import GPT
torch.manual_seed(0)
for switches in (dict(pos="learned"), dict(pos="rope", mlp="swiglu", norm="rmsnorm")):
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64, **switches)).cuda().eval()
    prompt = torch.randint(0, 65, (2, 5), device="cuda")
    for dtype in ("float32", "bfloat16"):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            replayed = sampling.generate(model, prompt, 80, GREEDY, replay=graphs.replayable)  # 85 > 32: refills
            plain = sampling.generate(model, prompt, 80, GREEDY)
        assert torch.equal(replayed, plain), (switches, dtype)
print("replayed")
"""


def test_the_decoding_step_replayed_from_a_cuda_graph_gives_the_plain_steps_tokens():
    done = subprocess.run([sys.executable, "-c", REPLAY], capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(gpu=True, PYTHONPATH=ROOT), timeout=300)
    assert done.returncode == 0 and "replayed" in done.stdout, done.stderr[-3000:]
    assert "warning" not in done.stderr, done.stderr  # recorded and replayed: no fallback to the plain step


# A run saved with the plain AdamW kernel (a Mac's) resumed on this device's fused one: one step with the saved moments
RESUME_FUSED = """
import sys, types, torch
from dataclasses import asdict
from config import GPTConfig, TrainConfig
from model import GPT
from optim import make_optimizer
from machinery.checkpoint import restore
import train
device, cfg = torch.device(sys.argv[1]), TrainConfig()
model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)).to(device)
x = torch.randint(0, 16, (2, 8), device=device)
saved = make_optimizer(model, cfg, torch.device("mps"))  # (the Mac's choice of kernel only: nothing asks a Mac)
model(x, x)[1].backward()
saved.step()
optimizer = make_optimizer(model, cfg, device)
restore(types.SimpleNamespace(source={"optimizer": saved.state_dict(), "train_config": asdict(cfg), "step": 1},
                              cfg=cfg, say=print), optimizer, train.TrainState)
model(x, x)[1].backward()
optimizer.step()
print("fused" if optimizer.param_groups[0]["fused"] else "plain", "step taken")
"""


def test_a_run_saved_with_the_plain_adamw_kernel_resumes_with_the_fused_one():
    done = subprocess.run([sys.executable, "-c", RESUME_FUSED, "cuda"], capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(gpu=True, PYTHONPATH=ROOT), timeout=300)
    assert done.returncode == 0 and "fused step taken" in done.stdout, done.stderr[-3000:]
