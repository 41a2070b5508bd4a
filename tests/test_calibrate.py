"""Decisions measured on the user's machine (calibrate.py): --dtype auto on a CPU with native
bfloat16, and --time_budget. The decisions are tested with mocked timings. Tiny budgeted runs
on a clock that only their steps move (steps_take) check the plan, the same on any machine: it
ends in time, follows a pace that changes, resumes without measuring again, and the printed
flags repeat it step for step; one run on the real clock checks that it ends in time."""

import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from config import TinyLLMError, TrainConfig
from conftest import (ROOT, TINY_SHAPE, assert_one_line_error, cli, interrupt_at, subprocess_env, tiny_model_config,
                      tiny_train_config)
import train

import machinery
from machinery import calibrate, precision
from machinery.checkpoint import load_checkpoint
from machinery.calibrate import cosine_position
from optim import get_lr as scheduled_lr

QUICK = ["--eval_iters", "2", "--plots", "false", "--eval_interval", "40", "--warmup_steps", "10"]


def fake_step_times(monkeypatch, float32, bfloat16, native=True):
    """Pretend the CPU has native bfloat16 and that a step took these seconds in each precision."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    measured = []

    def timed(run, train_step, dtypes):
        measured.append(list(dtypes))
        return {"float32": float32, "bfloat16": bfloat16}

    monkeypatch.setattr(calibrate, "time_steps", timed)
    return measured


@pytest.mark.parametrize("float32, bfloat16, chosen, words", [
    (0.30, 0.20, "bfloat16", "bfloat16: 1.50x float32 here"),
    (0.30, 0.26, "float32", "float32: bfloat16 was 1.15x here"),    # faster, but not by the margin
    (0.30, 0.37, "float32", "float32: bfloat16 was 0.81x here"),    # AVX512-BF16 without AMX, measured
])
def test_mocked_cpu_timings_decide_auto_precision(shakespeare_head, tmp_path, monkeypatch, capsys,
                                                  float32, bfloat16, chosen, words):
    measured = fake_step_times(monkeypatch, float32, bfloat16)
    cfg = tiny_train_config(shakespeare_head, tmp_path, dtype="auto", max_steps=2, eval_interval=2)
    run = train.setup_run(tiny_model_config(), cfg)
    assert measured == [["float32", "bfloat16"]] and run.dtype == chosen
    assert words in capsys.readouterr().out
    assert run.state.plan["dtype"] == chosen  # saved with every checkpoint, so a resume keeps it


def test_mocked_cpu_without_native_bfloat16_or_with_a_given_dtype_measures_nothing(shakespeare_head, tmp_path, monkeypatch):
    measured = fake_step_times(monkeypatch, 0.3, 0.1, native=False)
    run = train.setup_run(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path / "a", dtype="auto"))
    assert run.dtype == "float32"
    fake_step_times(monkeypatch, 0.3, 0.1, native=True)
    run = train.setup_run(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path / "b", dtype="float32"))
    assert run.dtype == "float32" and measured == [] and run.state.plan is None


def test_the_trial_steps_leave_weights_optimizer_and_random_numbers_as_they_were(shakespeare_head, tmp_path):
    run = train.setup_run(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path, dtype="float32"))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = calibrate.time_steps(run, train.train_step, ["float32"])
    assert seconds["float32"] > 0
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and not run.optimizer.state
    assert all(p.grad is None for p in run.model.parameters())


def test_mocked_timings_plan_the_most_steps_that_fit():
    cfg = tiny_train_config("x.txt", "out", time_budget="100s", eval_interval=100, warmup_steps=50)

    def seconds(n):  # the run as planned, at step 50 and 10 s in: steps of 0.107 s, an evaluation of 1 s
        return 10 + (n - 50) * 0.107 + (n // 100 + (n % 100 > 0)) * 1.0 + 2.0  # every 100 and at the end; sample

    plan = calibrate.plan_budget(cfg, done=50, spent=10.0, step_seconds=0.107, eval_seconds=1.0, sample_seconds=2.0)
    steps, usable = plan["max_steps"], 100 * (1 - calibrate.SAFETY)
    assert seconds(steps) <= usable < seconds(steps + 1) and 650 < steps < 850
    assert plan["expected_seconds"] == pytest.approx(seconds(steps)) and plan["planned_at"] == 50
    with pytest.raises(TinyLLMError, match="too short"):  # no room for the last evaluation
        calibrate.plan_budget(cfg, done=50, spent=10.0, step_seconds=0.1, eval_seconds=95.0, sample_seconds=2.0)


@pytest.mark.parametrize("value", ["0", "-5m", "abc", "5x", "0s"])
def test_nonsense_budgets_are_one_line_errors(value, tmp_path, capsys):
    code, _, err = cli(capsys, train.main, f"--time_budget={value}", "--out_dir", tmp_path / "run")
    assert_one_line_error(code, err, "time_budget", value)
    assert code == 2


def test_a_budget_with_max_steps_is_refused_and_max_steps_alone_turns_the_presets_budget_off(tmp_path, capsys):
    code, _, err = cli(capsys, train.main, "--time_budget", "5m", "--max_steps", "10", "--out_dir", tmp_path)
    assert_one_line_error(code, err, "--time_budget or --max_steps")
    from config import build_configs
    assert build_configs({}, "tiny")[1].time_budget == "5m"            # the default run on a CPU
    assert build_configs({"max_steps": 10}, "tiny")[1].time_budget == ""


def test_a_budget_too_short_for_one_evaluation_is_one_line(shakespeare_head, tmp_path, capsys):
    code, _, err = cli(capsys, train.main, *TINY_SHAPE, *QUICK, "--data", shakespeare_head, "--time_budget",
                       "0.001s", "--out_dir", tmp_path)
    assert_one_line_error(code, err, "too short")



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="runs python through sh's exec")
def test_the_budget_counts_from_the_scripts_first_line_not_from_the_shell_that_ran_before_it():
    """sh -c 'pip install ... && python train.py' (Colab's !, a script) may exec python in the process
    the shell started before pip ran: what ran before python is not the run's time. The child
    prints the seconds python train.py's budget has counted when the run begins."""
    child = ("import sys, time; sys.argv[0] = 'train.py'; from machinery import lifecycle; "
             "print(time.perf_counter() - lifecycle.process_start(), time.time())")
    launched = time.time()
    done = subprocess.run(["sh", "-c", 'sleep 1 && exec "$0" -c "$1"', sys.executable, child], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, check=True)
    counted, now = map(float, done.stdout.split())
    assert 0.0 < counted < now - launched - 0.75  # importing torch is counted, the shell's 1 s sleep is not

def repeat_flags(out):
    """The flags the run printed to repeat it step for step."""
    line = next(l for l in out.splitlines() if "step for step" in l)
    return shlex.split(line.split("python train.py ", 1)[1])


def steps_take(monkeypatch, seconds_of_step):
    """The time budget's clock (machinery.clock) stands still but for the training steps: the
    n-th step of the test moves it on by seconds_of_step(n). What a budgeted run measures and
    plans is then the same on any machine, however busy it is. Returns the clock's reading."""
    now = {"seconds": 0.0, "steps": 0}
    monkeypatch.setattr(machinery, "clock", lambda: now["seconds"])
    real = train.train_step

    def a_step_that_takes_its_time(*args, **kwargs):
        now["seconds"] += seconds_of_step(now["steps"])
        now["steps"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", a_step_that_takes_its_time)
    return lambda: now["seconds"]


def test_a_budget_plans_from_the_evaluation_it_timed(shakespeare_head, tmp_path, capsys, monkeypatch):
    """On the budget's clock a step takes 10 ms and an evaluation 300 ms: the plan counts that
    evaluation as it was timed in the loop, and never times another one of its own."""
    now = {"seconds": 0.0}
    monkeypatch.setattr(machinery, "clock", lambda: now["seconds"])
    for name, seconds in (("train_step", 0.01), ("estimate_loss", 0.3)):
        def taking(*args, _real=getattr(train, name), _seconds=seconds, **kwargs):
            now["seconds"] += _seconds
            return _real(*args, **kwargs)
        monkeypatch.setattr(train, name, taking)
    monkeypatch.setattr(calibrate, "time_evaluation", lambda run: pytest.fail("an evaluation timed twice"))
    code, _, err = cli(capsys, train.main, *TINY_SHAPE, *QUICK, "--data", shakespeare_head, "--sample_tokens", "0",
                       "--log_interval", "10", "--time_budget", "3s", "--out_dir", tmp_path / "run")
    assert code == 0, err
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["plan"]["eval_seconds"] == pytest.approx(0.3)


def test_a_budgeted_run_ends_on_the_real_clock_in_time(shakespeare_head, tmp_path, capsys):
    budget = 2.0
    t0 = time.perf_counter()
    code, out, err = cli(capsys, train.main, *TINY_SHAPE, *QUICK, "--data", shakespeare_head, "--sample_tokens", "20",
                         "--log_interval", "10", "--time_budget", f"{budget}s", "--out_dir", tmp_path)
    took = time.perf_counter() - t0
    assert code == 0 and "steps planned" in out, err
    assert took < budget + 2.5  # the run re-plans at every progress line; the margin is for a busy machine


def test_a_budgeted_run_ends_in_time_resumes_its_plan_and_repeats_with_the_printed_flags(
        shakespeare_head, tmp_path, capsys, monkeypatch):
    flags = [*TINY_SHAPE, *QUICK, "--data", shakespeare_head, "--sample_tokens", "20", "--log_interval", "10"]
    clock = steps_take(monkeypatch, lambda n: 0.02 if n < 25 else 0.025)  # slower from step 25: it re-plans
    with monkeypatch.context() as m:  # stopped in the middle, as by Ctrl-C or a Colab runtime that disconnects
        interrupt_at(m, 32, signal.SIGTERM)  # after the plan, made at step 10 (the end of the warmup), and re-plans
        code, out, err = cli(capsys, train.main, *flags, "--time_budget", "3s", "--out_dir", tmp_path / "budget")
    assert code == 143, err
    plan = load_checkpoint(str(tmp_path / "budget" / "last.pt"))["plan"]
    monkeypatch.setattr(calibrate, "time_steps", lambda *a: pytest.fail("measured again"))
    code, resumed, err = cli(capsys, train.main, "--resume", "--out_dir", tmp_path / "budget")
    assert code == 0 and "continuing the planned" in resumed, err
    last = load_checkpoint(str(tmp_path / "budget" / "last.pt"))
    first_plan = {k: v for k, v in plan.items() if k not in ("replans", "expected_seconds")}
    assert {k: last["plan"][k] for k in first_plan} == first_plan  # the resumed run kept its plan...
    assert last["plan"]["replans"][:len(plan["replans"])] == plan["replans"]  # ...and went on re-planning it
    assert last["step"] == last["train_config"]["max_steps"] > 32
    assert 0.9 * 3 < clock() <= 3  # the steps filled the budget, less what it keeps for the exit
    assert last["lr"] == pytest.approx(last["train_config"]["min_lr"], rel=0.05)  # the cosine ran to its end

    # the flags printed at the end repeat the run step for step, re-plans included, without measuring anything
    repeat = [*repeat_flags(resumed), "--out_dir", str(tmp_path / "repeat")]
    code, again, err = cli(capsys, train.main, *repeat)
    assert code == 0, err
    other = load_checkpoint(str(tmp_path / "repeat" / "last.pt"))
    assert all(torch.equal(last["model"][k], other["model"][k]) for k in last["model"])
    assert resumed.split("sample:")[1].split("time budget")[0] == again.split("sample:")[1]


@pytest.mark.parametrize("drift", ["slows", "speeds_up"])
def test_a_budget_follows_a_machine_whose_pace_changes(shakespeare_head, tmp_path, capsys, monkeypatch, drift):
    """Steps made slower (or faster) from step 30 on the budget's clock, after the plan made at step 10:
    the run re-plans, still ends in its budget, and its LR never jumps: a re-plan leaves the LR
    of its step as the plan before it had it, no step changes the LR by more than the steepest
    step of a plan it ran under, and the LR still decays to min_lr at the end."""
    budget, lrs = 3.0, []
    slow = {"slows": lambda step: step >= 30, "speeds_up": lambda step: step < 30}[drift]
    clock = steps_take(monkeypatch, lambda n: 0.02 if slow(n) else 0.01)
    timed = train.train_step

    def step_noting_its_lr(model, optimizer, next_batch, lr, *args, **kwargs):
        lrs.append(lr)
        return timed(model, optimizer, next_batch, lr, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", step_noting_its_lr)
    code, out, err = cli(capsys, train.main, *TINY_SHAPE, *QUICK, "--data", shakespeare_head, "--sample_tokens", "0",
                         "--log_interval", "10", "--time_budget", f"{budget}s", "--out_dir", tmp_path / "run")
    took = clock()
    assert code == 0, err
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    plan, cfg = last["plan"], TrainConfig(**last["train_config"])
    assert plan["planned_at"] == 10 and plan["replans"] and last["step"] == cfg.max_steps == len(lrs)
    assert (cfg.max_steps < plan["max_steps"]) == (drift == "slows")  # the end moved the way the pace did
    assert 0.9 * budget < took <= budget

    def schedule(end, decay_from, start):  # the LRs a plan gives from step start to its end
        return [scheduled_lr(s, cfg.lr, cfg.min_lr, cfg.warmup_steps, end, decay_from) for s in range(start, end + 1)]

    end, decay_from = plan["max_steps"], None
    first = schedule(end, None, cfg.warmup_steps)
    steepest = max(a - b for a, b in zip(first, first[1:]))
    for step, new_end in plan["replans"]:
        before = scheduled_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, end, decay_from)
        assert lrs[step] == pytest.approx(before, rel=1e-9)  # the step a re-plan comes before keeps its LR
        end, decay_from = new_end, [step, *cosine_position(step, cfg.lr, cfg.warmup_steps, end, decay_from)]
        after = schedule(end, decay_from, step)
        steepest = max([steepest, *(a - b for a, b in zip(after, after[1:]))])
    changes = [a - b for a, b in zip(lrs[cfg.warmup_steps:], lrs[cfg.warmup_steps + 1:])]
    assert min(changes) >= 0 and max(changes) <= steepest * (1 + 1e-9)
    assert lrs[-1] <= cfg.min_lr + 0.1 * (cfg.lr - cfg.min_lr)
