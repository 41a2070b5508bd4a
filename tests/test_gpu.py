"""The GPU itself, where there is one (elsewhere skipped, saying why). conftest.py hides CUDA from
this process, so each check runs in a process that sees the GPUs pytest was started with."""

import csv
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, USER_CUDA, corpus_head, script_env

from machinery import checkpoint


def gpu_env():
    """This process's environment with the CUDA_VISIBLE_DEVICES the user started pytest with."""
    env = script_env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if os.environ[USER_CUDA] != "<unset>":
        env["CUDA_VISIBLE_DEVICES"] = os.environ[USER_CUDA]
    return env


def a_gpu_is_here():  # asked only where a driver is: a torch start costs seconds
    if os.environ[USER_CUDA] in ("", "-1"):
        return False
    if not (glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi")):
        return False
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        env=gpu_env(),
        timeout=120,
    )
    return probe.stdout.strip() == "True"


pytestmark = pytest.mark.slow  # every check starts a process


@pytest.fixture(scope="module", autouse=True)
def a_gpu():
    """Asked once, when the first of these tests runs, not when the suite is collected."""
    if not a_gpu_is_here():
        pytest.skip("no CUDA GPU visible here")


def on_gpu(*argv, timeout=300):
    done = subprocess.run(
        [sys.executable, *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=gpu_env(),
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_a_gpu_run_trains_resumes_and_samples_the_same_text_for_the_same_seed(tmp_path):
    (tmp_path / "data.txt").write_text(corpus_head(100_000), encoding="utf-8")
    flags = [
        "--data",
        tmp_path / "data.txt",
        "--out_dir",
        tmp_path / "run",
        "--device",
        "cuda",
        "--n_layer",
        2,
        "--n_embd",
        64,
        "--n_head",
        4,
        "--block_size",
        64,
        "--batch_size",
        32,
        "--lr",
        "3e-3",
        "--warmup_steps",
        10,
        "--eval_interval",
        50,
        "--eval_iters",
        4,
        "--sample_tokens",
        0,
        "--plots",
        "false",
    ]
    assert "device cuda" in on_gpu("train.py", *flags, "--max_steps", 100)
    with open(tmp_path / "run" / "history.csv", newline="") as f:
        evals = [float(row["val_loss"]) for row in csv.DictReader(f) if row["kind"] == "eval"]
    assert evals[-1] < evals[0] - 0.5
    out = on_gpu("train.py", *flags, "--resume", "--max_steps", 150)
    assert "resuming" in out and "done: 150 steps" in out
    argv = [tmp_path / "run" / "best.pt", "--device", "cuda", "--max_new_tokens", 200, "--seed", 7]
    texts = [on_gpu("generate.py", *argv) for _ in range(2)]
    assert texts[0] == texts[1] and len(texts[0]) > 150


def test_a_float16_run_trains_with_the_cuda_loss_scaler_and_saves_its_state(tmp_path):
    (tmp_path / "data.txt").write_text(corpus_head(50_000), encoding="utf-8")
    out = on_gpu(
        "train.py",
        "--data",
        tmp_path / "data.txt",
        "--out_dir",
        tmp_path / "run",
        "--preset",
        "tiny",
        "--device",
        "cuda",
        "--dtype",
        "float16",
        "--max_steps",
        30,
        "--eval_interval",
        30,
        "--eval_iters",
        2,
        "--sample_tokens",
        0,
        "--plots",
        "false",
    )
    assert "float16" in out and "done: 30 steps" in out
    # a resume goes on with it
    assert checkpoint.load(str(tmp_path / "run" / "last.pt"))["scaler"]["scale"] > 0


SAVE_ON_GPU = """
import sys, torch
from config import GPTConfig
from model import GPT
from machinery import checkpoint
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32)).cuda().eval()
chars = {"kind": "char", "chars": [chr(33 + i) for i in range(64)],
         "special_tokens": ["<|endoftext|>"]}
checkpoint.save(sys.argv[1], checkpoint.create(model, chars, step=0))
with torch.no_grad():  # what the GPU gave
    torch.save(model(torch.arange(16, device="cuda")[None])[0].cpu(), sys.argv[1] + ".logits")
"""


def test_a_checkpoint_saved_from_the_gpu_loads_onto_the_cpu(tmp_path):
    on_gpu("-c", SAVE_ON_GPU, tmp_path / "gpu.pt")
    loaded = checkpoint.load_model(str(tmp_path / "gpu.pt"))
    model, tokenizer = loaded.model, loaded.tokenizer  # here: no GPU seen
    assert next(model.parameters()).device.type == "cpu" and tokenizer.vocab_size == 65
    with torch.no_grad():
        logits = model(torch.arange(16)[None])[0]
    on_the_gpu = torch.load(tmp_path / "gpu.pt.logits", weights_only=True)
    assert torch.allclose(logits, on_the_gpu, atol=1e-4)


KV_CACHE = """
import torch
from config import GPTConfig, SamplerConfig
GREEDY = SamplerConfig(temperature=0)
from model import GPT
from sampling import Context, token_stream
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}  # of the largest logit
dtypes = ["float32", "float16"] + ["bfloat16"] * torch.cuda.is_bf16_supported()
for pos in ("learned", "rope"):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=64, pos=pos)
    model = GPT(cfg).cuda().eval()
    prompt = torch.randint(0, 65, (2, 5), device="cuda")
    steps = [token_stream(Context(model, c), prompt, 40, GREEDY) for c in (1, 0)]
    cached, full = ([t for t, _ in stream] for stream in steps)
    assert torch.equal(torch.cat(cached, 1), torch.cat(full, 1))
    for name in dtypes:
        idx, cached, full, worst = prompt, Context(model, True), Context(model, False), 0.0
        autocast = torch.autocast("cuda", getattr(torch, name), enabled=name != "float32")
        with torch.no_grad(), autocast:
            for _ in range(40):  # 45 tokens > block_size 16: the cache is refilled
                a, b = cached.next_logits(idx).float(), full.next_logits(idx).float()
                worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
                top2 = b.topk(2).values
                sure = top2[:, 0] - top2[:, 1] > 2 * TOLERANCE[name] * b.abs().max()
                # the same greedy token
                assert not (sure & (a.argmax(-1) != b.argmax(-1))).any(), (pos, name)
                idx = torch.cat((idx, b.argmax(-1, keepdim=True)), dim=1)
        assert worst < TOLERANCE[name], (pos, name, worst)
        print("agrees", pos, name, worst)
"""


def test_the_kv_cache_agrees_with_recomputation_in_every_precision_the_gpu_has():
    out = on_gpu("-c", KV_CACHE)
    assert out.count("agrees") >= 4 and "float16" in out, out


RESUME_FUSED = """
import dataclasses, sys, torch
import train
from config import GPTConfig, RunOptions, TrainConfig
from machinery.settings import Settings, settle_run
from machinery import checkpoint
data, out = sys.argv[1:3]
cfg = TrainConfig(data=data, out_dir=out, batch_size=8, max_steps=3, eval_interval=3, eval_iters=1,
                  warmup_steps=1, sample_tokens=0, plots=False, device="cuda", dtype="float32")
shape = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
cuda = torch.device("cuda")

def fused():
    return checkpoint.load(out + "/last.pt")["optimizer"]["param_groups"][0]["fused"]

def as_a_mac_makes_it(model, cfg, device, dtype="float32"):
    return make_optimizer(model, cfg, torch.device("mps"), dtype)

make_optimizer = train.make_optimizer
train.make_optimizer = as_a_mac_makes_it  # where fit calls it
train.train(settle_run(Settings(shape, cfg, RunOptions(), "train", "custom", cuda), {}))
print("saved fused", fused())
train.make_optimizer = make_optimizer
longer = Settings(shape, dataclasses.replace(cfg, max_steps=6), RunOptions(resume=True), "train",
                  "custom", cuda)
train.train(settle_run(longer, {"max_steps": 6}))
print("resumed fused", fused())
"""


def test_a_run_saved_with_the_plain_adamw_kernel_resumes_with_the_fused_one(tmp_path):
    (tmp_path / "data.txt").write_text(corpus_head(20_000), encoding="utf-8")
    out = on_gpu("-c", RESUME_FUSED, tmp_path / "data.txt", tmp_path / "run")
    assert "saved fused False" in out and "done: 6 steps" in out, out
    assert "resumed fused True" in out, out
