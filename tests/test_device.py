"""machinery/devices.py: the device and precision decisions on machines this one stands in for
(fake_machine, and the project's own seams machinery.devices.gpu and autocast_works), and the CPU
paths that stand in for a GPU's: bfloat16 autocast and float16's loss scaler."""

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from conftest import (
    GREEDY,
    cli,
    generated,
    same_state,
    through_the_model,
    tiny_model,
    tiny_run,
    train_run,
)

import generate
import train
from config import RunOptions, TinyLLMError, TrainConfig
from machinery import checkpoint, devices
from model import GPT

CPU, MPS = torch.device("cpu"), torch.device("mps")


@pytest.fixture
def highest_precision():
    """float32 matmuls at torch's default, 'highest', during the test, and as they were after it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def draws():
    return random.random(), np.random.rand(), torch.rand(3).tolist()


@pytest.mark.parametrize(
    "capability, dtype", [((7, 5), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")]
)
def test_mocked_cuda_machine_chooses_its_precision(
    fake_machine, monkeypatch, highest_precision, capability, dtype
):
    fake_machine(cuda=True, mps=False, gpus=1)
    monkeypatch.setattr(devices, "gpu", lambda device=None: ("a GPU", capability))
    device = devices.choose_device("auto")
    assert device.type == "cuda" and torch.get_float32_matmul_precision() == "high"  # TF32 on a GPU
    assert devices.resolve_dtype("auto", device)[0] == dtype
    # float16 with its scaler, refused where none works: torch's CUDA one needs CUDA, hidden here
    if dtype == "float16":
        with pytest.raises(TinyLLMError, match="scaler"):
            devices.make_scaler(device, dtype)
    else:
        assert not devices.make_scaler(device, dtype).is_enabled()


@pytest.mark.parametrize("works", [True, False])
def test_mocked_mac_trains_in_the_precision_its_autocast_really_runs(
    fake_machine, monkeypatch, capsys, works
):
    fake_machine(cuda=False, mps=True, gpus=0)
    monkeypatch.setattr(devices, "autocast_works", lambda device_type, dtype: works)
    assert devices.choose_device("auto") == MPS
    assert devices.resolve_dtype("auto", MPS)[0] == "float32"
    capsys.readouterr()
    assert devices.resolve_dtype("bfloat16", MPS)[0] == ("bfloat16" if works else "float32")
    assert ("float32" in capsys.readouterr().err) == (not works)  # said, not silent


def test_mocked_mac_float16_needs_torch_2_8_and_its_adamw_is_not_fused(fake_machine):
    fake_machine(cuda=False, mps=True, gpus=0, torch=(2, 7))
    with pytest.raises(TinyLLMError, match="2.8"):
        devices.make_scaler(MPS, "float16")
    fake_machine(torch=(2, 8))
    assert devices.make_scaler(MPS, "float16").is_enabled()
    model = GPT(tiny_model())
    assert not train.make_optimizer(model, TrainConfig(), MPS).defaults["fused"]
    assert train.make_optimizer(model, TrainConfig(), CPU).defaults["fused"]


# each kind of CPU, and the precision --dtype auto takes there: bfloat16 where it measured faster
CPUS = {
    "Intel with AMX": (dict(vendor="Intel", amx=True, avx512_bf16=True), "bfloat16"),
    "AMD Zen 4 or 5": (dict(vendor="AMD", amx=False, avx512_bf16=True), "bfloat16"),
    "Intel with AVX512-BF16 alone": (dict(vendor="Intel", amx=False, avx512_bf16=True), "float32"),
    "no bfloat16": (dict(vendor="AMD", amx=False, avx512_bf16=False), "float32"),
}


@pytest.mark.parametrize("kind", CPUS)
def test_mocked_cpu_takes_the_precision_measured_on_its_kind_and_the_header_says_which(
    fake_machine, text_file, tmp_path, capsys, monkeypatch, kind
):
    facts, dtype = CPUS[kind]
    fake_machine(cuda=False, mps=False, **facts)
    cfg = tiny_run(text_file, tmp_path, dtype="auto", max_steps=1, eval_interval=1)
    train_run(tiny_model(), cfg)
    header = capsys.readouterr().out.splitlines()[0]
    saved = checkpoint.load(str(tmp_path / "last.pt"))
    assert saved["dtype"] == dtype and f"({dtype}: {devices.auto_dtype(CPU)[1]}, " in header
    fake_machine(vendor="")  # a CPU whose maker is unknown takes bfloat16 only with AMX
    assert devices.auto_dtype(CPU)[0] == ("bfloat16" if facts["amx"] else "float32")


def test_bfloat16_asked_of_a_cpu_without_it_is_a_warning_not_a_failure(fake_machine, capsys):
    fake_machine(cuda=False, mps=False, **CPUS["no bfloat16"][0])
    assert devices.resolve_dtype("bfloat16", CPU)[0] == "bfloat16"  # emulated: slow, it runs
    assert "no native bfloat16" in capsys.readouterr().err


def test_the_set_up_times_nothing_so_a_busy_machine_trains_the_same_run(
    text_file, tmp_path, monkeypatch, capsys
):
    """No step before the loop: the precision and the model come from what the machine is. The
    first step the model takes is the loop's, after its baseline evaluation."""

    class FirstStep(Exception):
        pass

    def first_step(n, model):
        raise FirstStep

    through_the_model(monkeypatch, step=first_step)
    cfg = tiny_run(text_file, tmp_path, dtype="auto", time_budget="5m", sample_tokens=10)
    with pytest.raises(FirstStep):
        train_run(tiny_model(), cfg)
    assert capsys.readouterr().out.splitlines()[-1].startswith("eval      0/?")


def test_random_state_round_trips_through_a_file_and_more_gpus_than_here_restore_with_a_note(
    tmp_path, fake_machine, capsys
):
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
    not cpu_float16_works(), reason="this torch has no CPU GradScaler or float16 autocast"
)


@needs_cpu_float16
def test_float16s_scaler_skips_a_step_whose_gradient_overflowed():
    torch.manual_seed(0)
    model = GPT(tiny_model())
    optimizer = train.make_optimizer(model, TrainConfig(), CPU)
    process = devices.Process(0, 1, CPU, "float16")
    scaler = process.scaler
    model.lm_head.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    before, scale = {k: v.clone() for k, v in model.state_dict().items()}, scaler.get_scale()
    x = torch.randint(0, 65, (4, 16))
    step = (lambda: (x, x), 1e-2, TrainConfig(grad_clip=1.0), process)
    train.train_step(model, optimizer, *step)
    assert same_state(model.state_dict(), before)  # skipped
    assert scaler.get_scale() < scale  # and the scale backed off


@needs_cpu_float16
def test_a_float16_run_skips_a_step_whose_gradient_overflowed_and_trains_on(
    text_file, tmp_path, monkeypatch
):
    hooks = []

    def overflowing(n, model):  # step 3's gradient overflows
        if n == 3:
            inf = model.lm_head.weight.register_hook(lambda g: torch.full_like(g, math.inf))
            hooks.append(inf)
        elif hooks:
            hooks.pop().remove()

    through_the_model(monkeypatch, step=overflowing)
    cfg = tiny_run(text_file, tmp_path, dtype="float16", max_steps=6, log_interval=1)
    summary = train_run(tiny_model(), cfg)  # no error: the scaler skipped the step
    norms = [row["grad_norm"] for row in summary["history"] if row["kind"] == "train"]
    assert summary["step"] == 6 and math.isinf(norms[2])
    assert all(math.isfinite(n) for n in norms[:2] + norms[3:])


@needs_cpu_float16
def test_a_float16_run_checkpoints_its_loss_scale_and_a_resume_takes_it_back(
    text_file, tmp_path, monkeypatch
):
    cfg = tiny_run(text_file, tmp_path, dtype="float16", max_steps=4, eval_interval=2)
    train_run(tiny_model(), cfg)
    saved = checkpoint.load(str(tmp_path / "last.pt"))
    assert saved["scaler"]["scale"] > 0
    saved["scaler"]["scale"] = 1234.0
    checkpoint.save(str(tmp_path / "last.pt"), saved)
    more = dataclasses.replace(cfg, max_steps=6)  # no overflow: the scale stays as it was
    train_run(tiny_model(), more, RunOptions(resume=True), dict(max_steps=6))
    resumed = checkpoint.load(str(tmp_path / "last.pt"))
    assert resumed["dtype"] == "float16" and resumed["scaler"]["scale"] == 1234.0


def test_a_bfloat16_cpu_run_trains_evaluates_and_generates_and_never_turns_tf32_on(
    text_file, tmp_path, capsys, highest_precision
):
    cfg = tiny_run(
        text_file,
        tmp_path,
        dtype="bfloat16",
        max_steps=10,
        lr=1e-2,
        eval_interval=5,
        sample_tokens=10,
    )
    result = train_run(tiny_model(), cfg)
    evals = [row["val_loss"] for row in result["history"] if row["kind"] == "eval"]
    assert result["dtype"] == "bfloat16" and len(evals) == 3 and evals[-1] < evals[0] - 0.3
    assert "sample:" in capsys.readouterr().out
    model = result["model"].eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 3))
    with devices.autocast(CPU, "bfloat16"):
        cached = generated(model, prompt, 10, GREEDY, use_cache=True)
        assert torch.equal(cached, generated(model, prompt, 10, GREEDY, use_cache=False))
    assert torch.get_float32_matmul_precision() == "highest"


def test_generate_loads_on_the_cpu_and_moves_only_the_model(trained, monkeypatch, capsys):
    seen, load_model = {}, checkpoint.load_model

    def recording_load_model(path, device="cpu"):
        out = load_model(path, device)
        seen["model"], seen["saved"] = out.model, out.checkpoint
        return out

    # a device not the CPU
    monkeypatch.setattr(devices, "choose_device", lambda name="auto": torch.device("meta"))
    monkeypatch.setattr(checkpoint, "load_model", recording_load_model)
    monkeypatch.setattr(generate, "sample", lambda *a, **k: torch.zeros(1, 4, dtype=torch.long))
    code, _, err = cli(capsys, generate.main, trained[0], "--max_new_tokens", 4)
    assert code == 0, err
    assert {p.device.type for p in seen["model"].parameters()} == {"meta"}
    assert "optimizer" not in seen["saved"]
    assert {t.device.type for t in seen["saved"]["model"].values()} == {"cpu"}
