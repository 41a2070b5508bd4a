"""Tokenizer, corpus split, batches and the learning-rate schedule."""


import pytest
import torch

from config import EOT, TinyLLMError, TrainConfig
from conftest import SCHEDULES, TINY_FLAGS, assert_one_line_error, cli, write_head
from optim import get_lr, progress
import train
from utils import CharTokenizer, get_batch, split_train_val

from machinery.sources import check_long_enough, read_text as load_corpus


def test_char_tokenizer_round_trip():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text))
    assert tok.decode(tok.encode(text)) == text
    assert CharTokenizer(**{"chars": tok.to_dict()["chars"]}).encode(text) == tok.encode(text)


def test_split_is_contiguous_and_unshuffled_and_never_cuts_an_end_of_text():
    text = "".join(chr(65 + i % 26) for i in range(1000))
    train, val = split_train_val(text)
    assert len(train) == 900 and len(val) == 100 and train + val == text
    for start in range(885, 901):  # the 90% cut at 900 falls inside the marker, or just before or after it
        text = "a" * start + EOT + "b" * (1000 - start - len(EOT))
        train, val = split_train_val(text)
        assert train + val == text and (EOT in train) != (EOT in val), start  # whole, in one part


def test_every_batch_target_is_input_shifted_by_one():
    data = torch.arange(500)  # token value == position, so a shift is easy to see
    torch.manual_seed(0)
    for _ in range(20):
        x, y = get_batch(data, 8, 16, torch.device("cpu"))
        assert x.shape == y.shape == (8, 16)
        assert torch.equal(y, x + 1)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(y.max()) < 500


def test_batches_reach_the_last_token():
    data = torch.arange(20)
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        _, y = get_batch(data, 4, 8, torch.device("cpu"))
        seen.update(y.flatten().tolist())
    assert 19 in seen and 0 not in seen


def test_lr_schedule_warmup_cosine_and_floor():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=1100, lr_schedule="cosine")

    def lr(step):  # at the run's progress by its steps: 0 at the end of the warmup, 1 at max_steps
        return get_lr(step, progress(step, cfg), cfg)

    assert lr(0) == pytest.approx(1e-5)            # near zero at the start
    assert lr(99) == pytest.approx(1e-3)           # peak at the end of warmup
    assert lr(100) == pytest.approx(1e-3)
    assert lr(600) == pytest.approx(0.5 * (1e-3 + 1e-4))  # half-way through the cosine
    assert lr(1100) == 1e-4 and lr(5000) == 1e-4   # at min_lr at the end, and held there
    lrs = [lr(s) for s in range(100, 1100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))         # monotone decay
    assert get_lr(500, 0.5, cfg) == lr(600) and get_lr(5, 1.0, cfg) == lr(5)  # progress drives the decay, not the warmup


def test_a_run_of_steps_moves_its_progress_in_equal_shares_from_the_warmups_end_to_1_at_max_steps():
    cfg = TrainConfig(warmup_steps=2, max_steps=10)
    assert [progress(step, cfg) for step in range(12)] == pytest.approx([0, 0, 0] + [k / 8 for k in range(1, 9)] + [1])
    assert progress(30, TrainConfig(warmup_steps=10, max_steps=50)) == 0.5  # the docstring's example


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_falls_from_the_peak_to_near_its_floor_by_the_last_step(schedule):
    """What any shape must do after the warmup: start at the peak, never rise, and be near the floor by the last
    step of a long run (get_lr's floor at progress 1 would hide a shape that ends above it)."""
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, lr_schedule=schedule)
    lrs = [get_lr(10 + k, k / 1000, cfg) for k in range(1000)]  # the 1,000 steps after the warmup, the last at 0.999
    assert lrs[0] == pytest.approx(cfg.lr) and all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] - cfg.min_lr <= 0.01 * (cfg.lr - cfg.min_lr)


def test_the_linear_schedule_falls_in_a_straight_line_to_the_floor():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, lr_schedule="linear")
    assert get_lr(9, 0.0, cfg) == pytest.approx(1e-3)                       # the warmup is the same
    assert get_lr(50, 0.25, cfg) == pytest.approx(1e-3 - 0.25 * 9e-4)       # a quarter of the way down
    assert get_lr(50, 0.75, cfg) - get_lr(50, 0.5, cfg) == pytest.approx(get_lr(50, 0.5, cfg) - get_lr(50, 0.25, cfg))
    assert get_lr(50, 1.0, cfg) == 1e-4


def test_a_schedule_get_lr_has_no_formula_for_is_an_error_not_the_cosine():
    cfg = TrainConfig(warmup_steps=10)
    cfg.lr_schedule = "no_such_shape"  # a choice added to config.py alone
    assert get_lr(5, 0.0, cfg) == cfg.lr * 6 / 10  # the warmup is every shape's
    with pytest.raises(ValueError, match="no_such_shape"):
        get_lr(50, 0.5, cfg)


def test_plot_lr_also_prints_the_schedule_at_every_tenth_of_the_run(tmp_path, capsys):
    code, out, _ = cli(capsys, train.main, "--plot_lr", "--max_steps", "100", "--warmup_steps", "10", "--lr", "1e-3",
                       "--min_lr", "1e-4", "--lr_schedule", "linear", "--out_dir", tmp_path)
    printed = dict(pair.split(": ") for pair in out.split("lr at step ")[1].splitlines()[0].split(", "))
    assert code == 0 and list(printed) == ["0", "10", "20", "30", "40", "50", "60", "70", "80", "90", "100"]
    assert float(printed["10"]) == 1e-3 and float(printed["100"]) == 1e-4  # the peak after the warmup, the floor
    assert float(printed["50"]) == pytest.approx(1e-3 - 40 / 90 * 9e-4, rel=1e-2)  # 40 of the line's 90 steps down
    assert (tmp_path / "lr_schedule.png").exists()


def test_plot_lr_of_a_run_that_ends_within_its_warmup_prints_the_steps_it_has(tmp_path, capsys):
    code, out, _ = cli(capsys, train.main, "--plot_lr", "--max_steps", "50", "--warmup_steps", "100", "--out_dir",
                       tmp_path)
    printed = dict(pair.split(": ") for pair in out.split("lr at step ")[1].splitlines()[0].split(", "))
    assert code == 0 and list(printed)[-1] == "50" and "100" not in printed


def test_missing_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(TinyLLMError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TinyLLMError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(TinyLLMError, match="block_size 64"):
        check_long_enough(torch.arange(10), 64, "val", "x.txt")


def test_a_split_shorter_than_one_window_is_one_error_line_before_any_training(tmp_path, capsys):
    data = write_head(tmp_path / "short.txt", 150)  # val: 15 characters; block_size 16 needs 17
    code, out, err = cli(capsys, train.main, "--data", data, "--out_dir", tmp_path / "run", *TINY_FLAGS)
    assert_one_line_error(code, err, "the validation split has 15 tokens", "block_size 16")
    assert not (tmp_path / "run" / "last.pt").exists()
