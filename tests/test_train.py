"""train.py: the step, the schedule, the loop, checkpoints and their safety, resuming, fine-tuning,
a time budget."""

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import pickle
import signal
import time
import weakref

import pytest
import torch
from conftest import (
    ROOT,
    TINY_FLAGS,
    assert_one_line_error,
    cli,
    corpus_head,
    interrupt_at,
    last_lr_is_the_schedules_end,
    same_state,
    same_weights,
    slow_steps,
    through_the_model,
    tiny_model,
    tiny_run,
    train_run,
    weights,
)

import finetune
import generate
import train
import utils
from config import (
    ASSISTANT,
    EOT,
    PRESETS,
    USER,
    GPTConfig,
    RunOptions,
    TinyLLMError,
    TrainConfig,
    setting,
)
from machinery import checkpoint, devices, sources
from machinery.settings import Settings, build_configs, flags, settle, settle_run
from machinery.state import start_state
from model import GPT
from muon import orthogonalize
from tools import score
from train import get_lr, make_optimizer

CPU = torch.device("cpu")
FLOAT32 = devices.Process(0, 1, CPU)  # one process in float32: no autocast, a disabled scaler
AMX = dict(vendor="Intel", amx=True, avx512_bf16=True)  # a CPU that trains in bfloat16
NO_BF16 = dict(vendor="AMD", amx=False, avx512_bf16=False)
NO_CTX = contextlib.nullcontext()
SCHEDULES = TrainConfig.__dataclass_fields__["lr_schedule"].metadata["choices"]


def batches(n, batch_size=8, block_size=16, vocab_size=65):
    """n seeded batches (x, y) of random tokens, each its own tensor: a test may mask y."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab_size, (n, batch_size, block_size + 1), generator=g)
    return [(d[:, :-1].clone(), d[:, 1:].clone()) for d in data]


# ---------------------------------------------------------------------- the step and the schedule


def group_of(optimizer):
    """{id of a parameter: the optimizer group that holds it}."""
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_each_parameter_is_in_one_group_and_only_matrices_decay(name):
    model = GPT(tiny_model())
    cfg = TrainConfig(optimizer=name, weight_decay=0.1, lr=1e-3, muon_lr=0.02)
    optimizer = make_optimizer(model, cfg, CPU)
    groups = group_of(optimizer)
    assert len(groups) == sum(len(g["params"]) for g in optimizer.param_groups)
    assert len(groups) == len(list(model.parameters()))
    for n, p in model.named_parameters():
        group = groups[id(p)]
        assert dict(zip(map(id, group["params"]), group["names"]))[id(p)] == n  # a resume's key
        if group.get("muon"):  # Muon's: the blocks' matrices, at muon_lr's peak, undecayed
            assert name == "muon" and n.startswith("blocks.") and p.dim() == 2
            assert cfg.lr * group["lr_scale"] == pytest.approx(cfg.muon_lr)
        else:
            assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)


def test_the_step_clips_before_the_update_at_the_lr_it_is_given():
    torch.manual_seed(0)
    model = GPT(tiny_model())
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.0), CPU)
    seen, real_step = {}, optimizer.step

    def recording_step(*a, **k):
        seen["norm"] = torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()
        seen["lrs"] = [(g["lr"], g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
        return real_step(*a, **k)

    optimizer.step = recording_step
    batch = batches(1)[0]
    cfg = TrainConfig(grad_accum_steps=1, grad_clip=0.05)
    figures = train.train_step(model, optimizer, lambda: batch, 0.0123, cfg, FLOAT32)
    assert figures["grad_norm"] > 0.05  # logged before clipping
    assert seen["norm"] == pytest.approx(0.05, rel=1e-4)
    assert all(lr == 0.0123 * scale for lr, scale in seen["lrs"])


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


# the logged figures of train_step that are formulas over one step of a tiny GPT: over the trained
# weights before and after the step, and their gradients (grad_clip 0: as backward left them). Such
# a figure's test is a row here
FIGURES = {"grad_norm": lambda before, after, grads: flat(grads).norm()}


@pytest.mark.parametrize("name", FIGURES)
def test_each_logged_figure_is_its_formula(name):
    torch.manual_seed(0)
    model = GPT(tiny_model())
    cfg = TrainConfig(grad_clip=0.0)
    optimizer = make_optimizer(model, cfg, CPU)
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    figures = train.train_step(model, optimizer, lambda: batches(1)[0], 1e-3, cfg, FLOAT32)
    after = [p.detach() for p in trained]
    expected = FIGURES[name](before, after, [p.grad for p in trained])
    assert float(figures[name]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_a_groups_lr_scale_multiplies_the_steps_lr_for_every_optimizer(name):
    moves = []
    for scale in (1.0, 3.0):
        torch.manual_seed(0)
        model = GPT(tiny_model())
        optimizer = make_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.0), CPU)
        for group in optimizer.param_groups:  # a learner's change: every group 3x faster
            group["lr_scale"] = group.get("lr_scale", 1.0) * scale
        before = [p.detach().clone() for p in model.parameters()]
        step = (lambda: batches(1)[0], 1e-4, TrainConfig(grad_clip=0), FLOAT32)
        train.train_step(model, optimizer, *step)
        moves.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    for plain, faster in zip(*moves):  # a first step moves each weight in proportion to its lr
        assert torch.allclose(faster, 3 * plain, rtol=1e-3, atol=1e-6)


def test_compiles_first_step_leaves_the_weights_the_optimizer_and_every_generator_as_they_were():
    torch.manual_seed(0)
    model = GPT(tiny_model(dropout=0.1))  # dropout draws from the generators
    optimizer = make_optimizer(model, TrainConfig(), CPU)
    batch = batches(1)[0]
    train.train_step(model, optimizer, lambda: batch, 1e-3, TrainConfig(), FLOAT32)  # moments
    before = (weights(model), copy.deepcopy(optimizer.state_dict()), devices.rng_state())

    def next_batch():  # draws from torch's generator, as a run's batches do
        ids = torch.randint(0, 65, (8, 17))
        return ids[:, :-1], ids[:, 1:]

    devices.compile_first(model, model, next_batch, FLOAT32)  # as fit runs it, model compiled
    after = (weights(model), optimizer.state_dict(), devices.rng_state())
    assert same_weights(before[0], after[0])
    assert same_state(before[1], after[1]) and same_state(before[2], after[2])
    assert all(p.grad is None for p in model.parameters())


def test_gradient_accumulation_is_one_big_batch_and_gradients_start_from_zero():
    x, y = batches(1, batch_size=8)[0]
    halves = iter([(x[:4], y[:4]), (x[4:], y[4:])] * 2)
    results = []
    for accum, next_batch in ((1, lambda: (x, y)), (2, lambda: next(halves))):
        torch.manual_seed(0)
        model = GPT(tiny_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):  # a second step: gradients left over from the first would add up
            cfg = TrainConfig(grad_accum_steps=accum, grad_clip=0.0)
            loss = train.train_step(model, optimizer, next_batch, 0.1, cfg, FLOAT32)["loss"]
        results.append((weights(model), loss))
    (one, loss_one), (two, loss_two) = results
    assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)
    assert loss_one == pytest.approx(loss_two.item())


@pytest.mark.parametrize("lr_schedule", SCHEDULES)  # every choice config.py offers
def test_each_step_takes_get_lr_at_its_share_of_the_steps_after_the_warmup(
    text_file, tmp_path, lr_schedule
):
    cfg = tiny_run(
        text_file,
        tmp_path,
        max_steps=12,
        warmup_steps=4,
        log_interval=1,
        eval_interval=100,
        lr_schedule=lr_schedule,
    )
    lrs = [row["lr"] for row in train_run(tiny_model(), cfg)["history"] if row["kind"] == "train"]
    assert lrs == pytest.approx([get_lr(s, 12, cfg) for s in range(12)], rel=1e-6)
    warm = train.warmup(12, cfg)  # the schedule's own warmup, 0 for a shape without one
    climb = lrs[:warm]
    assert climb == sorted(set(climb)) and lrs[warm] == max(lrs)  # it climbs to the peak
    assert get_lr(12, 12, cfg) == get_lr(13, 12, cfg)  # at max_steps the schedule is at its end
    assert get_lr(12, 12, cfg) == pytest.approx(cfg.min_lr)  # its floor, where a budget ends
    assert all(0 < lr <= cfg.lr for lr in lrs)


@pytest.mark.parametrize("lr_schedule", SCHEDULES)
def test_a_long_run_climbs_through_its_warmup_to_the_peak_and_ends_at_min_lr(lr_schedule):
    # 400 steps: a warmup sized as a share of the run gets steps to climb (12 steps above may not)
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10, lr_schedule=lr_schedule)
    lrs = [get_lr(s, 400, cfg) for s in range(400)]
    climb = lrs[: train.warmup(400, cfg)]
    assert climb == sorted(set(climb))  # every warmup step a little higher
    assert lrs[len(climb)] == max(lrs) == pytest.approx(cfg.lr)  # the peak, right after it
    assert get_lr(400, 400, cfg) == pytest.approx(cfg.min_lr) and min(lrs) > 0


# (lr_schedule, step, its LR) at lr 1e-2, min_lr 1e-3, 4 warmup steps, max_steps 14: a shape's
# formula, checked at a few steps
SCHEDULE_POINTS = [
    ("cosine", 0, 2.5e-3),  # the warmup: (step + 1) / warmup_steps of lr
    ("cosine", 4, 1e-2),  # the peak
    ("cosine", 9, 5.5e-3),  # half way from the warmup's end to max_steps
    ("cosine", 14, 1e-3),  # the end: min_lr
    ("linear", 0, 2.5e-3),
    ("linear", 9, 5.5e-3),
    ("linear", 14, 1e-3),
]


@pytest.mark.parametrize("lr_schedule, step, lr", SCHEDULE_POINTS)
def test_each_schedule_gives_its_lr_at_a_step_of_the_run(lr_schedule, step, lr):
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=4, lr_schedule=lr_schedule)
    assert get_lr(step, 14, cfg) == pytest.approx(lr)


@pytest.mark.slow  # draws
def test_plot_lr_prints_the_schedule_at_every_tenth(tmp_path, capsys):
    code, out, _ = cli(
        capsys,
        train.main,
        "--plot_lr",
        "--max_steps",
        "100",
        "--warmup_steps",
        "10",
        "--lr",
        "1e-3",
        "--min_lr",
        "1e-4",
        "--lr_schedule",
        "cosine",
        "--out_dir",
        tmp_path,
    )
    assert code == 0 and os.path.getsize(tmp_path / "lr_schedule.png") > 0
    assert "10: 0.001" in out and "100: 0.0001" in out


# ----------------------------------------------------------------------------- the loop


def test_a_tiny_run_learns_writes_its_files_and_samples(text_file, tmp_path, capsys):
    cfg = tiny_run(text_file, tmp_path, max_steps=60, eval_interval=30, lr=1e-2, sample_tokens=30)
    summary = train_run(tiny_model(), cfg)
    evals = [h["val_loss"] for h in summary["history"] if h["kind"] == "eval"]
    assert evals[0] > math.log(summary["model"].config.vocab_size) - 0.2  # a fresh model: uniform
    assert evals[-1] < evals[0] - 0.8
    assert {"best.pt", "last.pt", "history.csv"} <= set(os.listdir(tmp_path))
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert rows[0].startswith("kind,step")
    assert len(rows) == 1 + 3 + 6  # 3 evaluations, a row per 10 steps
    out = capsys.readouterr().out
    assert "done: 60 steps" in out and len(out.split("sample:\n")[1]) >= 30


def test_evaluation_is_in_eval_mode_without_a_graph():
    model = GPT(tiny_model(dropout=0.5))
    seen = []
    batch = batches(1)[0]

    def next_batch():
        seen.append((model.training, torch.is_grad_enabled()))
        return batch

    losses = [train.estimate_loss(model, {"val": next_batch}, 2, NO_CTX)["val"] for _ in range(2)]
    assert seen == [(False, False)] * 4 and losses[0] == losses[1]  # no dropout, no graph
    assert model.training  # and back to training after


def test_overfit_batch_fits_one_batch_and_writes_nothing(text_file, tmp_path, capsys):
    # an evaluation on a progress line must not undo the stop
    fits = "--n_embd 64 --bias True --batch_size 4 --warmup_steps 0 --lr 1e-2 --min_lr 1e-2"
    steps = "--max_steps 400 --weight_decay 0 --log_interval 25 --eval_interval 25"
    argv = [*TINY_FLAGS, *fits.split(), *steps.split(), "--data", text_file]
    code, out, _ = cli(capsys, train.main, *argv, "--overfit_batch", "--out_dir", tmp_path / "run")
    assert code == 0 and "overfit_batch: loss below 0.01" in out and not (tmp_path / "run").exists()


def test_a_non_finite_loss_stops_the_run_and_nothing_non_finite_is_saved(
    text_file, tmp_path, monkeypatch
):
    def poisoned(n, model):  # step 7 starts from a NaN weight
        if n == 7:
            with torch.no_grad():
                next(model.parameters()).fill_(math.nan)

    through_the_model(monkeypatch, step=poisoned)
    with pytest.raises(TinyLLMError, match="step 6"):
        train_run(tiny_model(), tiny_run(text_file, tmp_path, max_steps=20))
    saved = checkpoint.load(str(tmp_path / "last.pt"))
    assert saved["step"] == 5 and all(torch.isfinite(t).all() for t in saved["model"].values())


def scripted_val_losses(monkeypatch, vals, eval_iters=2):
    """The model scores vals[k] on val at its k-th evaluation, and 1.0 on train."""

    def scored(call, out):
        evaluation, batch = divmod(call, 2 * eval_iters)  # train's batches, then val's
        loss = vals[evaluation] if batch >= eval_iters else 1.0
        return out[0], torch.tensor(loss)

    through_the_model(monkeypatch, evaluation=scored)


def test_patience_stops_early_keeps_the_best_and_its_count_survives_a_resume(
    text_file, tmp_path, monkeypatch
):
    cfg = tiny_run(text_file, tmp_path, max_steps=50, patience=2)
    scripted_val_losses(monkeypatch, [2.0, 1.5, 1.6, 1.7])
    with monkeypatch.context() as m:
        interrupt_at(m, 12, signal.SIGTERM)  # after the evaluation at 10, the first no better
        with pytest.raises(SystemExit):
            train_run(tiny_model(), cfg)
    result = train_run(tiny_model(), cfg, RunOptions(resume=True))
    # evaluations at 0, 5 (the best), 10 and 15
    assert result["step"] == 15 and "early stop" in result["stop_reason"]
    best = checkpoint.load(str(tmp_path / "best.pt"))
    assert best["step"] == 5 and best["best_val_loss"] == 1.5


def test_a_target_loss_stops_at_the_first_evaluation_that_meets_it(
    text_file, tmp_path, monkeypatch
):
    scripted_val_losses(monkeypatch, [4.0, 3.0, 2.0, 1.0])
    result = train_run(tiny_model(), tiny_run(text_file, tmp_path, max_steps=50, target_loss=2.5))
    assert result["step"] == 10 and "target reached" in result["stop_reason"]


def test_periodic_checkpoints_keep_the_newest(text_file, tmp_path):
    train_run(
        tiny_model(), tiny_run(text_file, tmp_path, max_steps=20, save_interval=4, keep_last=2)
    )
    periodic = sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt_"))
    assert periodic == ["ckpt_0000016.pt", "ckpt_0000020.pt"]


def test_training_batches_come_from_the_data_fraction_alone(text_file, tmp_path, monkeypatch):
    """The scaling study's data-limited runs: every training batch from the first part of the
    split, val from all."""
    seen = []
    real = utils.get_batch

    def recording_get_batch(data, *a, **k):
        seen.append(len(data))
        return real(data, *a, **k)

    monkeypatch.setattr(utils, "get_batch", recording_get_batch)
    summary = train_run(
        tiny_model(), tiny_run(text_file, tmp_path, max_steps=6, data_fraction=0.25)
    )
    train_tokens, val_tokens = len(summary["corpus"].train), len(summary["corpus"].val)
    assert set(seen) == {int(train_tokens * 0.25), val_tokens}
    # six steps, and evaluations at 0, 5 and 6 of two batches
    assert seen.count(int(train_tokens * 0.25)) == 6 + 3 * 2


def test_the_evaluation_scores_every_position_of_the_val_split(trained, capsys):
    path, data = trained
    code, out, _ = cli(capsys, score.main, path, "--device", "cpu")
    loaded = checkpoint.load_model(path)
    model, tokenizer = loaded.model, loaded.tokenizer
    val = torch.tensor(tokenizer.encode(corpus_head(20_000)[18_000:]))
    losses = score.token_losses(model, val)
    assert code == 0 and f"loss {losses.mean().item():.4f}" in out
    assert len(losses) == len(val) - 1


@pytest.mark.parametrize(
    "argv, word",
    [(["missing.pt"], "not found"), (["--batch_size", "0"], "batch"), (["--device", "tpu"], "tpu")],
)
def test_bad_evaluation_input_is_one_error_line(argv, word, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, score.main, *argv)
    assert_one_line_error(code, err, word)


def test_the_evaluation_of_a_chat_model_scores_its_answers_alone(chat_run, capsys):
    path, _ = chat_run
    code, out, _ = cli(capsys, score.main, path, "--device", "cpu")
    loaded = checkpoint.load_model(path)
    model, tokenizer, saved = loaded.model, loaded.tokenizer, loaded.checkpoint
    corpus, _ = sources.validation_split(saved, tokenizer)
    ids = torch.as_tensor(corpus.val, dtype=torch.long)
    answer, inside = [], False  # each answer's tokens and its <|endoftext|>, found here afresh
    for token in ids.tolist():
        answer.append(inside)
        inside = token == tokenizer.encode(ASSISTANT)[0] or (inside and token != tokenizer.eot_id)
    losses = score.token_losses(model, ids)
    answers_only = losses[torch.tensor(answer[1:])].mean().item()
    assert code == 0 and f"loss {answers_only:.4f}" in out
    assert abs(answers_only - losses.mean().item()) > 1e-3  # not every token's


def test_a_chat_runs_closing_sample_answers_a_question_in_the_template(chat_run):
    _, out = chat_run
    sample = out.split("sample:\n")[1]
    assert sample.startswith(USER) and ASSISTANT in sample and EOT not in sample


def test_a_checkpoint_with_a_setting_this_version_does_not_know_is_one_error_line(
    trained, tmp_path, capsys
):
    saved = checkpoint.load(trained[0])
    saved["model_config"]["rope_theta"] = 10000.0  # from a later version, say
    checkpoint.save(str(tmp_path / "later.pt"), saved)
    later = tmp_path / "later.pt"
    for main, argv in (
        (generate.main, [later, "--max_new_tokens", "5"]),
        (finetune.main, ["--init_from", later, "--out_dir", tmp_path]),
    ):
        code, _, err = cli(capsys, main, *argv)
        assert_one_line_error(code, err, "rope_theta")


# ----------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_gives_back_the_model_and_loads_without_running_code(trained, tmp_path):
    path, _ = trained
    loaded = checkpoint.load_model(path)
    model, tokenizer = loaded.model, loaded.tokenizer
    parts = {
        "model",
        "model_config",
        "tokenizer",
        "optimizer",
        "train_config",
        "rng",
        "step",
        "history",
    }
    assert parts <= set(checkpoint.load(path))
    torch.load(path, weights_only=True)  # plain tensors and data
    idx = torch.tensor([tokenizer.encode("ROMEO:")])
    reloaded = checkpoint.model_of(checkpoint.load(path)).eval()
    assert torch.equal(model(idx)[0], reloaded(idx)[0])


def test_corrupt_truncated_foreign_and_unsafe_checkpoints_are_one_error_line(
    trained, tmp_path, capsys
):
    good = open(trained[0], "rb").read()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "random.pt").write_bytes(os.urandom(1000))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    not_weights = {"model": {0: torch.zeros(1)}, "model_config": {}, "tokenizer": {}}
    torch.save(not_weights, tmp_path / "not_weights.pt")
    unsafe = {"model": {"w": torch.zeros(1)}, "model_config": {}, "tokenizer": {}, "x": Payload()}
    torch.save(unsafe, tmp_path / "unsafe.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"model": 1}))
    files = ("truncated.pt", "random.pt", "foreign.pt", "not_weights.pt", "unsafe.pt", "plain.pkl")
    for name in (*files, "missing.pt"):
        fine_tune = ("--init_from", tmp_path / name, "--out_dir", tmp_path / "run")
        assert_one_line_error(*cli(capsys, finetune.main, *fine_tune)[::2])
        assert_one_line_error(*cli(capsys, generate.main, tmp_path / name)[::2])
    assert not marker.exists()


def test_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    checkpoint.save(path, {"step": 1})

    def disk_full(src, dst):
        raise OSError(28, "No space")

    monkeypatch.setattr(checkpoint, "replace_file", disk_full)
    with pytest.raises(OSError) as error:
        checkpoint.save(path, {"step": 2})
    assert error.value.filename == path and torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left


def test_a_file_held_open_for_a_moment_is_still_replaced(tmp_path, monkeypatch):
    """Windows refuses to replace a file another process holds open: the save waits, tries again."""
    refusals = [PermissionError(13, "Access is denied")]
    real = os.replace

    def busy_once(src, dst):
        if refusals:
            raise refusals.pop()
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", busy_once)
    checkpoint.save(str(tmp_path / "last.pt"), {"step": 2})
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2 and not refusals


# ----------------------------------------------------------------------------- resuming


def test_one_resume_command_starts_a_run_then_continues_it(text_file, tmp_path, capsys):
    argv = [
        *TINY_FLAGS,
        "--data",
        text_file,
        "--out_dir",
        tmp_path,
        "--resume",
        "--eval_interval",
        "5",
    ]
    assert cli(capsys, train.main, *argv, "--max_steps", "10")[0] == 0
    # a resume may change these two
    code, out, _ = cli(capsys, train.main, *argv, "--max_steps", "20", "--eval_iters", "3")
    assert code == 0 and "resuming" in out and "done: 20 steps" in out
    assert checkpoint.load(str(tmp_path / "last.pt"))["train_config"]["eval_iters"] == 3
    refused = (("--n_embd", "64"), ("--lr", "0.1"), ("--batch_size", "4"), ("--data", "other.txt"))
    for flag, value in refused:
        code, _, err = cli(capsys, train.main, *argv, flag, value)
        assert_one_line_error(code, err, flag)


def test_a_new_max_steps_follows_the_schedule_of_a_run_that_long(text_file, tmp_path, capsys):
    cfg = tiny_run(text_file, tmp_path, max_steps=10, warmup_steps=2, log_interval=1)
    train_run(tiny_model(), cfg)
    cfg = tiny_run(text_file, tmp_path, max_steps=30, warmup_steps=2, log_interval=1)
    longer = train_run(tiny_model(), cfg, RunOptions(resume=True), given={"max_steps": 30})
    lrs = [h["lr"] for h in longer["history"] if h["kind"] == "train"][10:]
    longer_cfg = tiny_run(text_file, tmp_path, max_steps=30, warmup_steps=2)
    expected = [get_lr(s, 30, longer_cfg) for s in range(10, 30)]
    assert lrs == pytest.approx(expected)
    with pytest.raises(TinyLLMError, match="step 30"):
        train_run(
            tiny_model(),
            tiny_run(text_file, tmp_path, max_steps=20),
            RunOptions(resume=True),
            given={"max_steps": 20},
        )


def test_a_resume_whose_saved_steps_lack_a_figure_added_since_logs_it_from_the_steps_that_have_it(
    text_file, tmp_path, monkeypatch
):
    cfg = tiny_run(text_file, tmp_path, max_steps=10, log_interval=5, eval_interval=100)
    with monkeypatch.context() as m:
        interrupt_at(m, 3, signal.SIGTERM)  # 3 steps into the first line's window
        with pytest.raises(SystemExit):
            train_run(tiny_model(), cfg)
    last = str(tmp_path / "last.pt")
    saved = checkpoint.load(last)
    assert len(saved["window"]) == 3
    for row in saved["window"]:  # as a checkpoint written before grad_norm was a figure
        del row["grad_norm"]
    checkpoint.save(last, saved)
    lines = train_run(tiny_model(), cfg, RunOptions(resume=True))["history"]
    lines = [row for row in lines if row["kind"] == "train"]
    assert [row["step"] for row in lines] == [5, 10]
    assert all(math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 for row in lines)


def test_a_checkpoint_records_its_stage_and_only_its_script_resumes_it(trained, tmp_path, capsys):
    import finetune

    saved = checkpoint.load(trained[0])
    assert saved["stage"] == "train"
    os.makedirs(tmp_path / "run")
    checkpoint.save(str(tmp_path / "run" / "last.pt"), saved)
    flags = ["--resume", "--out_dir", tmp_path / "run", "--data", trained[1], "--device", "cpu"]
    code, _, err = cli(capsys, finetune.main, *flags)
    assert_one_line_error(code, err, "train.py --resume")
    assert os.listdir(tmp_path / "run") == ["last.pt"]


def test_train_py_learns_qa_records_from_scratch_and_each_stage_shows_its_own_flags(
    tmp_path, capsys
):
    """Seed 003's Q&A from scratch: no --init_from, each record in the chat template with its end
    token, and the loss on the answers alone (--loss_on answers, the default)."""
    import distill
    import dpo
    import finetune

    qa = os.path.join(ROOT, "data", "qa_example.json")
    argv = [*TINY_FLAGS, "--data", qa, "--out_dir", tmp_path / "run", "--max_steps", 2]
    code, out, err = cli(capsys, train.main, *argv, "--eval_interval", 2, "--block_size", 16)
    assert code == 0, err
    saved = checkpoint.load(str(tmp_path / "run" / "last.pt"))
    assert saved["stage"] == "train" and saved["train_config"]["loss_on"] == "answers"
    tokenizer = checkpoint.tokenizer_of(saved, "last.pt")
    with open(qa, encoding="utf-8") as f:
        first = json.load(f)[0]
    question = f"{EOT}{USER}{first['question']}\n{ASSISTANT}"  # documents follow an EOT
    answer = f"{first['answer']}{EOT}"
    corpus = sources.read_corpus(tiny_run(qa, tmp_path), tokenizer)
    n, m = len(tokenizer.encode(question)), len(tokenizer.encode(answer))
    assert tokenizer.decode(corpus.train[: n + m].tolist()) == question + answer
    targets = corpus.train_targets[: n + m]  # True where a token is a target
    assert not targets[:n].any() and targets[n:].all()
    own = {
        train: [],
        finetune: ["--lora_rank"],
        distill: ["--distill_from", "--distill_temperature"],
        dpo: ["--dpo_beta", "--lora_rank"],
    }
    for script, its_flags in own.items():
        code, out, _ = cli(capsys, script.main, "--help")
        others = {f for fs in own.values() for f in fs} - set(its_flags)
        assert code == 0 and all(f in out for f in its_flags), script
        assert not any(f"{f} " in out for f in others), script


def test_a_moved_run_saved_before_a_setting_existed_resumes_where_it_is(trained, tmp_path, capsys):
    """The contracts a new setting meets (docs/changing.md): a checkpoint saved before it existed
    gets its default; a setting saved keeps its value, whatever today's default (min_lr 3e-4
    here, 2e-4 by default); its --out_dir is where it is now, not where it was saved."""
    saved = checkpoint.load(trained[0])
    del saved["train_config"]["dpo_beta"]  # as a version before that setting saved it
    assert saved["train_config"]["min_lr"] != TrainConfig().min_lr
    os.makedirs(tmp_path / "run")
    checkpoint.save(str(tmp_path / "run" / "last.pt"), saved)
    argv = ["--resume", "--data", trained[1], "--out_dir", tmp_path / "run", "--max_steps", 32]
    code, out, err = cli(capsys, train.main, *argv)
    assert code == 0 and "done: 32 steps" in out, err
    resumed = checkpoint.load(str(tmp_path / "run" / "last.pt"))
    assert resumed["step"] == 32 and resumed["train_config"]["dpo_beta"] == 0.1
    assert resumed["train_config"]["min_lr"] == saved["train_config"]["min_lr"]


def test_a_model_setting_that_is_off_is_none_and_a_checkpoint_keeps_it():
    @dataclasses.dataclass(frozen=True)
    class Capped(GPTConfig):  # a model setting a learner adds: a number that may be off
        logit_cap: float = setting(None, "a cap on the logits; none: no cap", above=0)

    for cap in (None, 30.0):
        config = Capped(**dataclasses.asdict(tiny_model()) | {"logit_cap": cap})
        assert checkpoint.from_saved(Capped, dataclasses.asdict(config), "x.pt") == config


def test_a_checkpoint_of_another_version_is_refused_for_resume_but_fine_tunes(
    trained, tmp_path, capsys
):
    old = checkpoint.load(trained[0])
    del old["rng"]  # a field this version needs to resume
    os.makedirs(tmp_path / "run")
    checkpoint.save(str(tmp_path / "run" / "last.pt"), old)
    code, _, err = cli(
        capsys,
        train.main,
        *TINY_FLAGS[:-8],
        "--data",
        trained[1],
        "--out_dir",
        tmp_path / "run",
        "--resume",
    )
    assert_one_line_error(code, err, "--init_from")
    code, out, _ = cli(
        capsys,
        finetune.main,
        "--init_from",
        tmp_path / "run" / "last.pt",
        "--out_dir",
        tmp_path / "ft",
        "--data",
        trained[1],
        "--max_steps",
        "2",
        "--batch_size",
        "8",
        "--eval_iters",
        "1",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--sample_tokens",
        "0",
        "--plots",
        "false",
    )
    assert code == 0, out


def test_the_resumed_optimizer_takes_the_saved_state_with_this_machines_kernel(trained, tmp_path):
    saved = checkpoint.load(trained[0])
    for group in saved["optimizer"]["param_groups"]:
        group["fused"] = None  # as a Mac saves it
    model = checkpoint.model_of(saved)
    optimizer = make_optimizer(model, TrainConfig(), CPU)
    cfg = TrainConfig(max_steps=60, warmup_steps=5)
    first = next(iter(saved["optimizer"]["state"].values()))
    resumed = dict(saved=saved, path=trained[0], resumed=True)
    settings = Settings(model.config, cfg, RunOptions(), "train", "custom", CPU, **resumed)
    start_state(settings, optimizer, devices.Process(0, 1, CPU))
    assert all(g["fused"] for g in optimizer.param_groups)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], first["exp_avg"])


def test_a_resume_finds_each_optimizer_group_by_what_it_holds_or_refuses_in_a_line(
    trained, tmp_path, capsys
):
    saved = checkpoint.load(trained[0])
    os.makedirs(tmp_path / "run")
    model = checkpoint.model_of(saved)
    groups = saved["optimizer"]["param_groups"]
    saved["optimizer"]["param_groups"] = groups[::-1]  # another order: each group still found
    checkpoint.save(str(tmp_path / "run" / "last.pt"), saved)
    optimizer = make_optimizer(model, TrainConfig(), CPU)
    checkpoint.load_optimizer(optimizer, saved["optimizer"], "last.pt")
    state = optimizer.state_dict()["state"]
    for name in dict(model.named_parameters()):  # each parameter's moments, as saved for it
        [group] = [g for g in groups if name in g["names"]]
        saved_moments = saved["optimizer"]["state"][group["params"][group["names"].index(name)]]
        index = [n for g in optimizer.param_groups for n in g["names"]].index(name)
        assert torch.equal(state[index]["exp_avg"], saved_moments["exp_avg"])
    groups[0]["names"] = groups[0]["names"][1:] + groups[0]["names"][:1]  # grouped otherwise
    checkpoint.save(str(tmp_path / "run" / "last.pt"), saved)
    flags = ["--resume", "--out_dir", tmp_path / "run", "--data", trained[1], "--device", "cpu"]
    code, _, err = cli(capsys, train.main, *flags, "--max_steps", 70)
    assert_one_line_error(code, err, "optimizer", "--init_from")


# ----------------------------------------------------------------------------- fine-tuning


def test_fine_tuning_starts_from_the_weights_with_a_fresh_optimizer_and_keeps_the_shape(
    trained, tmp_path, capsys
):
    path, data = trained
    common = [
        "--init_from",
        path,
        "--data",
        data,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--sample_tokens",
        "0",
        "--batch_size",
        "8",
        "--eval_iters",
        "1",
        "--plots",
        "false",
    ]
    for flag, value in (("--n_layer", "3"), ("--tokenizer", "bpe")):
        code, _, err = cli(capsys, finetune.main, *common, "--out_dir", tmp_path / "x", flag, value)
        assert_one_line_error(code, err, flag)
    code, out, _ = cli(
        capsys,
        finetune.main,
        *common,
        "--out_dir",
        tmp_path / "ft",
        "--max_steps",
        "1",
        "--dropout",
        "0.2",
        "--eval_interval",
        "100",
    )
    tuned = checkpoint.load(str(tmp_path / "ft" / "last.pt"))
    base = checkpoint.load(path)
    assert code == 0 and tuned["model_config"]["dropout"] == 0.2
    assert max(s["step"].item() for s in tuned["optimizer"]["state"].values()) == 1  # fresh moments
    changed = [k for k in base["model"] if not torch.equal(base["model"][k], tuned["model"][k])]
    assert changed and tuned["model_config"]["n_layer"] == base["model_config"]["n_layer"]


def test_new_characters_grow_the_vocabulary_each_from_the_mean_row(trained, tmp_path, capsys):
    path, data = trained
    new_text = tmp_path / "new.txt"
    new_text.write_text(corpus_head(20_000) + "\nжук ЖУК\n" * 20, encoding="utf-8")
    base = checkpoint.load(path)
    code, out, _ = cli(
        capsys,
        finetune.main,
        "--init_from",
        path,
        "--data",
        new_text,
        "--out_dir",
        tmp_path / "ft",
        "--max_steps",
        "1",
        "--lr",  # a constant, tiny LR, whatever the schedule: the old rows barely move
        "1e-9",
        "--min_lr",
        "1e-9",
        "--weight_decay",
        "0",
        "--batch_size",
        "8",
        "--eval_iters",
        "1",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--sample_tokens",
        "0",
        "--plots",
        "false",
    )
    tuned = checkpoint.load(str(tmp_path / "ft" / "last.pt"))
    old, new = base["model"]["wte.weight"], tuned["model"]["wte.weight"]
    n = len(base["tokenizer"]["chars"])
    assert code == 0 and "added 6 token(s)" in out and new.shape[0] == old.shape[0] + 6
    assert torch.allclose(new[:n], old[:n], atol=1e-6)
    assert torch.allclose(new[-1], old[-1], atol=1e-6)  # EOT last
    # each new row the mean of every old row, and a little noise: no two new tokens look alike
    assert torch.allclose(new[n : n + 6], old.mean(0).expand(6, -1), atol=0.1)
    assert not torch.equal(new[n], new[n + 1])


# ----------------------------------------------------------------------------- Muon


def test_muon_makes_an_update_orthogonal():
    g = torch.randn(64, 16)
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.max() < 1.3 and s.min() > 0.5  # every direction moves alike


def test_a_muon_run_learns_and_resumes_exactly(text_file, tmp_path, monkeypatch):
    full = train_run(tiny_model(), tiny_run(text_file, tmp_path / "full", optimizer="muon"))
    evals = [h["val_loss"] for h in full["history"] if h["kind"] == "eval"]
    assert evals[-1] < evals[0] - 0.5
    cut = tiny_run(text_file, tmp_path / "cut", optimizer="muon")
    with monkeypatch.context() as m:
        interrupt_at(m, 12, signal.SIGTERM)
        with pytest.raises(SystemExit):
            train_run(tiny_model(), cut)
    resumed = train_run(tiny_model(), cut, RunOptions(resume=True))
    assert same_weights(full["model"].state_dict(), resumed["model"].state_dict())


def test_nothing_is_written_before_the_first_step_and_the_baseline_is_no_best(
    text_file, tmp_path, monkeypatch
):
    class FirstStep(Exception):
        pass

    def first_step(n, model):
        raise FirstStep

    out = tmp_path / "run"
    cfg = tiny_run(text_file, out, max_steps=4, eval_interval=2, plots=True, sample_tokens=5)
    with monkeypatch.context() as m:
        through_the_model(m, step=first_step)
        with pytest.raises(FirstStep):
            train_run(tiny_model(), cfg)
    assert os.listdir(out) == []
    summary = train_run(tiny_model(), cfg, RunOptions(overwrite=True))
    evals = [row for row in summary["history"] if row["kind"] == "eval"]
    assert [row["step"] for row in evals] == [0, 2, 4]
    # the best is the best after a step, even where the untrained model scored better
    assert summary["best_val_loss"] == min(row["val_loss"] for row in evals[1:])


# ----------------------------------------------------------------------------- a time budget


def slow_runs(monkeypatch, step, evaluation=0.0, at_evaluation=None):
    """Each step of the runs started here takes step seconds more, in real time, and each pass of
    an evaluation evaluation seconds (at_evaluation(k): the k-th evaluation's, from 0)."""

    def slow_evaluation(call, out):
        time.sleep(at_evaluation(call) if at_evaluation else evaluation)
        return out

    through_the_model(monkeypatch, lambda n, model: time.sleep(step), slow_evaluation)


def steps_end(summary):
    """When the run's last step ended, in the run's seconds: its last row's time."""
    return summary["history"][-1]["seconds"]


@pytest.mark.slow  # waits half a second
def test_a_budget_keeps_room_for_its_closing_evaluation(text_file, tmp_path, monkeypatch):
    """Evaluations a tenth of the budget long: the steps end early enough for the last one."""
    cfg = tiny_run(
        text_file, tmp_path, time_budget="0.5s", warmup_steps=5, eval_interval=10**6, eval_iters=1
    )
    slow_runs(monkeypatch, 0.015, evaluation=0.025)  # 2 passes an evaluation: 50 ms
    summary = train_run(tiny_model(), cfg)
    assert 0.425 <= steps_end(summary) <= 0.5 + 0.1 and summary["step"] > 5


@pytest.mark.slow  # waits a second
def test_the_closing_evaluation_ends_a_budgeted_run_even_when_quicker_than_the_time_kept_for_it(
    text_file, tmp_path, monkeypatch
):
    """The baseline evaluation takes 0.4 s, so the budget keeps 0.4 s for the last one; that one
    takes no time. The run still ends there: no step follows its closing evaluation."""
    cfg = tiny_run(
        text_file, tmp_path, time_budget="1s", warmup_steps=2, eval_interval=10**6, eval_iters=1
    )
    slow_runs(monkeypatch, 0.015, at_evaluation=lambda call: 0.2 if call < 2 else 0.0)
    summary = train_run(tiny_model(), cfg)
    evals = [row["step"] for row in summary["history"] if row["kind"] == "eval"]
    assert evals == [0, summary["step"]] and last_lr_is_the_schedules_end(cfg, summary)
    assert steps_end(summary) <= 0.99 - 0.4 + 0.1


@pytest.mark.slow  # waits a second
def test_a_budget_skips_an_evaluation_that_would_leave_no_time_for_steps(
    text_file, tmp_path, monkeypatch
):
    """Steps of 15 ms and more, evaluations of 0.1 s every 2 steps: none but the last starts too
    late for a step after it (the steps end at 99% of the budget less an evaluation)."""
    cfg = tiny_run(
        text_file, tmp_path, time_budget="1s", warmup_steps=2, eval_interval=2, eval_iters=1
    )
    slow_runs(monkeypatch, 0.015, evaluation=0.05)
    summary = train_run(tiny_model(), cfg)
    ends = [row["seconds"] for row in summary["history"] if row["kind"] == "eval"]
    assert len(ends) >= 3 and all(end <= 0.99 - 0.1 + 0.03 for end in ends[:-1])


@pytest.mark.slow  # waits a second
def test_an_evaluation_that_takes_the_time_left_still_leaves_the_last_step_at_the_schedules_end(
    text_file, tmp_path, monkeypatch
):
    """Steps of 15 ms and more; the evaluation at step 10 takes 0.7 s, past the budget's end: the
    run takes one more step, the last of its schedule, and ends."""
    cfg = tiny_run(
        text_file, tmp_path, time_budget="1s", warmup_steps=5, eval_interval=10, eval_iters=1
    )
    slow_runs(monkeypatch, 0.015, at_evaluation=lambda call: 0.35 if call // 2 == 1 else 0.0)
    summary = train_run(tiny_model(), cfg)
    assert summary["step"] == 11 and last_lr_is_the_schedules_end(cfg, summary)


@pytest.mark.slow  # waits a second
def test_a_budgeted_run_resumes_on_its_clock_and_still_ends_at_the_schedules_end(
    text_file, tmp_path, monkeypatch
):
    """Stopped at step 10, the run saves the seconds it ran; resumed, it counts on from them: it
    runs for the rest of the budget alone."""
    cfg = tiny_run(text_file, tmp_path, time_budget="1s", warmup_steps=5, eval_interval=1000)
    with monkeypatch.context() as m:
        slow_steps(m, 0.03)
        interrupt_at(m, 10, signal.SIGTERM)
        started = time.perf_counter()
        with pytest.raises(SystemExit):
            train_run(tiny_model(), cfg)
        ran = time.perf_counter() - started
    spent = checkpoint.load(str(tmp_path / "last.pt"))["seconds"]
    assert 10 * 0.03 <= spent <= ran
    slow_steps(monkeypatch, 0.03)
    started = time.perf_counter()
    summary = train_run(tiny_model(), cfg, RunOptions(resume=True))
    assert time.perf_counter() - started <= 1.0 - spent + 0.15  # a step's overrun, and loading
    assert 0.85 <= steps_end(summary) <= 1.0 + 0.1 and summary["step"] > 10
    assert last_lr_is_the_schedules_end(cfg, summary)


@pytest.mark.slow  # waits three seconds
def test_a_budget_spent_within_the_warmup_keeps_its_steps_and_a_longer_one_resumes_them(
    text_file, tmp_path, monkeypatch
):
    """Steps of 50 ms and more, a 1 s budget, 20 warmup steps: the time runs out within the
    warmup. The run refuses to end there (its LR would never decay), but saves its steps first."""
    cfg = tiny_run(text_file, tmp_path, time_budget="1s", warmup_steps=20, eval_interval=1000)
    slow_steps(monkeypatch, 0.05)
    with pytest.raises(TinyLLMError, match="--time_budget 2s"):
        train_run(tiny_model(), cfg)
    saved = checkpoint.load(str(tmp_path / "last.pt"))
    assert 5 <= saved["step"] < 20 and 0.9 <= saved["seconds"] <= 1.2  # 99% of it, less an eval
    longer = dataclasses.replace(cfg, time_budget="2s")
    summary = train_run(tiny_model(), longer, RunOptions(resume=True), dict(time_budget="2s"))
    assert summary["step"] > 20 and 1.8 <= steps_end(summary) <= 2.0 + 0.1
    assert last_lr_is_the_schedules_end(longer, summary)


# that a budget counts from the process start, imports included: test_cli.py's signals test, on its
# `python -X importtime train.py`


@pytest.mark.parametrize(
    "facts, argv, preset",
    [
        (AMX, ["--threads", "2"], "mini"),
        (AMX, ["--threads", "4", "--max_steps", "9"], "mini"),
        (AMX, ["--threads", "1"], "tiny"),
        (AMX, ["--threads", "2", "--dtype", "float32"], "tiny"),
        (NO_BF16, ["--threads", "2"], "tiny"),
        (NO_BF16, ["--threads", "2", "--dtype", "bfloat16"], "mini"),
        (AMX, ["--threads", "2", "--preset", "tiny"], "tiny"),
    ],
    ids=[
        "bf16 on 2 threads",
        "bf16 on 4 threads, steps",
        "bf16 on 1 thread",
        "float32 given",
        "no bf16",
        "bf16 given",
        "preset given",
    ],
)
def test_a_run_without_a_preset_takes_the_machines_by_what_it_is(
    fake_machine, capsys, tmp_path, facts, argv, preset
):
    fake_machine(cuda=False, mps=False, **facts)
    assert settle(flags([*argv, "--out_dir", str(tmp_path)])).preset == preset
    said = capsys.readouterr().out
    assert ("--preset" in argv) == (said == "")  # why, in a line, unless a preset was given


def test_a_budget_too_short_for_the_warmup_is_one_line(text_file, tmp_path, capsys):
    # gone before the first step, in the set-up: no seconds to wait
    code, _, err = cli(
        capsys,
        train.main,
        *TINY_FLAGS,
        "--data",
        text_file,
        "--out_dir",
        tmp_path,
        "--time_budget",
        "0.01s",
        "--warmup_steps",
        "100000",
    )
    assert_one_line_error(code, err, "--time_budget")


def test_a_run_that_ends_within_its_warmup_is_warned(text_file, tmp_path, capsys):
    for steps, warned in ((2, True), (4, False)):
        cfg = tiny_run(text_file, tmp_path / str(steps), max_steps=steps, warmup_steps=3)
        train_run(tiny_model(), cfg)
        assert ("warning:" in capsys.readouterr().err) == warned


def test_max_steps_turns_a_presets_budget_off():
    cfg = build_configs(flags(["--max_steps", "50"]), PRESETS["tiny"])[1]
    assert (
        cfg.max_steps == 50
        and not cfg.time_budget
        and build_configs({}, PRESETS["tiny"])[1].time_budget
    )


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_holds_no_copy_of_the_weights_it_started_from(trained, tmp_path, resume):
    # --init_from, or --resume: the checkpoint read at the start is not kept beside the model
    path, data = trained
    options = RunOptions(init_from=path)
    if resume:
        train_run(tiny_model(), tiny_run(data, tmp_path, max_steps=4), options, stage="finetune")
        options = RunOptions(resume=True)
    cfg = tiny_run(data, tmp_path, max_steps=8)
    asked = Settings(tiny_model(), cfg, options, "finetune", "custom", CPU)
    settings = settle_run(asked, {})
    weights = weakref.ref(settings.saved["model"]["wte.weight"])
    moments = weakref.ref(next(iter(settings.saved["optimizer"]["state"].values()))["exp_avg"])
    finetune.finetune(settings)
    gc.collect()
    assert weights() is None and moments() is None
