"""Bad input: one `error:` line and a non-zero exit, never a traceback, checked before long
work starts. Each case runs the script's main() in this process, as its command line would."""

import builtins
import json
import os
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch

import bench
from conftest import TINY_FLAGS, Payload, assert_one_line_error, cli
import generate
import train

from tools import compare, prepare
from machinery.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def bad(trained, tmp_path_factory):
    """Broken files of every kind, built from a good checkpoint."""
    folder = tmp_path_factory.mktemp("bad")
    good = load_checkpoint(str(trained[0] / "last.pt"))

    def variant(name, **changes):
        checkpoint = {**good, **changes}
        for key in [k for k, v in changes.items() if v is None]:
            del checkpoint[key]
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        save_checkpoint(str(folder / name), checkpoint)

    variant("model_tensor.pt", model=torch.zeros(3))
    variant("tokenizer_string.pt", tokenizer="char")
    variant("tokenizer_no_fields.pt", tokenizer={"kind": "char"})
    variant("tokenizer_bpe_no_fields.pt", tokenizer={"kind": "bpe", "tokens": ["61"]})
    variant("tokenizer_too_big.pt", tokenizer={"kind": "char", "chars": [chr(200 + i) for i in range(100)]})
    variant("nan.pt", model={k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                             for k, v in good["model"].items()})
    variant("n_head_float.pt", model_config={**good["model_config"], "n_head": 2.0})
    variant("no_history/last.pt", history=None)
    variant("unknown_key/last.pt", train_config={**good["train_config"], "bogus_setting": 1})

    torch.save({"model": Payload(), "model_config": {}, "tokenizer": {}}, folder / "unsafe.pt")
    with open(folder / "plain.pt", "wb") as f:
        pickle.dump({"model": {}, "model_config": {}, "tokenizer": {}}, f)
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "a_file").write_text("not a folder")
    for name, meta in (("corrupt_meta", "{not json"), ("incomplete_meta", json.dumps({"dtype": "uint16"}))):
        (folder / name).mkdir()
        (folder / name / "meta.json").write_text(meta)
        for split in ("train", "val"):
            np.arange(100, dtype=np.uint16).tofile(folder / name / f"{split}.bin")
    return folder


def test_the_held_out_traceback_cases_are_one_line_errors(bad, trained, tmp_path, capsys, monkeypatch):
    ckpt, data = str(trained[0] / "last.pt"), str(trained[1])
    cases = [
        (generate.main, [ckpt, "--temperature", "1e-45"], "--temperature"),
        (generate.main, [ckpt, "--seed", str(10**30)], "--seed"),
        (generate.main, [ckpt, "--seed", "-1"], "--seed"),
        (generate.main, [ckpt, "--prompt_file", bad / "binary.txt"], "not UTF-8"),
        (generate.main, [ckpt, "--prompt_file", bad / "missing.txt"], "--prompt_file"),
        (generate.main, [ckpt, "--output_file", tmp_path / "no_such_folder" / "out.txt"], "--output_file"),
        (generate.main, [ckpt, "--output_file", tmp_path], "is a folder"),
        (generate.main, [ckpt, "--output_file", bad / "a_file" / "out.txt"], "--output_file"),
        (generate.main, [bad / "model_tensor.pt"], "named tensors"),
        (generate.main, [bad / "tokenizer_string.pt"], "tokenizer"),
        (generate.main, [bad / "tokenizer_no_fields.pt"], "incomplete or malformed"),
        (generate.main, [bad / "tokenizer_bpe_no_fields.pt"], "incomplete or malformed"),
        (generate.main, [bad / "tokenizer_too_big.pt"], "100 tokens"),
        (generate.main, [bad / "nan.pt"], "non-finite"),
        (generate.main, [bad / "n_head_float.pt"], "unreadable model config"),
        (generate.main, [bad / "unsafe.pt"], "contains objects other than tensors and plain data"),
        (generate.main, [bad / "plain.pt"], "contains objects other than tensors and plain data"),
        (train.main, [*TINY_FLAGS, "--data", bad / "corrupt_meta", "--out_dir", tmp_path / "r1"], "meta.json"),
        (train.main, [*TINY_FLAGS, "--data", bad / "incomplete_meta", "--out_dir", tmp_path / "r2"], "meta.json"),
        (train.main, [*TINY_FLAGS, "--data", data, "--resume", "--out_dir", bad / "no_history"], "history"),
        (train.main, [*TINY_FLAGS, "--data", data, "--resume", "--out_dir", bad / "unknown_key"], "bogus_setting"),
        (train.main, [*TINY_FLAGS, "--data", data, "--out_dir", bad / "a_file"], "is a file"),
    ]
    for main, argv, words in cases:
        code, out, err = cli(capsys, main, *argv)
        assert_one_line_error(code, err, words)
        assert "weights_only" not in err and "Weights only" not in err  # no hint to load anything unsafely


def test_every_checkpoint_and_its_prompt_are_checked_before_the_first_is_sampled(trained, bad, capsys, monkeypatch):
    monkeypatch.setattr(generate, "sample", lambda *a, **k: pytest.fail("sampled before checking every checkpoint"))
    for last, words in ((bad / "missing.pt", "not found"), (bad / "nan.pt", "non-finite")):
        code, _, err = cli(capsys, generate.main, trained[0] / "best.pt", last, "--max_new_tokens", 5)
        assert_one_line_error(code, err, words)


def test_an_unwritable_output_file_is_refused_before_sampling(trained, tmp_path, capsys, monkeypatch):
    target = tmp_path / "locked" / "out.txt"
    target.parent.mkdir()
    real_open = builtins.open

    def refusing_open(path, *args, **kwargs):  # chmod means nothing to root, so the OS's answer is mocked
        if str(path) == str(target):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", refusing_open)
    monkeypatch.setattr(generate, "sample", lambda *a, **k: pytest.fail("sampled before checking the output"))
    code, _, err = cli(capsys, generate.main, trained[0] / "last.pt", "--output_file", target)
    assert_one_line_error(code, err, "Permission denied")


@pytest.mark.skipif(os.name != "posix", reason="limits the size of a file with setrlimit (POSIX)")
def test_a_checkpoint_that_cannot_be_written_is_one_line_error(trained, tmp_path, capsys):
    import resource  # a disk that fills up, as the operating system reports it: no file may grow past 20 kB
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        code, _, err = cli(capsys, train.main, *TINY_FLAGS, "--data", trained[1], "--out_dir", tmp_path / "run")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_one_line_error(code, err, "File too large", "last.pt")
    assert not os.listdir(tmp_path / "run")  # no half-written file left


def test_samples_never_replace_a_checkpoint(trained, tmp_path, capsys):
    ckpt = tmp_path / "best.pt"
    shutil.copy(trained[0] / "best.pt", ckpt)
    for target in (ckpt, tmp_path / "." / "best.pt", tmp_path / "other.pt"):
        code, _, err = cli(capsys, generate.main, ckpt, "--max_new_tokens", 5, "--output_file", target)
        assert_one_line_error(code, err, "would replace a checkpoint")
    assert ckpt.read_bytes() == (trained[0] / "best.pt").read_bytes()


def test_running_out_of_device_memory_says_what_to_try(trained, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "train_step", out_of_memory)
    code, _, err = cli(capsys, train.main, *TINY_FLAGS, "--data", trained[1], "--out_dir", tmp_path / "run")
    assert_one_line_error(code, err, "out of memory", "--batch_size", "--grad_accum_steps")


def test_running_out_of_memory_while_a_run_is_set_up_is_one_line_too(trained, tmp_path, capsys, monkeypatch):
    def out_of_memory(run):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "build", out_of_memory)
    code, _, err = cli(capsys, train.main, *TINY_FLAGS, "--data", trained[1], "--out_dir", tmp_path / "run")
    assert_one_line_error(code, err, "out of memory", "--batch_size", "--grad_accum_steps")


def test_running_out_of_a_cpus_memory_is_the_same_one_line(trained, tmp_path, capsys, monkeypatch):
    def too_big(start):  # the CPU allocator's own error, for more bytes (4 EB) than any machine can map
        return torch.empty(2**62, dtype=torch.uint8)
    monkeypatch.setattr(train, "build", too_big)
    code, _, err = cli(capsys, train.main, *TINY_FLAGS, "--data", trained[1], "--out_dir", tmp_path / "run")
    assert_one_line_error(code, err, "out of memory", "--batch_size", "smaller model")


def test_a_plain_pickle_prints_no_torch_warning(bad, capsys):
    with warnings.catch_warnings(record=True) as seen:  # what would reach the user's terminal
        warnings.simplefilter("always")
        code, _, err = cli(capsys, generate.main, bad / "plain.pt")
    assert_one_line_error(code, err, "contains objects other than tensors and plain data")
    assert [str(w.message) for w in seen] == []  # torch's advice about pickle protocols included


@pytest.mark.parametrize("argv, words", [
    (["--lr", "abc"], "--lr"),
    (["--no_such_flag"], "unrecognized"),
    (["--n_embd", "30", "--n_head", "4"], "n_embd (30)"),
    (["--lr", "-1"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--seed", "-5"], "seed"),
    (["--threads", "-2"], "threads"),
    (["--tag", "a/b"], "tag"),
    (["--plots", "maybe"], "--plots"),
    (["--preset", "huge"], "huge"),
    (["--dtype", "float8"], "dtype"),
    (["--data", "/no/such/file.txt"], "not found"),
    (["--eval_only", "/no/such/checkpoint.pt"], "not found"),
])
def test_train_rejects_nonsense_settings(argv, words, tmp_path, capsys):
    code, _, err = cli(capsys, train.main, *argv, "--out_dir", tmp_path / "run")
    assert_one_line_error(code, err, words)
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


def test_data_problems_are_one_line_errors(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be")
    empty_folder = tmp_path / "empty_folder"
    empty_folder.mkdir()
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    for data, words in ((short, "block_size"), (empty_folder, "--data_ext"), (latin1, "not UTF-8")):
        code, _, err = cli(capsys, train.main, *TINY_FLAGS, "--data", data, "--out_dir", tmp_path / "run")
        assert_one_line_error(code, err, words)


def test_other_scripts_reject_bad_input(tmp_path, capsys):
    a_file = tmp_path / "a_file.txt"
    shutil.copy(__file__, a_file)
    cases = [
        (prepare.main, ["--input", tmp_path / "missing.txt", "--out", tmp_path / "out"], "not found"),
        (prepare.main, ["--input", a_file, "--out", a_file], "is a file"),
        (compare.main, [tmp_path, "--out", tmp_path / "c.png"], "history.json"),
        (compare.main, [tmp_path, "--out", tmp_path / "c.txt"], ".png"),
        (prepare.main, ["--input", tmp_path, "--out", tmp_path / "p", "--tokenizer", "bpe", "--vocab_size", "100"],
         "at least 257"),
        (bench.main, ["decoding", "--checkpoint", a_file, "--beams", "4,0", "--out", tmp_path / "d.json"], "--beams"),
        (bench.main, ["decoding", "--checkpoint", a_file, "--temperatures", "1,-1", "--out", tmp_path / "d.json"],
         "temperature"),
        (bench.main, ["scaling", "--budgets", "1", "--out", tmp_path / "s.json"], "--budgets"),
        (bench.main, ["scaling", "--minutes", "nan", "--out", tmp_path / "s.json"], "--minutes"),
        (bench.main, ["scaling", "--minutes", "-1", "--out", tmp_path / "s.json"], "--minutes"),
        (bench.main, ["scaling", "--out_png", tmp_path / "s.txt", "--out", tmp_path / "s.json"], ".png"),
        (bench.main, ["train", "--steps", "0", "--out", tmp_path / "b.json"], "--steps"),
        (bench.main, ["ablation", "--only", "nothing", "--out", tmp_path / "a.json", "--out_md", tmp_path / "a.md"],
         "nothing"),
        (bench.main, ["generate", "--out", tmp_path], "is a folder"),
        (generate.main, ["--top_p", "1.5"], "--top_p"),
        (generate.main, ["--top_k", "-3"], "--top_k"),
        (generate.main, ["--num_samples", "0"], "--num_samples"),
        (generate.main, ["--threads", "100000"], "--threads"),
        (generate.main, ["--prompt", "a", "--prompt_file", __file__], "not both"),
        (generate.main, [tmp_path / "none.pt"], "not found"),
    ]
    for main, argv, words in cases:
        code, out, err = cli(capsys, main, *argv)
        assert_one_line_error(code, err, words)
        assert "measuring" not in out  # (prepare: refused before reading the input)


def test_an_output_in_a_folder_not_made_yet_is_writable_and_nothing_is_left(tmp_path):
    from config import TinyLLMError

    from machinery.cli import check_writable
    path = tmp_path / "checkpoints" / "gpt2.pt"  # as in: python -m machinery.hf_gpt2 import gpt2 --out checkpoints/gpt2.pt
    check_writable(str(path), "--out", make_folder=True)
    assert path.parent.is_dir() and not path.exists()
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(TinyLLMError, match="cannot write --out"):
        check_writable(str(tmp_path / "blocker" / "x.pt"), "--out", make_folder=True)
