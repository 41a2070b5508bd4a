"""The promises every change keeps, for the flags given (none: a tiny run's): a run
stopped and resumed is the run that went straight on, its history numbers; a time budget ends on
time at the schedule's end; the KV cache agrees with recomputation; a checkpoint generates:

    python -m pytest -q tests/test_promises.py --flags="--lr_schedule linear --n_layer 3"
"""

import csv
import signal
from dataclasses import replace

import pytest
import torch
from conftest import (
    GREEDY,
    cli,
    interrupt_at,
    last_lr_is_the_schedules_end,
    same_weights,
    slow_steps,
    split,
    train_run,
    without_timings,
)

import generate
from config import RunOptions, TinyLLMError, TrainConfig
from machinery import checkpoint
from machinery.settings import build_configs
from machinery.settings import flags as train_flags
from model import GPT
from sampling import Context
from train import get_lr

SCHEDULES = TrainConfig.__dataclass_fields__["lr_schedule"].metadata["choices"]
# a tiny run's settings, under the flags given; dropout draws random numbers: a resume restores them
TINY = dict(
    n_layer=2,
    n_head=2,
    n_embd=32,
    block_size=16,
    dropout=0.1,
    batch_size=8,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=2,
    eval_iters=2,
    sample_tokens=0,
    device="cpu",
    dtype="float32",
    plots=False,
)


def configs(flags, data, out_dir, **shape_of_the_test):
    """(GPTConfig, TrainConfig): TINY, then the train.py flags given, then what the test needs. A
    combination the settings refuse skips the test, with the refusal's line."""
    given = train_flags(split(flags)[0]) | shape_of_the_test | dict(data=data, out_dir=str(out_dir))
    try:
        return build_configs(given, TINY)
    except TinyLLMError as refused:
        pytest.skip(f"error: {refused}")


def numbers(path):
    """history.csv's cells, each a number (or empty where a row has no such figure)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [float(v) for row in rows for k, v in row.items() if k != "kind" and v]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_stopped_and_resumed_is_the_run_that_went_straight_on(
    flags, text_file, tmp_path, monkeypatch, signum, code
):
    # progress lines at 4, 8 and 12; evaluations at 0, 6, 12 and 14: one in a line's window
    steps = dict(max_steps=14, log_interval=4, eval_interval=6)
    model_cfg, straight = configs(flags, text_file, tmp_path / "straight", **steps)
    full = train_run(model_cfg, straight)
    model_cfg, cut = configs(flags, text_file, tmp_path / "cut", **steps)
    with monkeypatch.context() as m:
        interrupt_at(m, 7, signum)  # after the evaluation at 6, before the line at 8
        with pytest.raises(SystemExit) as stopped:
            train_run(model_cfg, cut)
    assert stopped.value.code == code
    resumed = train_run(model_cfg, cut, RunOptions(resume=True))
    assert without_timings(resumed["history"]) == without_timings(full["history"])
    assert same_weights(full["model"].state_dict(), resumed["model"].state_dict())
    for run in (straight, cut):  # every figure a number, whatever the intervals
        assert len(numbers(f"{run.out_dir}/history.csv")) > 30


@pytest.mark.slow  # waits a second
@pytest.mark.parametrize("lr_schedule", SCHEDULES)  # every choice config.py offers
def test_a_budget_ends_on_time_with_its_last_step_at_the_schedules_end(
    flags, text_file, tmp_path, monkeypatch, capsys, lr_schedule
):
    slow_steps(monkeypatch, 0.03)  # a slow machine: its steps take 30 ms more
    budget = dict(time_budget="1s", lr_schedule=lr_schedule, eval_interval=1000, sample_tokens=20)
    model_cfg, cfg = configs(flags, text_file, tmp_path, **budget)
    summary = train_run(model_cfg, cfg)
    # its steps and last evaluation end at 99% of the budget, a step's time late at most
    spent = checkpoint.load(str(tmp_path / "last.pt"))["seconds"]
    assert 0.8 <= spent <= 1.0 + 0.1 and summary["step"] > 3
    assert last_lr_is_the_schedules_end(cfg, summary)
    end = get_lr(summary["step"], summary["step"], cfg)  # the closing line says where it ended
    assert f"(the schedule's end: {end:.4g})" in capsys.readouterr().out


def test_the_kv_cache_agrees_with_recomputation_past_block_size(flags):
    torch.manual_seed(0)
    model_cfg = replace(configs(flags, "", "")[0], vocab_size=65)
    model = GPT(model_cfg).eval()
    with torch.no_grad():  # attention far from uniform: a key cached wrong shows in the logits
        for block in model.blocks:
            block.attn.c_attn.weight.mul_(10)
    tokens = torch.randint(0, 65, (2, 3 * model_cfg.block_size))
    cached, full = Context(model, use_cache=True), Context(model, use_cache=False)
    for end in range(4, tokens.size(1), 3):  # three new tokens a call
        a, b = cached.next_logits(tokens[:, :end]), full.next_logits(tokens[:, :end])
        assert torch.allclose(a, b, atol=1e-5), end


def test_a_checkpoint_generates_the_same_text_with_and_without_the_cache(
    flags, text_file, tmp_path, capsys
):
    model_cfg, cfg = configs(flags, text_file, tmp_path, max_steps=10, eval_interval=5)
    train_run(model_cfg, cfg)
    capsys.readouterr()
    argv = [tmp_path / "best.pt", "--max_new_tokens", 3 * model_cfg.block_size, "--seed", 1]
    argv += split(flags)[1]  # a sampling rule given: the same text with the cache and without
    texts = [cli(capsys, generate.main, *argv, *extra) for extra in ([], ["--no_cache"])]
    if texts[0][0] == 2:  # the sampling flags refused
        pytest.skip(texts[0][2].strip())
    assert texts[0][0] == 0 and len(texts[0][1]) > model_cfg.block_size
    assert texts[0] == texts[1]
    greedy = cli(capsys, generate.main, *argv, "--temperature", GREEDY.temperature)
    assert greedy[0] == 0 and greedy[1]
