"""machinery/device.py: the device and precision decisions on machines this one stands in for
(fake_machine, and the project's own seams machinery.device.gpu and autocast_works), and the CPU
paths that stand in for a GPU's: bfloat16 autocast and float16's loss scaler."""

import copy
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import GREEDY, cli, tiny_model, tiny_run

import generate
import sampling
import train
from config import RunOptions, TinyLLMError, TrainConfig
from machinery import checkpoint
from machinery import device as devices
from model import GPT
from optim import make_optimizer

CPU, MPS = torch.device("cpu"), torch.device("mps")


@pytest.fixture
def highest_precision():
    """float32 matmuls at torch's default, 'highest', during the test, and as they were after it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def same(a, b):
    """Nested dicts, lists and tensors equal, exactly."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def draws():
    return random.random(), np.random.rand(), torch.rand(3).tolist()


@pytest.mark.parametrize("capability, dtype", [((7, 5), "float16"), ((8, 0), "bfloat16"),
                                               ((9, 0), "bfloat16")])
def test_mocked_cuda_machine_chooses_its_precision(fake_machine, monkeypatch, highest_precision,
                                                   capability, dtype):
    fake_machine(cuda=True, mps=False, gpus=1)
    monkeypatch.setattr(devices, "gpu", lambda device=None: ("a GPU", capability))
    device = devices.choose_device("auto")
    assert device.type == "cuda" and torch.get_float32_matmul_precision() == "high"  # TF32 on a GPU
    assert devices.resolve_dtype("auto", device) == dtype
    # float16 with its scaler, refused where none works: torch's CUDA one needs CUDA, hidden here
    if dtype == "float16":
        with pytest.raises(TinyLLMError, match="scaler"):
            devices.make_scaler(device, dtype)
    else:
        assert devices.make_scaler(device, dtype) is None


@pytest.mark.parametrize("works", [True, False])
def test_mocked_mac_trains_in_the_precision_its_autocast_really_runs(fake_machine, monkeypatch,
                                                                     capsys, works):
    fake_machine(cuda=False, mps=True, gpus=0)
    monkeypatch.setattr(devices, "autocast_works", lambda device_type, dtype: works)
    assert devices.choose_device("auto") == MPS and devices.resolve_dtype("auto", MPS) == "float32"
    capsys.readouterr()
    assert devices.resolve_dtype("bfloat16", MPS) == ("bfloat16" if works else "float32")
    assert ("float32" in capsys.readouterr().err) == (not works)  # said, not silent


def test_mocked_mac_float16_needs_torch_2_8_and_its_adamw_is_not_fused(fake_machine):
    fake_machine(cuda=False, mps=True, gpus=0, torch=(2, 7))
    with pytest.raises(TinyLLMError, match="2.8"):
        devices.make_scaler(MPS, "float16")
    fake_machine(torch=(2, 8))
    assert devices.make_scaler(MPS, "float16").is_enabled()
    model = GPT(tiny_model())
    assert not make_optimizer(model, TrainConfig(), MPS).defaults["fused"]
    assert make_optimizer(model, TrainConfig(), CPU).defaults["fused"]


@pytest.mark.parametrize("speedup, dtype", [(3.0, "bfloat16"), (1.1, "float32")])
def test_dtype_auto_takes_bfloat16_only_where_it_measures_faster_by_the_margin_and_leaves_no_trace(
        monkeypatch, speedup, dtype):
    torch.manual_seed(0)
    model = GPT(tiny_model())
    optimizer = make_optimizer(model, TrainConfig(), CPU)
    x = torch.randint(0, 65, (4, 16))
    train.train_step(model, optimizer, lambda: (x, x), 1e-2, 1, 1.0,
                     devices.autocast(CPU, "float32"))
    clock = [0.0]  # the clock measure_dtype reads: the steps move it, no real seconds pass
    monkeypatch.setattr(devices, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def step(ctx):  # moves weights, optimizer and every generator; as slow as the test says
        random.random(), np.random.rand(), torch.rand(1)
        moments = [t for s in optimizer.state.values() for t in s.values()]
        with torch.no_grad():
            for t in [*model.parameters(), *moments]:
                t.add_(1)
        optimizer.param_groups[0]["lr"] = 5.0
        bfloat16 = getattr(ctx, "fast_dtype", None) == torch.bfloat16
        clock[0] += 0.01 / speedup if bfloat16 else 0.01
        return {"loss": torch.tensor(1.0)}

    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    rngs = devices.rng_state()
    expected = draws()
    devices.set_rng_state(rngs)
    assert devices.measure_dtype(step, model, optimizer, CPU)["dtype"] == dtype
    assert same(model.state_dict(), weights) and same(optimizer.state_dict(), state)
    assert draws() == expected


@pytest.mark.parametrize("bf16_cpu", [False, True])
def test_dtype_auto_measures_only_on_a_cpu_with_native_bfloat16(fake_machine, monkeypatch,
                                                                 text_file, tmp_path, bf16_cpu):
    fake_machine(bf16_cpu=bf16_cpu)
    choice = {"dtype": "bfloat16", "dtype_note": "bfloat16: measured faster"}

    def measure(*a):
        if not bf16_cpu:
            pytest.fail("measured")
        return choice
    monkeypatch.setattr(devices, "measure_dtype", measure)
    cfg = tiny_run(text_file, tmp_path, dtype="auto")
    run = train.set_up(tiny_model(), cfg, RunOptions(), "custom", {}, 0.0)
    expected = (choice, "bfloat16") if bf16_cpu else (None, "float32")
    assert (run.measured, run.dtype) == expected


@pytest.mark.slow  # it times steps
def test_a_resume_keeps_the_precision_dtype_auto_measured(fake_machine, monkeypatch, text_file,
                                                           tmp_path):
    fake_machine(bf16_cpu=True)
    calls, real = [], devices.measure_dtype

    def measure(*a):
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(devices, "measure_dtype", measure)
    cfg = tiny_run(text_file, tmp_path, dtype="auto", max_steps=4, eval_interval=2)
    first = train.train(tiny_model(), cfg)
    saved = checkpoint.load(str(tmp_path / "last.pt"))
    assert saved["measured"]["dtype"] == first["dtype"]
    other = "float32" if first["dtype"] == "bfloat16" else "bfloat16"  # as another machine chose
    saved["measured"] = {"dtype": other, "dtype_note": f"{other}: measured before"}
    checkpoint.save(str(tmp_path / "last.pt"), saved)
    resumed = train.train(tiny_model(), cfg, RunOptions(resume=True), given={"max_steps": 6})
    assert resumed["dtype"] == other and resumed["step"] == 6 and len(calls) == 1


def test_random_state_round_trips_through_a_file_and_more_gpus_than_here_restore_with_a_note(
        tmp_path, fake_machine, capsys):
    torch.save(devices.rng_state(), tmp_path / "rng.pt")
    expected = draws()
    # plain data and tensors only
    devices.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected
    assert capsys.readouterr().out == ""
    fake_machine(gpus=0, mps=False)  # a checkpoint of a 2-GPU run, resumed on this CPU
    saved = {**devices.rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    expected = draws()
    devices.set_rng_state(saved)
    assert draws() == expected  # the others are restored all the same
    assert "2 GPU" in capsys.readouterr().out


def cpu_float16_works():
    try:
        works = devices.autocast_works("cpu", "float16")
        return works and devices.make_scaler(CPU, "float16").is_enabled()
    except TinyLLMError:
        return False


needs_cpu_float16 = pytest.mark.skipif(
    not cpu_float16_works(), reason="this torch has no CPU GradScaler or float16 autocast")


@needs_cpu_float16
def test_float16s_scaler_skips_a_step_whose_gradient_overflowed():
    torch.manual_seed(0)
    model = GPT(tiny_model())
    optimizer = make_optimizer(model, TrainConfig(), CPU)
    scaler = devices.make_scaler(CPU, "float16")
    model.lm_head.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    before, scale = {k: v.clone() for k, v in model.state_dict().items()}, scaler.get_scale()
    x = torch.randint(0, 65, (4, 16))
    train.train_step(model, optimizer, lambda: (x, x), 1e-2, 1, 1.0,
                     devices.autocast(CPU, "float16"), scaler)
    assert same(model.state_dict(), before)  # skipped
    assert scaler.get_scale() < scale  # and the scale backed off


@needs_cpu_float16
def test_a_float16_run_checkpoints_its_loss_scale_and_a_resume_takes_it_back(text_file, tmp_path):
    cfg = tiny_run(text_file, tmp_path, dtype="float16", max_steps=4, eval_interval=2)
    train.train(tiny_model(), cfg)
    saved = checkpoint.load(str(tmp_path / "last.pt"))
    assert saved["scaler"]["scale"] > 0
    saved["scaler"]["scale"] = 1234.0
    checkpoint.save(str(tmp_path / "last.pt"), saved)
    run = train.set_up(tiny_model(), cfg, RunOptions(resume=True), "custom", {}, 0.0)
    assert run.dtype == "float16" and run.scaler.get_scale() == 1234.0


def test_a_bfloat16_cpu_run_trains_evaluates_and_generates_and_never_turns_tf32_on(
        text_file, tmp_path, capsys, highest_precision):
    cfg = tiny_run(text_file, tmp_path, dtype="bfloat16", max_steps=10, lr=1e-2, eval_interval=5,
                   sample_tokens=10)
    result = train.train(tiny_model(), cfg)
    evals = [row["val_loss"] for row in result["history"] if row["kind"] == "eval"]
    assert result["dtype"] == "bfloat16" and len(evals) == 3 and evals[-1] < evals[0] - 0.3
    assert "sample:" in capsys.readouterr().out
    model = result["model"].eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 3))
    with devices.autocast(CPU, "bfloat16"):
        cached = sampling.generate(model, prompt, 10, GREEDY, use_cache=True)
        assert torch.equal(cached, sampling.generate(model, prompt, 10, GREEDY, use_cache=False))
    assert torch.get_float32_matmul_precision() == "highest"


def test_generate_loads_on_the_cpu_and_moves_only_the_model(trained, monkeypatch, capsys):
    seen, load_model = {}, checkpoint.load_model

    def recording_load_model(path, device="cpu"):
        out = load_model(path, device)
        seen["model"], _, seen["saved"] = out
        return out
    # a device not the CPU
    monkeypatch.setattr(devices, "choose_device", lambda name="auto": torch.device("meta"))
    monkeypatch.setattr(checkpoint, "load_model", recording_load_model)
    monkeypatch.setattr(generate, "sample", lambda *a, **k: [("text", 4, False)])
    code, _, err = cli(capsys, generate.main, trained[0], "--max_new_tokens", 4)
    assert code == 0, err
    assert {p.device.type for p in seen["model"].parameters()} == {"meta"}
    assert "optimizer" not in seen["saved"]
    assert {t.device.type for t in seen["saved"]["model"].values()} == {"cpu"}
