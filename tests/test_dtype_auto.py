"""--dtype auto on a CPU with native bfloat16 (machinery/device.py): the decision is tested with
mocked timings, and the trial steps that measure it leave nothing behind."""

import functools

import pytest
import torch

from conftest import tiny_model_config, tiny_train_config
import train

from machinery import device


def fake_step_times(monkeypatch, fake_machine, float32, bfloat16, native=True):
    """Pretend the CPU has native bfloat16 and that a step took these seconds in each precision."""
    fake_machine(avx512_bf16=native, amx=native)
    measured = []

    def timed(step, model, optimizer, device, dtypes):
        measured.append(list(dtypes))
        return {"float32": float32, "bfloat16": bfloat16}

    monkeypatch.setattr(device, "time_steps", timed)
    return measured


@pytest.mark.parametrize("float32, bfloat16, chosen, words", [
    (0.30, 0.20, "bfloat16", "bfloat16: 1.50x float32 here"),
    (0.30, 0.26, "float32", "float32: bfloat16 was 1.15x here"),    # faster, but not by the margin
    (0.30, 0.37, "float32", "float32: bfloat16 was 0.81x here"),    # AVX512-BF16 without AMX, measured
])
def test_mocked_cpu_timings_decide_auto_precision(shakespeare_head, tmp_path, monkeypatch, fake_machine, capsys,
                                                  float32, bfloat16, chosen, words):
    measured = fake_step_times(monkeypatch, fake_machine, float32, bfloat16)
    cfg = tiny_train_config(shakespeare_head, tmp_path, dtype="auto", max_steps=2, eval_interval=2)
    run = train.setup_run(tiny_model_config(), cfg)
    assert measured == [["float32", "bfloat16"]] and run.dtype == chosen
    assert words in capsys.readouterr().out
    assert run.state.plan["dtype"] == chosen  # saved with every checkpoint, so a resume keeps it


def test_mocked_cpu_without_native_bfloat16_or_with_a_given_dtype_measures_nothing(
        shakespeare_head, tmp_path, monkeypatch, fake_machine):
    measured = fake_step_times(monkeypatch, fake_machine, 0.3, 0.1, native=False)
    run = train.setup_run(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path / "a", dtype="auto"))
    assert run.dtype == "float32"
    fake_step_times(monkeypatch, fake_machine, 0.3, 0.1, native=True)
    run = train.setup_run(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path / "b", dtype="float32"))
    assert run.dtype == "float32" and measured == [] and run.state.plan is None


def test_the_trial_steps_leave_weights_optimizer_and_random_numbers_as_they_were(shakespeare_head, tmp_path):
    run = train.setup_run(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path, dtype="float32"))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    rng = torch.get_rng_state()
    step = functools.partial(train.train_step, run.train_model, run.optimizer, run.next_batch, run.cfg.lr, 1, 1.0)
    seconds = device.time_steps(step, run.model, run.optimizer, run.device, ["float32"])
    assert seconds["float32"] > 0
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and not run.optimizer.state
    assert all(p.grad is None for p in run.model.parameters())
