"""The trainer: step order, evaluation, learning, checkpoints, resume and safety."""

import contextlib
import copy
import dataclasses
import io
import math
import os
import signal

import pytest
import torch

from config import RunOptions, TinyLLMError, TrainConfig
from conftest import SCHEDULES, Payload, checkpoint_of, fixed_batch, interrupt_at, tiny_model_config, tiny_train_config
from model import GPT
from optim import get_lr, make_optimizer
import train

from machinery.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from deep_dives.muon import orthogonalize

CPU = torch.device("cpu")
NO_CTX = contextlib.nullcontext()


def fixed_batches(n, batch_size=8, block_size=16):
    return [fixed_batch(batch_size, block_size, seed=seed) for seed in range(n)]


def test_optimizer_groups_decay_only_matrices():
    model = GPT(tiny_model_config())
    opt = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1), CPU)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_step_order_clips_before_the_optimizer_step_with_the_scheduled_lr():
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    opt = make_optimizer(model, TrainConfig(lr=1.0, weight_decay=0.0), CPU)
    seen = {}
    real_step = opt.step

    def recording_step(*a, **k):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen["norm"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        seen["lrs"] = [g["lr"] for g in opt.param_groups]
        return real_step(*a, **k)

    opt.step = recording_step
    batch = fixed_batches(1)[0]
    figures = train.train_step(model, opt, lambda: batch, 0.0123, 1, 0.05, NO_CTX)
    assert figures["grad_norm"] > 0.05                          # the logged norm is the one before clipping
    assert seen["norm"] == pytest.approx(0.05, rel=1e-4)   # the optimizer saw clipped gradients
    assert seen["lrs"] == [0.0123, 0.0123] == [figures["lr"]] * 2  # and this step's scheduled LR


@pytest.mark.parametrize("lr_schedule", SCHEDULES)  # every choice config.py offers
def test_a_run_of_steps_takes_each_step_at_get_lr_of_its_share_of_the_steps_after_the_warmup(shakespeare_head,
                                                                                             tmp_path, lr_schedule):
    cfg = tiny_train_config(shakespeare_head, tmp_path, max_steps=12, warmup_steps=4, log_interval=1,
                            eval_interval=100, lr_schedule=lr_schedule)
    history = train.train(tiny_model_config(), cfg)["history"]
    lrs = [row["lr"] for row in history if row["kind"] == "train"]  # a row per step: log_interval 1
    progress = [max(0, step - 4) / (12 - 4) for step in range(12)]  # (step - warmup_steps) / (max_steps - warmup_steps)
    assert lrs == pytest.approx([get_lr(step, p, cfg) for step, p in enumerate(progress)], rel=1e-6)


def test_gradients_are_zeroed_each_step():
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights stay put, grads are comparable
    batch = fixed_batches(1)[0]
    train.train_step(model, opt, lambda: batch, 0.0, 1, 0.0, NO_CTX)
    first = [p.grad.clone() for p in model.parameters()]
    train.train_step(model, opt, lambda: batch, 0.0, 1, 0.0, NO_CTX)
    assert all(torch.allclose(a, p.grad) for a, p in zip(first, model.parameters()))


def test_gradient_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    twin = copy.deepcopy(model)
    (x, y), = fixed_batches(1, batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train.train_step(model, opt, lambda: (x, y), 0.0, 1, 0.0, NO_CTX)
    micro = iter([(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)])
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.0)
    train.train_step(twin, twin_opt, lambda: next(micro), 0.0, 4, 0.0, NO_CTX)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4)


def test_a_runs_step_trains_on_the_whole_batch_in_its_micro_batches(shakespeare_head, tmp_path, monkeypatch):
    drawn, draw = [], train.get_batch

    def counted(*args):  # the sequences of each draw a step takes (an evaluation draws without a graph)
        x, y = draw(*args)
        drawn.extend([len(x)] if torch.is_grad_enabled() else [])
        return x, y
    monkeypatch.setattr(train, "get_batch", counted)
    cfg = tiny_train_config(shakespeare_head, tmp_path, max_steps=3, batch_size=8, grad_accum_steps=2)
    train.train(tiny_model_config(), cfg)
    assert drawn == [4] * 6  # 3 steps of 2 micro-batches of 4


def test_evaluation_runs_in_eval_mode_without_a_graph():
    model = GPT(tiny_model_config(dropout=0.1))
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled(), o[0].requires_grad)))
    batches = fixed_batches(3)
    it = iter(batches * 2)
    losses = train.estimate_loss(model, {"train": lambda: next(it), "val": lambda: next(it)}, 3, NO_CTX)
    assert set(losses) == {"train", "val"}
    assert seen and all(s == (False, False, False) for s in seen)
    assert model.training  # back to training mode afterwards


def test_tiny_run_learns_well_below_uniform(shakespeare_head, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_train_config(shakespeare_head, tmp_path, max_steps=200, eval_interval=200, eval_iters=5, lr=1e-2,
                            min_lr=1e-3, batch_size=16, warmup_steps=10, plots=True)
    result = train.train(tiny_model_config(n_embd=64, block_size=32), cfg, preset="test")
    baseline = math.log(len(set(open(shakespeare_head).read())))
    assert result["history"][0]["val_loss"] == pytest.approx(baseline, abs=0.15)
    assert result["best_val_loss"] < baseline - 1.3
    for name in ("best.pt", "last.pt", "history.csv", "history.json", "loss.png", "lr.png", "grad_norm.png"):
        assert os.path.getsize(tmp_path / name) > 0


@pytest.mark.parametrize("eval_interval", [400, 1])  # 1: an evaluation right after the overfit step must not undo it
def test_model_overfits_one_batch(shakespeare_head, tmp_path, eval_interval):
    torch.manual_seed(0)
    cfg = tiny_train_config(shakespeare_head, tmp_path, max_steps=400, eval_interval=eval_interval, lr=1e-2,
                            min_lr=1e-2, warmup_steps=0, batch_size=4, weight_decay=0.0)
    result = train.train(tiny_model_config(n_embd=64, block_size=16), cfg, RunOptions(overfit_batch=True))
    assert result["stop_reason"] == f"overfit_batch: loss below 0.01 at step {result['step']}"  # it stopped there
    assert result["step"] < 400


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(pos="rope", norm="rmsnorm", mlp="swiglu")).eval()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, checkpoint_of(model))
    loaded = model_from_checkpoint(load_checkpoint(path), path).eval()
    idx = torch.randint(0, 65, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])


def test_checkpoint_contents(shakespeare_head, tmp_path):
    train.train(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path, max_steps=5))
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    for key in ("model", "model_config", "tokenizer", "optimizer", "step", "best_val_loss", "train_config", "rng"):
        assert key in ckpt
    assert ckpt["step"] == 5 and ckpt["tokenizer"]["kind"] == "char"


def without_timings(history):
    return [{k: v for k, v in row.items() if k not in ("seconds", "ms_per_step", "tok_per_s")} for row in history]


@pytest.mark.parametrize("stop_after, signum, code", [(7, signal.SIGTERM, 143), (10, signal.SIGINT, 130)])
def test_interrupted_and_resumed_run_is_bit_identical(shakespeare_head, tmp_path, monkeypatch, stop_after, signum, code):
    model_cfg = tiny_model_config(dropout=0.1)  # dropout exercises the RNG state too
    full_cfg = tiny_train_config(shakespeare_head, tmp_path / "full", max_steps=20, eval_interval=5)
    full = train.train(model_cfg, full_cfg)

    cut_cfg = tiny_train_config(shakespeare_head, tmp_path / "cut", max_steps=20, eval_interval=5)
    with monkeypatch.context() as m:
        interrupt_at(m, stop_after, signum)
        with pytest.raises(SystemExit) as exit_info:
            train.train(model_cfg, cut_cfg)
    assert exit_info.value.code == code
    assert load_checkpoint(str(tmp_path / "cut" / "last.pt"))["step"] == stop_after
    resumed = train.train(model_cfg, cut_cfg, RunOptions(resume=True))

    assert without_timings(resumed["history"]) == without_timings(full["history"])
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_step_run_saved_without_its_progress_resumes_on_its_schedule(shakespeare_head, tmp_path, monkeypatch):
    """A run by steps saved after its warmup by a version that kept no progress_from (the warmup's end was implied)
    resumes where its schedule was, not from the peak again."""
    full = train.train(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path / "full"))
    cut_cfg = tiny_train_config(shakespeare_head, tmp_path / "cut")
    with monkeypatch.context() as m:
        interrupt_at(m, 12, signal.SIGTERM)
        with pytest.raises(SystemExit):
            train.train(tiny_model_config(), cut_cfg)
    path = str(tmp_path / "cut" / "last.pt")
    checkpoint = load_checkpoint(path)
    assert checkpoint["step"] == 12 > cut_cfg.warmup_steps
    checkpoint["progress_from"] = None
    del checkpoint["progress"]
    save_checkpoint(path, checkpoint)
    resumed = train.train(tiny_model_config(), cut_cfg, RunOptions(resume=True))
    assert without_timings(resumed["history"]) == without_timings(full["history"])


def test_init_from_starts_with_the_weights_and_a_fresh_optimizer(shakespeare_head, tmp_path):
    first = train.train(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path / "a", max_steps=10))
    assert load_checkpoint(str(tmp_path / "a" / "last.pt"))["optimizer"]["state"]  # moments to leave behind
    cfg = tiny_train_config(shakespeare_head, tmp_path / "b", max_steps=2, lr=1e-2, min_lr=1e-2, warmup_steps=0)
    run = train.setup_run(tiny_model_config(), cfg, RunOptions(init_from=str(tmp_path / "a" / "last.pt")))
    a, b = first["model"].state_dict(), run.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the checkpoint's weights, exactly
    assert not run.optimizer.state  # and no moments from the old optimizer
    train.train_loop(run)
    steps = [int(s["step"]) for s in load_checkpoint(str(tmp_path / "b" / "last.pt"))["optimizer"]["state"].values()]
    assert steps and set(steps) == {2}  # AdamW counted this run's two steps, not the old run's twelve
    # with --resume too, as one command that survives disconnects is written: a fine-tune until its own last.pt exists
    run = train.setup_run(tiny_model_config(), dataclasses.replace(cfg, out_dir=str(tmp_path / "c")),
                          RunOptions(resume=True, init_from=str(tmp_path / "a" / "last.pt")))
    assert run.state.step == 0 and not run.state.history and not run.optimizer.state


def poison_at(monkeypatch, call):
    """Before train_step call number call, fill a weight with NaN: that step's loss is not finite."""
    calls, real = {"n": 0}, train.train_step

    def poisoned(model, *a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real(model, *a, **k)
    monkeypatch.setattr(train, "train_step", poisoned)


def test_nan_stops_the_run_and_nothing_non_finite_is_saved(shakespeare_head, tmp_path, monkeypatch):
    poison_at(monkeypatch, 4)
    with pytest.raises(TinyLLMError) as err:
        train.train(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path, max_steps=20))
    message = str(err.value)
    assert "step 3" in message and "--lr" in message and "last.pt" in message
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_ctrl_c_after_a_non_finite_step_stops_with_the_error_and_saves_nothing(shakespeare_head, tmp_path,
                                                                               monkeypatch, capsys):
    poison_at(monkeypatch, 7)
    interrupt_at(monkeypatch, 8, signal.SIGINT)  # between progress lines: the NaN is read by the save
    with pytest.raises(TinyLLMError, match="step 6"):
        train.train(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path, max_steps=20))
    assert "saved" not in capsys.readouterr().out
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["step"] == 5 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_patience_stops_early_and_keeps_the_best(shakespeare_head, tmp_path, monkeypatch):
    vals = iter([2.0, 1.5, 1.6, 1.7, 1.8, 1.9])
    monkeypatch.setattr(train, "estimate_loss", lambda *a, **k: {"train": 1.0, "val": next(vals)})
    result = train.train(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path, max_steps=50, patience=2))
    assert result["step"] == 15   # evals at 0, 5 (best), 10, 15: two without improvement
    best = load_checkpoint(str(tmp_path / "best.pt"))
    assert best["step"] == 5 and best["best_val_loss"] == 1.5


def test_the_patience_count_survives_a_resume(shakespeare_head, tmp_path, monkeypatch):
    vals = iter([2.0, 1.5, 1.6, 1.7, 1.8, 1.9])
    monkeypatch.setattr(train, "estimate_loss", lambda *a, **k: {"train": 1.0, "val": next(vals)})
    cfg = tiny_train_config(shakespeare_head, tmp_path, max_steps=50, patience=2)
    with monkeypatch.context() as m:
        interrupt_at(m, 12, signal.SIGTERM)  # after the evaluation at 10, the first without improvement
        with pytest.raises(SystemExit):
            train.train(tiny_model_config(), cfg)
    assert load_checkpoint(str(tmp_path / "last.pt"))["evals_without_improvement"] == 1
    result = train.train(tiny_model_config(), cfg, RunOptions(resume=True))
    assert result["step"] == 15  # the second evaluation without improvement, as in the run without a break


def test_periodic_checkpoints_keep_the_newest(shakespeare_head, tmp_path):
    train.train(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path, max_steps=20, save_interval=4,
                                                       keep_last=2))
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt_")) == ["ckpt_0000016.pt", "ckpt_0000020.pt"]


def test_corrupt_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    model = GPT(tiny_model_config())
    save_checkpoint(str(good), checkpoint_of(model))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for path, words in [(truncated, "could not be loaded"), (garbage, "could not be loaded"),
                        (foreign, "not a tinyllm checkpoint"), (tmp_path / "missing.pt", "not found")]:
        with pytest.raises(TinyLLMError) as err:
            load_checkpoint(str(path))
        assert str(path) in str(err.value) and words in str(err.value)
        assert "\n" not in str(err.value)


def test_a_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(str(marker)), "model_config": {}, "tokenizer": {}}, evil)
    with pytest.raises(TinyLLMError, match="contains objects other than tensors and plain data") as err:
        load_checkpoint(str(evil))
    assert "weights_only" not in str(err.value) and "trust" not in str(err.value)  # no hint to load it unsafely
    assert not marker.exists()


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    save_checkpoint(path, {"v": torch.arange(10_000.0)})
    real_open = open

    class FullDisk(io.RawIOBase):  # the disk fills up after 20,000 bytes of the new file
        def __init__(self, name):
            self.file, self.written = real_open(name, "wb"), 0

        def writable(self):
            return True

        def write(self, data):
            if self.written + len(data) > 20_000:
                raise OSError(28, "No space left on device")
            self.written += len(data)
            return self.file.write(data)

        def close(self):
            self.file.close()
            super().close()

    monkeypatch.setattr("builtins.open", lambda name, mode="r", *a, **k: FullDisk(name) if ".tmp." in str(name)
                        else real_open(name, mode, *a, **k))
    with pytest.raises((OSError, RuntimeError)):  # (torch reports the disk's error as a RuntimeError)
        save_checkpoint(path, {"v": torch.arange(10_000.0) + 1})
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(10_000.0))  # the old file, whole
    assert os.listdir(tmp_path) == ["last.pt"]  # and no temporary file left behind


# ----------------------------------------------------------------------------- Muon

def test_muon_gives_hidden_matrices_orthogonal_updates_and_adamw_the_rest():
    torch.manual_seed(0)
    g = torch.linalg.qr(torch.randn(96, 32))[0] @ torch.diag(torch.logspace(-1, 0, 32))  # singular values 0.1 to 1
    singular = torch.linalg.svdvals(orthogonalize(g))
    assert 0.5 < singular.min() and singular.max() < 1.3  # a spread of 10x squeezed to about one
    model = GPT(tiny_model_config())
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.0), CPU)
    muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    hidden = [p for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    assert muon == {id(p) for p in hidden} and id(model.wte.weight) not in muon
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = fixed_batch()
    train.train_step(model, opt, lambda: batch, 1e-3, 1, 0.0, NO_CTX)
    for name, p in model.named_parameters():
        change = (p.detach() - before[name]).float()
        if id(p) in muon:  # directions move alike, whatever their gradients: a flat spectrum of the update
            s, g = torch.linalg.svdvals(change), torch.linalg.svdvals(p.grad)
            half = len(s) // 2  # the spread between the largest and the middle singular value
            assert s[0] / s[half] < 2 < g[0] / g[half], name
        else:  # AdamW's first step moves a weight by about the learning rate, g / sqrt(g^2) = +-1 times lr
            assert change.abs().median() == pytest.approx(1e-3, rel=0.05), name


def test_a_muon_run_learns_and_resumes_exactly(shakespeare_head, tmp_path, monkeypatch):
    cfg = tiny_train_config(shakespeare_head, tmp_path / "full", optimizer="muon", max_steps=30, eval_interval=10,
                            lr=1e-2)
    full = train.train(tiny_model_config(), cfg)
    evals = [h["val_loss"] for h in full["history"] if h["kind"] == "eval"]
    assert evals[-1] < evals[0] - 0.5
    cut = tiny_train_config(shakespeare_head, tmp_path / "cut", optimizer="muon", max_steps=30, eval_interval=10,
                            lr=1e-2)
    with monkeypatch.context() as m:
        interrupt_at(m, 13, signal.SIGINT)
        with pytest.raises(SystemExit):
            train.train(tiny_model_config(), cut)
    resumed = train.train(tiny_model_config(), cut, RunOptions(resume=True))
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # Muon's momentum buffers came back too


def test_ctrl_c_during_the_closing_sample_stops_the_process_at_once(shakespeare_head, tmp_path, capsys, monkeypatch):
    """After the loop, a stop signal no longer waits for a step: Ctrl-C while the closing sample is
    written is Python's own KeyboardInterrupt, exit status 130, and the run's checkpoints stay."""
    from conftest import TINY_FLAGS, cli
    from machinery import records

    def interrupted_sample(*args):
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # what pressing Ctrl-C does now
        return "never printed"
    monkeypatch.setattr(records, "closing_sample", interrupted_sample)
    # Ctrl-C as a fresh python process handles it (a test worker may have been left ignoring it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, out, err = cli(capsys, train.main, *TINY_FLAGS, "--sample_tokens", "10", "--max_steps", "4", "--data",
                             shakespeare_head, "--out_dir", tmp_path / "run")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and "interrupted" in err and "never printed" not in out
    assert (tmp_path / "run" / "last.pt").exists()


def test_muons_matrices_step_at_muon_lr_times_the_schedule_and_the_rest_at_the_schedule():
    changes = []
    for muon_lr in (0.02, 0.04):
        torch.manual_seed(0)
        model = GPT(tiny_model_config())
        opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=muon_lr, weight_decay=0.0), CPU)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        batch = fixed_batch()
        train.train_step(model, opt, lambda: batch, 5e-4, 1, 0.0, NO_CTX)  # the schedule's LR: half the peak
        changes.append({n: (p.detach() - before[n]).norm().item() for n, p in model.named_parameters()})
    hidden = "blocks.0.attn.c_attn.weight"
    # muon_lr is the Muon group's peak: at half the peak it steps at half muon_lr, so twice muon_lr moves twice as far
    assert changes[1][hidden] == pytest.approx(2 * changes[0][hidden], rel=1e-4)
    assert changes[1]["wte.weight"] == pytest.approx(changes[0]["wte.weight"], rel=1e-6)  # AdamW's: the schedule alone
