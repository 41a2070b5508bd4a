"""Several processes (machinery/devices.py): two under torchrun (Gloo, on the CPU): a DDP step
equals a single-process step, the ranks agree on a stop signal only one of them got, and a run
resumed under torchrun ends as the run that went straight on. Without torchrun: what cannot work
here is refused before joining."""

import contextlib
import dataclasses
import os
import select
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, corpus_head, script_env, tiny_model, without_timings

import train
from config import TinyLLMError, TrainConfig
from machinery import checkpoint, devices
from model import GPT

FLOAT32 = devices.Process(0, 1, torch.device("cpu"))  # float32: no autocast, a disabled scaler
pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
    pytest.mark.xdist_group("torchrun"),  # one worker: torchrun runs once (launch)
]

# Each rank runs the four in turn, in one process group (a process joins once, however many runs it
# trains)
WORKER = """
import contextlib, multiprocessing, os, shutil, signal, sys, torch
sys.path.insert(0, sys.argv[1])
import train
from config import GPTConfig, TrainConfig
from machinery import devices
from model import GPT
plan, out = torch.load(sys.argv[2], weights_only=True), os.path.dirname(sys.argv[2])

# 1. one optimizer step of a model wrapped in DDP, each rank on its half of a fixed batch, in
# micro-batches
process = devices.setup_process(torch.device("cpu"))
rank, world, device = process.rank, process.world, process.device
x, y = plan["batch"]
half = len(x) // world
x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
for accum in (1, 2):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**plan["model"]))
    size = half // accum
    micro = iter([(x[i:i + size], y[i:i + size]) for i in range(0, half, size)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train.train_step(process.wrap(model), optimizer, lambda: next(micro), 0.5,
                     TrainConfig(grad_accum_steps=accum, grad_clip=0.0), process)
    if rank == 0:
        torch.save(model.state_dict(), f"{out}/ddp_{accum}.pt")

# 2. a run straight to its end; 3. the same run, where rank 1 alone gets SIGTERM during step 5;
# 4. its resume
train.main(plan["flags"] + ["--out_dir", f"{out}/straight"])
real, steps = train.train_step, []
def sigterm_to_rank_1_in_step_5(*a, **k):
    steps.append(1)
    if rank == 1 and len(steps) == 5:
        signal.raise_signal(signal.SIGTERM)
    return real(*a, **k)
train.train_step = sigterm_to_rank_1_in_step_5
try:
    train.main(plan["flags"] + ["--out_dir", f"{out}/resumed"])
except SystemExit as e:
    print(f"rank {rank} exit {e.code}", flush=True)
train.train_step = real
if rank == 0:
    shutil.copy(f"{out}/resumed/last.pt", f"{out}/stopped.pt")
train.main(["--resume", "--out_dir", f"{out}/resumed"])
sys.stdout.flush()
if multiprocessing.parent_process() is None:  # a process of its own: out at once, as
    os._exit(0)  # machinery/cli.leave under torchrun (a forked rank: torchrun ends it so)
"""


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """WORKER under torchrun, its ranks forked from this process, which has imported torch and
    what an optimizer imports: (its output, its folder); a hung rank leaves nothing running."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "data.txt").write_text(corpus_head(20_000), encoding="utf-8")
    windows = torch.randint(0, 65, (8, 17), generator=torch.Generator().manual_seed(1))
    flags = [
        *TINY_FLAGS,
        "--data",
        str(out / "data.txt"),
        "--max_steps",
        "12",
        "--log_interval",
        "4",
        "--eval_interval",
        "6",
        "--warmup_steps",
        "2",
        "--lr",
        "1e-2",
        "--min_lr",
        "1e-3",
    ]
    plan = {
        "batch": (windows[:, :-1], windows[:, 1:]),
        "model": dataclasses.asdict(tiny_model()),
        "flags": flags,
    }
    torch.save(plan, out / "plan.pt")
    (out / "worker.py").write_text(WORKER)
    train.make_optimizer(GPT(tiny_model()), TrainConfig(), torch.device("cpu"))  # imported here
    argv = ["--standalone", "--nproc_per_node=2", out / "worker.py", ROOT, out / "plan.pt"]
    code, output = torchrun([str(a) for a in argv], out)
    assert code == 0, output[-3000:]
    return output, out


def torchrun(argv, cwd, timeout=120):
    """`torchrun --run-path --start-method fork` (torch.distributed.run) in a process forked from
    this one: it and its ranks, which run the script in its interpreter, start with what this
    process has imported, torch among it, and import nothing again (where there is no fork:
    `python -m torch.distributed.run`, each rank a process of its own). A hung rank leaves nothing
    running. (Its exit status, None past the timeout; its output and its ranks'.)"""
    if not hasattr(os, "fork"):
        command = [sys.executable, "-m", "torch.distributed.run", *argv]
        done = subprocess.run(
            command, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=timeout
        )
        return done.returncode, done.stdout + done.stderr
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()  # the ranks in its process group: killed with it
            os.close(read)
            os.dup2(write, 1)
            os.dup2(write, 2)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(script_env())
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
            sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
            from torch.distributed import run

            run.main(["--run-path", "--start-method", "fork", *argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    output, status, deadline = b"", None, time.monotonic() + timeout
    try:
        while select.select([read], [], [], max(0, deadline - time.monotonic()))[0]:
            chunk = os.read(read, 1 << 16)
            if not chunk:  # it and its ranks have ended
                break
            output += chunk
        while time.monotonic() < deadline:
            done, waited = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(waited)
                break
            time.sleep(0.05)
    finally:
        os.close(read)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if status is None:
            os.waitpid(pid, 0)
    return status, output.decode(errors="replace")


@pytest.mark.slow
def test_one_ddp_step_equals_one_single_process_step_with_and_without_accumulation(launch):
    _, out = launch
    x, y = torch.load(out / "plan.pt", weights_only=True)["batch"]
    torch.manual_seed(0)
    model = GPT(tiny_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train.train_step(model, optimizer, lambda: (x, y), 0.5, TrainConfig(grad_clip=0.0), FLOAT32)
    for accum in (1, 2):
        ddp = torch.load(out / f"ddp_{accum}.pt", weights_only=True)
        for name, value in model.state_dict().items():
            assert torch.allclose(value, ddp[name], atol=1e-6), (accum, name)


@pytest.mark.slow
def test_ranks_agree_on_a_stop_signal_only_one_rank_got_and_rank_0_saves(launch):
    output, out = launch
    assert "rank 0 exit 143" in output and "rank 1 exit 143" in output, output[-3000:]
    assert output.count("Resume with") == 1  # rank 0 alone says how to go on
    # the step of rank 1's signal, or a later one
    assert 5 <= checkpoint.load(str(out / "stopped.pt"))["step"] < 12


@pytest.mark.slow
def test_a_run_resumed_under_torchrun_ends_as_the_run_that_went_straight_on(launch):
    output, out = launch
    assert output.count(f"resuming {out}/resumed/last.pt") == 1  # from rank 0 alone
    straight = checkpoint.load(str(out / "straight" / "last.pt"))
    resumed = checkpoint.load(str(out / "resumed" / "last.pt"))
    assert straight["step"] == resumed["step"] == 12
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert without_timings(straight["history"]) == without_timings(resumed["history"])
    assert not any(k.startswith("module.") for k in resumed["model"])


@pytest.mark.parametrize(
    "machine, device, words",
    [
        # two processes, one GPU: NCCL would hang; Gloo takes no MPS tensors
        (dict(cuda=True, mps=False, gpus=1), "cuda", "--nproc_per_node"),
        (dict(cuda=False, mps=True, gpus=0), "mps", "--device cpu"),
    ],
)
def test_processes_that_cannot_work_here_are_refused_in_one_line_before_joining(
    fake_machine, monkeypatch, text_file, tmp_path, machine, device, words
):
    fake_machine(**machine)
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    precision = torch.get_float32_matmul_precision()
    try:  # (main, not run_cli: under torchrun, run_cli would end this process)
        with pytest.raises(TinyLLMError) as refused:
            train.main(
                [
                    *TINY_FLAGS,
                    "--device",
                    device,
                    "--data",
                    text_file,
                    "--out_dir",
                    str(tmp_path / "run"),
                ]
            )
    finally:
        torch.set_float32_matmul_precision(precision)  # a mocked GPU turned TF32 on
    assert words in str(refused.value) and "\n" not in str(refused.value)
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()
