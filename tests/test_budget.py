"""--time_budget (budget.py): the run's progress, which the LR schedule is a function of, is the
share of the time after the warmup that is spent, less what the end needs. Tiny budgeted runs on a clock
that only their own steps and evaluations move (budget.now, replaced where it is read) check the
same on any machine: the run ends in time with its progress at the end, follows a pace that
changes without a jump, resumes where it was, and runs whatever schedule optim.get_lr holds
(the tests watch progress, not the LR, so they hold for any schedule); one run on the real
clock checks that it ends in time."""

import signal
import subprocess
import sys
import time

import pytest

from config import TinyLLMError, TrainConfig, parse_duration
from conftest import ROOT, SCHEDULES, TINY_SHAPE, assert_one_line_error, cli, interrupt_at, subprocess_env
import train
import optim

from machinery import budget
from machinery.checkpoint import load_checkpoint, save_checkpoint

QUICK = ["--eval_iters", "2", "--plots", "false", "--eval_interval", "40", "--warmup_steps", "10"]


def on_a_clock_of_steps(monkeypatch, seconds_of_step, eval_seconds=0.1):
    """The budget's clock stands still but for the run's steps and evaluations: the n-th step
    moves it on by seconds_of_step(n), an evaluation by eval_seconds (a run called in-process starts
    when train() is called: on this clock). Returns the clock's reading and the progress of every
    step, as the loop handed it to get_lr (whatever schedule get_lr holds)."""
    now, progress = {"seconds": 0.0, "steps": 0}, []
    monkeypatch.setattr(budget, "now", lambda: now["seconds"])
    step, evaluate, schedule = train.train_step, train.estimate_loss, train.get_lr

    def a_step_that_takes_its_time(*args, **kwargs):
        now["seconds"] += seconds_of_step(now["steps"])
        now["steps"] += 1
        assert now["seconds"] < 10, "the run went on past its budget"
        return step(*args, **kwargs)

    def an_evaluation_that_takes_its_time(*args, **kwargs):
        now["seconds"] += eval_seconds
        return evaluate(*args, **kwargs)

    def noted(step, p, cfg):
        progress.append(p)
        return schedule(step, p, cfg)
    monkeypatch.setattr(train, "train_step", a_step_that_takes_its_time)
    monkeypatch.setattr(train, "estimate_loss", an_evaluation_that_takes_its_time)
    monkeypatch.setattr(train, "get_lr", noted)
    return (lambda: now["seconds"]), progress


def budget_run(capsys, data, out_dir, budget_seconds=3.0, *extra):
    return cli(capsys, train.main, *TINY_SHAPE, *QUICK, "--data", data, "--sample_tokens", "0", "--log_interval", "10",
               "--time_budget", f"{budget_seconds}s", "--out_dir", out_dir, *extra)


def assert_progress_rises_to_the_end(progress, warmup_steps, eval_interval=40):
    """After the warmup, progress never falls and moves by at most three times a steady run's step,
    but across an evaluation (its time is the run's time too); the last step is within three such
    steps of the end, as the last step of a run of --max_steps is one step before it."""
    steady = 1 / (len(progress) - warmup_steps)
    for step in range(warmup_steps + 1, len(progress)):
        moved = progress[step] - progress[step - 1]
        assert 0 <= moved and (moved <= 3 * steady or step % eval_interval == 0), (step, moved, steady)
    assert 1 - 3 * steady <= progress[-1] <= 1


@pytest.mark.parametrize("drift", ["steady", "slows", "speeds_up"])
def test_a_budget_ends_in_time_at_the_end_of_its_schedule_whatever_the_pace(shakespeare_head, tmp_path, capsys,
                                                                            monkeypatch, drift):
    """Steps of 10 ms (20 ms from step 30 when it slows, until then when it speeds up) and
    evaluations of 100 ms on the budget's clock: the run fills its budget less what it keeps for
    the exit, and its progress rises to the end without a jump, so the schedule runs its course."""
    slow = {"steady": lambda n: False, "slows": lambda n: n >= 30, "speeds_up": lambda n: n < 30}[drift]
    clock, progress = on_a_clock_of_steps(monkeypatch, lambda n: 0.02 if slow(n) else 0.01)
    code, out, err = budget_run(capsys, shakespeare_head, tmp_path / "run")
    assert code == 0, err
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert 0.9 * 3 < clock() <= 3 * (1 - budget.SAFETY / 2) and last["step"] == len(progress)
    assert_progress_rises_to_the_end(progress, TrainConfig(**last["train_config"]).warmup_steps)


def test_a_budget_reads_the_processes_clocks_once_a_step(shakespeare_head, tmp_path, capsys, monkeypatch):
    """Under torchrun a reading is every process's mean, which waits for all of them (and for a GPU): once a step,
    twice an evaluation (its seconds, and the clock after it), and at the start (the sample's seconds, the clock)."""
    _, progress = on_a_clock_of_steps(monkeypatch, lambda n: 0.01)
    reads = []
    monkeypatch.setattr(budget, "all_ranks_mean", lambda values, world, device: reads.append(values) or values)
    code, out, err = budget_run(capsys, shakespeare_head, tmp_path / "run")
    assert code == 0, err
    evaluations = out.count("\neval ")
    assert len(progress) > 100 and len(reads) <= 3 + len(progress) + 2 * evaluations


def test_a_budget_runs_whatever_schedule_get_lr_holds(shakespeare_head, tmp_path, capsys, monkeypatch):
    """A learner's schedule (here: warmup, then hold lr until 80% of the progress, then straight
    down to min_lr) is a new get_lr; the time budget drives it as it drives the cosine."""
    def warmup_stable_decay(step, progress, cfg):
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return cfg.lr if progress < 0.8 else cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, (progress - 0.8) / 0.2)
    monkeypatch.setattr(train, "get_lr", warmup_stable_decay)
    lrs, step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda m, o, b, lr, *a, **k: lrs.append(lr) or step(m, o, b, lr, *a, **k))
    clock, _ = on_a_clock_of_steps(monkeypatch, lambda n: 0.01)
    code, _, err = budget_run(capsys, shakespeare_head, tmp_path / "run")
    assert code == 0, err
    cfg = TrainConfig(**load_checkpoint(str(tmp_path / "run" / "last.pt"))["train_config"])
    held = [lr for lr in lrs[cfg.warmup_steps:] if lr == cfg.lr]
    assert 0.6 * len(lrs) < len(held) < 0.85 * len(lrs)  # the stable part: about 80% of the steps after the warmup
    assert lrs[-1] <= cfg.min_lr + 0.05 * (cfg.lr - cfg.min_lr) and clock() <= 3  # down at the end, in time


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_config_offers_takes_its_last_budgeted_step_at_the_floor(shakespeare_head, tmp_path, capsys,
                                                                                monkeypatch, schedule):
    lrs, step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda m, o, b, lr, *a, **k: lrs.append(lr) or step(m, o, b, lr, *a, **k))
    clock, _ = on_a_clock_of_steps(monkeypatch, lambda n: 0.0137)  # the budget's end falls inside a step
    code, out, err = budget_run(capsys, shakespeare_head, tmp_path / "run", 3.0, "--lr_schedule", schedule)
    cfg = TrainConfig(**load_checkpoint(str(tmp_path / "run" / "last.pt"))["train_config"])
    assert code == 0 and cfg.lr_schedule == schedule, err
    assert lrs[-1] == cfg.min_lr and clock() <= 3 and f"the last at LR {cfg.min_lr:.4g}" in out


def test_a_budgets_last_step_is_at_the_floor_when_the_steps_jitter(shakespeare_head, tmp_path, capsys, monkeypatch):
    """Steps of uneven length (every third half as long again as the others, as on a busy machine): wherever the
    budget's end falls among them, the last step taken is at the floor, not a step short of it."""
    missed, step = [], train.train_step
    for k in range(6):  # budgets a fraction of a step apart: the end falls in a different place among the steps
        with monkeypatch.context() as m:  # each run on a clock of its own
            lrs = []
            m.setattr(train, "train_step", lambda gpt, o, b, lr, *a, **k: lrs.append(lr) or step(gpt, o, b, lr, *a, **k))
            on_a_clock_of_steps(m, lambda n: 0.015 if n % 3 == 2 else 0.01)
            code, out, err = budget_run(capsys, shakespeare_head, tmp_path / f"run{k}", 1.5 + 0.0017 * k)
        assert code == 0, err
        cfg = TrainConfig(**load_checkpoint(str(tmp_path / f"run{k}" / "last.pt"))["train_config"])
        missed += [(k, lrs[-1])] if lrs[-1] != cfg.min_lr else []
    assert not missed, f"budgets whose last step was above the floor {cfg.min_lr}: {missed}"


def test_a_budgeted_run_resumes_where_it_was_and_still_ends_in_time(shakespeare_head, tmp_path, capsys, monkeypatch):
    clock, progress = on_a_clock_of_steps(monkeypatch, lambda n: 0.02 if n < 25 else 0.025)
    with monkeypatch.context() as m:  # stopped in the middle, as by Ctrl-C or a Colab runtime that disconnects
        interrupt_at(m, 32, signal.SIGTERM)
        code, out, err = budget_run(capsys, shakespeare_head, tmp_path / "budget")
    assert code == 143, err
    stopped = load_checkpoint(str(tmp_path / "budget" / "last.pt"))
    assert stopped["step"] == 32 and stopped["progress"] == progress[-1] > 0  # the last step's, saved
    code, resumed, err = cli(capsys, train.main, "--resume", "--out_dir", tmp_path / "budget")
    assert code == 0 and "continuing" in resumed, err
    last = load_checkpoint(str(tmp_path / "budget" / "last.pt"))
    cfg = TrainConfig(**last["train_config"])
    assert last["step"] > 32 and 0.9 * 3 < clock() <= 3  # the two processes together filled the budget
    assert_progress_rises_to_the_end(progress, cfg.warmup_steps)  # on from where it was to the end, no jump


def test_a_budgeted_run_counts_each_process_set_up_on_one_clock_so_a_resume_never_steps_back(
        shakespeare_head, tmp_path, capsys, monkeypatch):
    """A budget counts each process from its start, its set-up included (0.5 s on the budget's clock for the
    first process here, a step's 0.02 s for the resumed one): the resumed run's progress goes on from where the
    stopped one left it, moved on by the new set-up, not back by the first one's."""
    clock, progress = on_a_clock_of_steps(monkeypatch, lambda n: 0.02)
    offset, fake, build, set_up = {"seconds": 0.0}, budget.now, train.build, [0.5, 0.02]
    monkeypatch.setattr(budget, "now", lambda: fake() + offset["seconds"])

    def a_set_up_that_takes_its_time(run):
        offset["seconds"] += set_up.pop(0)
        return build(run)
    monkeypatch.setattr(train, "build", a_set_up_that_takes_its_time)
    with monkeypatch.context() as m:
        interrupt_at(m, 32, signal.SIGTERM)
        code, _, err = budget_run(capsys, shakespeare_head, tmp_path / "budget")
    assert code == 143, err
    code, _, err = cli(capsys, train.main, "--resume", "--out_dir", tmp_path / "budget")
    assert code == 0 and not set_up, err
    assert progress[32] >= progress[31]  # the first resumed step's progress: on from the last stopped one's
    assert_progress_rises_to_the_end(progress, 10)


def test_a_budgeted_run_resumed_with_max_steps_follows_the_schedule_of_a_run_that_long(shakespeare_head, tmp_path,
                                                                                        capsys, monkeypatch):
    """--max_steps on resume ends a budgeted run at a step count instead: from the step it is at, its progress is
    that of a run of --max_steps steps (optim.progress), not the time's."""
    clock, moved = on_a_clock_of_steps(monkeypatch, lambda n: 0.02)
    with monkeypatch.context() as m:
        interrupt_at(m, 32, signal.SIGTERM)
        code, _, err = budget_run(capsys, shakespeare_head, tmp_path / "budget")
    assert code == 143, err
    resumed_from = len(moved)
    code, out, err = cli(capsys, train.main, "--resume", "--out_dir", tmp_path / "budget", "--max_steps", "60")
    assert code == 0 and "the schedule of a run of 60 steps" in out, err
    cfg = TrainConfig(**load_checkpoint(str(tmp_path / "budget" / "last.pt"))["train_config"])
    assert moved[resumed_from:] == [optim.progress(s, cfg) for s in range(32, 60)]


def test_a_budgeted_checkpoint_of_the_previous_version_resumes_where_its_progress_was(shakespeare_head, tmp_path,
                                                                                      capsys, monkeypatch):
    """The previous version counted a budget's progress in steps, on to an end it estimated (end_step)."""
    clock, progress = on_a_clock_of_steps(monkeypatch, lambda n: 0.02)
    with monkeypatch.context() as m:
        interrupt_at(m, 32, signal.SIGTERM)
        code, _, err = budget_run(capsys, shakespeare_head, tmp_path / "budget")
    assert code == 143, err
    path = str(tmp_path / "budget" / "last.pt")
    checkpoint = load_checkpoint(path)
    del checkpoint["progress"]
    checkpoint["progress_from"], checkpoint["end_step"] = [20, 0.25], 100  # at step 31: 0.25 + 0.75 * 11 / 80
    save_checkpoint(path, checkpoint)
    resumed_from = len(progress)
    code, _, err = cli(capsys, train.main, "--resume", "--out_dir", tmp_path / "budget")
    assert code == 0, err
    assert progress[resumed_from] == pytest.approx(0.353125) and progress[-1] > 0.95 and clock() <= 3
    assert all(a <= b for a, b in zip(progress[resumed_from:], progress[resumed_from + 1:]))


def test_a_duration_reads_each_number_with_its_unit_and_a_number_alone_as_seconds():
    assert [parse_duration(d) for d in ("5m", "300s", "300", "1h30m", "2.5m", " 90 ")] == [300, 300, 300, 5400, 150, 90]
    for wrong in ("1h30", "5x", "0", "-5m", "m"):  # 1h30: an hour and 30 what?
        with pytest.raises(TinyLLMError, match="positive duration"):
            parse_duration(wrong)


def test_a_budget_too_short_for_one_evaluation_is_one_line(shakespeare_head, tmp_path, capsys):
    code, _, err = cli(capsys, train.main, *TINY_SHAPE, *QUICK, "--data", shakespeare_head, "--time_budget",
                       "0.001s", "--out_dir", tmp_path)
    assert_one_line_error(code, err, "too short")


def test_a_budgeted_run_ends_on_the_real_clock_in_time(shakespeare_head, tmp_path, capsys, monkeypatch):
    budget_seconds, step, taken = 2.0, train.train_step, []

    def counted(*args, **kwargs):
        taken.append(1)
        assert len(taken) < 20000, "the run went on past its budget"
        return step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", counted)
    t0 = time.perf_counter()
    code, out, err = cli(capsys, train.main, *TINY_SHAPE, *QUICK, "--data", shakespeare_head, "--sample_tokens", "20",
                         "--log_interval", "10", "--time_budget", f"{budget_seconds}s", "--out_dir", tmp_path)
    took = time.perf_counter() - t0
    assert code == 0 and "time budget 2.0s:" in out, err
    assert took < budget_seconds + 2.5  # the end is re-estimated at every progress line; the margin is for a busy machine


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="runs python through sh's exec")
def test_the_budget_counts_from_the_scripts_first_line_not_from_the_shell_that_ran_before_it():
    """sh -c 'pip install ... && python train.py' (Colab's !, a script) may exec python in the process
    the shell started before pip ran: what ran before python is not the run's time. The child
    prints the seconds python train.py's budget has counted once train.py is imported."""
    child = "import time, train, machinery; print(time.perf_counter() - machinery.STARTED, time.time())"
    launched = time.time()
    done = subprocess.run(["sh", "-c", 'sleep 1 && exec "$0" -c "$1"', sys.executable, child], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, check=True)
    counted, now = map(float, done.stdout.split())
    assert 0.0 < counted < now - launched - 0.75  # importing torch is counted, the shell's 1 s sleep is not


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


def test_a_budget_keeps_the_time_of_the_closing_sample_measured_before_the_first_step(shakespeare_head, tmp_path):
    from conftest import tiny_model_config, tiny_train_config
    for tokens in (0, 400):
        cfg = tiny_train_config(shakespeare_head, tmp_path / str(tokens), time_budget="60s", sample_tokens=tokens)
        run = train.setup_run(tiny_model_config(), cfg)
        assert (run.sample_seconds > 0) == (tokens > 0)
        clock = budget.Clock(run.cfg, run.state, run.started, run.world, run.device, run.sample_seconds)
        assert clock.usable_seconds() == pytest.approx(60 * (1 - budget.SAFETY) - run.sample_seconds)
