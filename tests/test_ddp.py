"""Distributed data parallel on CPU with Gloo and two processes, launched by torchrun."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import train
from conftest import ROOT, tiny_model_config
from model import GPT
from checkpoint import load_checkpoint, model_from_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def torchrun(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


# One optimizer step under DDP: each rank takes its half of a fixed batch (split further into
# grad_accum micro-batches); rank 0 saves the resulting weights.
DDP_STEP = textwrap.dedent("""
    import contextlib, os, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, os.path.join({root!r}, "tests"))
    import train
    from conftest import tiny_model_config
    from model import GPT

    dist.init_process_group("gloo")
    rank, accum = dist.get_rank(), {accum}
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    x, y = torch.load({batch!r})
    half = x.size(0) // 2
    x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    size = half // accum
    micro = iter([(x[i:i + size], y[i:i + size]) for i in range(0, half, size)])
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train.train_step(ddp, opt, lambda: next(micro), 1.0, accum, 1.0, contextlib.nullcontext())
    if rank == 0:
        torch.save(model.state_dict(), {out!r})
    dist.barrier()  # leave together: a rank tearing down while its peer still works can abort it
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("accum", [1, 2])
def test_one_ddp_step_equals_one_single_process_step(tmp_path, accum):
    torch.manual_seed(1)
    x = torch.randint(0, 65, (8, 16))
    y = torch.randint(0, 65, (8, 16))
    torch.save((x, y), tmp_path / "batch.pt")
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP.format(root=ROOT, accum=accum, batch=str(tmp_path / "batch.pt"),
                                      out=str(tmp_path / "ddp.pt")))
    result = torchrun(str(script))
    assert result.returncode == 0, result.stderr[-2000:]

    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train.train_step(model, opt, lambda: (x, y), 1.0, 1, 1.0, contextlib.nullcontext())
    ddp_state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.allclose(value, ddp_state[name], atol=1e-6), name


def test_torchrun_trains_and_only_rank_zero_writes(shakespeare_head, tmp_path):
    out = tmp_path / "run"
    result = torchrun(os.path.join(ROOT, "train.py"), "--device", "cpu", "--data", shakespeare_head,
                      "--out_dir", str(out), "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16",
                      "--batch_size", "16", "--max_steps", "60", "--eval_interval", "30", "--eval_iters", "4",
                      "--lr", "1e-2", "--sample_tokens", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("done:") == 1 and result.stdout.count("eval      0/") == 1
    assert "x 2 processes" in result.stdout
    assert sorted(os.listdir(out)) == ["best.pt", "grad_norm.png", "history.csv", "history.json", "last.pt",
                                       "loss.png", "lr.png"]
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    model = model_from_checkpoint(ckpt)
    logits, _ = model(torch.zeros(1, 4, dtype=torch.long))
    assert torch.isfinite(logits).all()
