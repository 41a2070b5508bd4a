"""Distributed data parallel on CPU with Gloo and two processes, launched by torchrun: a DDP
step equals a single-process step, the ranks agree on a stop signal that only one of them
got (no rank leaving before rank 0 has saved) and on --dtype auto's measured precision, and a
run resumes under torchrun exactly, with only rank 0 writing."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import ROOT, assert_one_line_error, fixed_batch, subprocess_env, tiny_model_config
from model import GPT
import train

from machinery.checkpoint import load_checkpoint, model_from_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


# One optimizer step under DDP, once without and once with gradient accumulation: each rank
# takes its half of a fixed batch (split further into accum micro-batches); rank 0 saves the
# weights each step gives.
DDP_STEP = textwrap.dedent("""
    import contextlib, os, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, os.path.join({root!r}, "tests"))
    from conftest import tiny_model_config
    from model import GPT
    import train

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for accum in (1, 2):
        torch.manual_seed(0)
        model = GPT(tiny_model_config())
        x, y = torch.load({batch!r})
        half = x.size(0) // 2
        x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        size = half // accum
        micro = iter([(x[i:i + size], y[i:i + size]) for i in range(0, half, size)])
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        train.train_step(DDP(model), opt, lambda: next(micro), 1.0, accum, 1.0, contextlib.nullcontext())
        if rank == 0:
            torch.save(model.state_dict(), {out!r}.format(accum))
    dist.barrier()  # leave together: a rank tearing down while its peer still works can abort it
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as machinery/cli.leave: the interpreter's usual teardown can still abort a rank (-6)
""")


def two_ranks(script, *args, timeout=120):
    """Run script ARGS as the two ranks of one process group, without the torchrun launcher
    (which the next test starts once): each gets the variables torchrun would set."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                 MASTER_PORT=str(port), PYTHONPATH=ROOT))
             for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in ranks]
    finally:  # a timeout or a failure leaves neither rank running
        for p in ranks:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(ranks, outputs)]


def test_one_ddp_step_equals_one_single_process_step_with_and_without_accumulation(tmp_path):
    x, y = fixed_batch(8, 16, seed=1)
    torch.save((x, y), tmp_path / "batch.pt")
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP.format(root=ROOT, batch=str(tmp_path / "batch.pt"), out=str(tmp_path / "ddp_{}.pt")))
    for code, _, err in two_ranks(script):
        assert code == 0, err[-2000:]

    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train.train_step(model, opt, lambda: (x, y), 1.0, 1, 1.0, contextlib.nullcontext())
    for accum in (1, 2):
        ddp_state = torch.load(tmp_path / f"ddp_{accum}.pt", weights_only=True)
        for name, value in model.state_dict().items():
            assert torch.allclose(value, ddp_state[name], atol=1e-6), (accum, name)


# Set-up under two ranks whose --dtype auto timings disagree (rank 0 finds bfloat16 faster, rank 1 float32): each rank
# prints the precision it will train in.
DTYPE_AUTO = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, os.path.join({root!r}, "tests"))
    from conftest import tiny_model_config, tiny_train_config
    import train
    from machinery import ddp, setup
    rank = int(os.environ["RANK"])
    setup.measured_on = lambda device: True  # as on a CPU with bfloat16 instructions
    setup.measure_dtype = lambda *a: {{"dtype": ("bfloat16", "float32")[rank], "dtype_note": f"rank {{rank}}'s timing"}}
    cfg = tiny_train_config({data!r}, {out!r}, dtype="auto", batch_size=4)
    run = train.setup_run(tiny_model_config(), cfg)
    print("dtype", run.dtype, run.state.plan["dtype_note"], flush=True)
    ddp.teardown_distributed(run.world)
    os._exit(0)
""")


def test_every_rank_trains_in_rank_0s_measured_precision(shakespeare_head, tmp_path):
    script = tmp_path / "dtype_auto.py"
    script.write_text(DTYPE_AUTO.format(root=ROOT, data=shakespeare_head, out=str(tmp_path / "run")))
    results = two_ranks(script)
    for code, _, err in results:
        assert code == 0, err[-2000:]
    lines = [next(line for line in out.splitlines() if line.startswith("dtype ")) for _, out, _ in results]
    assert lines == ["dtype bfloat16 rank 0's timing"] * 2


# train.py with rank 0's checkpoint writes after step 0 taking a second longer
SLOW_SAVE = textwrap.dedent("""
    import runpy, sys, time
    sys.path.insert(0, {root!r})
    import machinery.checkpoint
    write = machinery.checkpoint.save_checkpoint
    machinery.checkpoint.save_checkpoint = lambda path, ckpt: (time.sleep(1 if ckpt["step"] else 0), write(path, ckpt))
    runpy.run_path({root!r} + "/train.py", run_name="__main__")
""")


def rank_process(rank, marker):
    """The pid of the torchrun worker of this rank whose command line holds marker (Linux /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and f"RANK={rank}".encode() in environ and b"LOCAL_RANK" in b"".join(environ):
            return int(pid)
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds rank 1's process through /proc")
def test_ranks_agree_on_a_stop_signal_that_only_one_got_and_rank_0_saves(shakespeare_head, tmp_path):
    out = tmp_path / "run"
    shape = ["--device", "cpu", "--data", shakespeare_head, "--out_dir", out, "--n_layer", "1", "--n_embd", "32",
             "--n_head", "2", "--block_size", "16", "--batch_size", "16", "--eval_iters", "4", "--lr", "1e-2",
             "--sample_tokens", "0", "--log_interval", "5", "--eval_interval", "1000"]
    # rank 0 writes slowly (a big model, a slow disk): rank 1 must not exit before it has saved, or torchrun ends it
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE.format(root=ROOT))
    proc = subprocess.Popen([*LAUNCH, str(script), *map(str, shape), "--max_steps", "5000", "--plots", "false"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=subprocess_env(PYTHONPATH=ROOT), start_new_session=True)
    try:
        lines, deadline = [], time.time() + 120
        while not any(line.startswith("step     10/") for line in lines) and time.time() < deadline:
            lines.append(proc.stdout.readline())
            if not lines[-1]:  # the launcher has ended
                break
        pid = rank_process(1, str(out))
        assert pid, "".join(lines)
        os.kill(pid, signal.SIGTERM)  # only rank 1 is told to stop; rank 0 must hear of it and save
        stdout, stderr = proc.communicate(timeout=120)
    finally:  # a failure leaves no 5000-step run behind: the launcher and both ranks go
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Resume with: python train.py --resume" in stdout, stderr[-2000:]
    stopped = load_checkpoint(str(out / "last.pt"))["step"]
    assert 10 <= stopped < 5000 and stopped % 5 == 0  # where the ranks compare notes: a progress line


def test_overfit_batch_ends_every_rank_at_the_same_step(shakespeare_head):
    # each rank fits its own batch: a rank deciding alone would wait for the other at the exit while it steps on
    shape = ["--device", "cpu", "--data", shakespeare_head, "--n_layer", "1", "--n_embd", "64", "--n_head", "2",
             "--block_size", "64", "--batch_size", "4", "--max_steps", "1000", "--overfit_batch", "--log_interval", "1",
             "--lr", "5e-3", "--min_lr", "5e-3", "--warmup_steps", "1", "--weight_decay", "0", "--eval_iters", "1",
             "--sample_tokens", "0", "--plots", "false", "--dtype", "float32", "--seed", "1"]
    (code0, out, err), (code1, _, _) = two_ranks(os.path.join(ROOT, "train.py"), *shape, timeout=60)
    assert code0 == code1 == 0 and "overfit_batch: loss below 0.01" in out, err[-2000:]


def test_a_time_budget_too_short_fails_every_rank_with_one_line(shakespeare_head, tmp_path):
    # the ranks read one clock (their mean): one failing alone would leave the other waiting forever
    shape = ["--device", "cpu", "--data", shakespeare_head, "--out_dir", tmp_path / "run", "--n_layer", "1",
             "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--batch_size", "16", "--eval_iters", "1",
             "--sample_tokens", "0", "--plots", "false", "--warmup_steps", "10", "--time_budget", "0.001s"]
    for code, _, err in two_ranks(os.path.join(ROOT, "train.py"), *shape, timeout=60):
        assert_one_line_error(code, err, "too short")


def test_a_time_budget_ends_every_rank_at_the_same_step_with_the_lr_at_its_floor(shakespeare_head, tmp_path):
    # every rank reads the clock at every step and takes the ranks' mean: a rank that ended alone would
    # leave the other waiting in its next step's gradient exchange until the timeout
    budget_seconds = 16  # room for two processes to start beside the suite's other worker (torch imports in 2-5 s)
    shape = ["--device", "cpu", "--data", shakespeare_head, "--out_dir", tmp_path / "run", "--n_layer", "1",
             "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--batch_size", "16", "--eval_iters", "1",
             "--sample_tokens", "0", "--plots", "false", "--warmup_steps", "5", "--eval_interval", "100",
             "--log_interval", "10", "--time_budget", f"{budget_seconds}s"]
    t0 = time.perf_counter()
    for code, _, err in two_ranks(os.path.join(ROOT, "train.py"), *shape, timeout=90):
        assert code == 0, err[-2000:]
    took = time.perf_counter() - t0
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    cfg = last["train_config"]
    assert last["step"] > 5 and last["progress"] > 0.99 and last["last_eval_step"] == last["step"]
    assert last["lr"] <= cfg["min_lr"] + 0.01 * (cfg["lr"] - cfg["min_lr"])  # the last step's, at the floor
    assert took < budget_seconds + 10  # the margin is for a busy machine


def test_a_run_resumed_under_torchrun_ends_as_the_run_that_went_straight_on_with_rank_0_writing(
        shakespeare_head, tmp_path):
    # each rank draws its own batches: a resume puts back every rank's random numbers, not rank 0's alone
    shape = ["--device", "cpu", "--data", shakespeare_head, "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
             "--block_size", "16", "--batch_size", "8", "--eval_iters", "2", "--sample_tokens", "0", "--plots",
             "false", "--warmup_steps", "2", "--log_interval", "4", "--eval_interval", "1000", "--max_steps", "8"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for code, _, err in two_ranks(os.path.join(ROOT, "train.py"), *shape, "--save_interval", "4", "--out_dir", straight):
        assert code == 0, err[-2000:]
    resumed.mkdir()
    os.replace(straight / "ckpt_0000004.pt", resumed / "last.pt")
    (code, stdout, err), (code1, stdout1, err1) = two_ranks(os.path.join(ROOT, "train.py"), "--resume", "--out_dir",
                                                            resumed, "--plots", "true")
    assert code == code1 == 0, err[-2000:] + err1[-2000:]
    assert stdout.count("done:") == 1 and f"resuming {resumed}/last.pt at step 4" in stdout and stdout1 == ""
    assert "x 2 processes" in stdout
    assert sorted(os.listdir(resumed)) == ["best.pt", "ckpt_0000008.pt", "grad_norm.png", "history.csv", "history.json",
                                           "last.pt", "loss.png", "lr.png"]  # rank 0's files only
    evals = [h for h in json.loads((resumed / "history.json").read_text()) if h["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 8  # one history across both launches
    a, b = load_checkpoint(str(straight / "last.pt")), load_checkpoint(str(resumed / "last.pt"))
    assert a["step"] == b["step"] == 8 and a["history"][-1]["val_loss"] == b["history"][-1]["val_loss"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in b["model"])
    logits, _ = model_from_checkpoint(b)(torch.zeros(1, 4, dtype=torch.long))
    assert torch.isfinite(logits).all()
