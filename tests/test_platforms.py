"""What a Windows or a Mac user meets, reproduced where Linux can show it: output in a legacy
code page, text files with a byte-order mark or CRLF line ends, a checkpoint another process
holds open; and the device decisions that only MPS needs, through the project's own functions."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from config import TrainConfig, make_config
from conftest import ROOT, TINY_SHAPE, assert_one_line_error, cli, subprocess_env, tiny_model_config
from deep_dives import beam
from machinery import checkpoint, device
from machinery.device import rng_state, set_rng_state
from model import GPT
from optim import make_optimizer
from machinery.sources import read_text
from tools import prepare
from utils import tokenize

# Cyrillic and arrows: none of it is in cp1252, the code page of a redirect on a Western Windows
OUTSIDE_CP1252 = "Жили-были→дед и баба⇒ у самого синего моря. Ёж↔ёлка! "


def run_script(*argv, cwd):
    env = subprocess_env(PYTHONIOENCODING="cp1252")  # what Windows gives a redirect or a pipe
    return subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], capture_output=True, cwd=cwd,
                          env=env, timeout=300)


def test_text_outside_the_console_code_page_comes_out_whole(tmp_path):
    """train.py's closing sample and generate.py's sample, printed into a pipe in cp1252, and
    --output_file: exit 0, no traceback, the exact text. Every character of this corpus lies
    outside cp1252, so whatever the model writes would fail to encode there."""
    (tmp_path / "text.txt").write_text(OUTSIDE_CP1252.replace(" ", "") * 300, encoding="utf-8")
    done = run_script("train.py", "--data", "text.txt", "--out_dir", "run", *TINY_SHAPE, "--max_steps", "3",
                      "--eval_iters", "1", "--sample_tokens", "30", "--plots", "false", cwd=tmp_path)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode("utf-8", "replace")
    assert "Ж".encode("utf-8") in done.stdout or "→".encode("utf-8") in done.stdout  # (the sample, in UTF-8)
    done = run_script("generate.py", "run/best.pt", "--prompt", "Жили→", "--max_new_tokens", "30", "--seed", "1",
                      "--output_file", "out.txt", cwd=tmp_path)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode("utf-8", "replace")
    written = (tmp_path / "out.txt").read_bytes().decode("utf-8")
    sample = written.strip().splitlines()[-1]  # the prompt and what followed it
    assert sample.startswith("Жили→") and sample in done.stdout.decode("utf-8").splitlines()


def test_a_byte_order_mark_is_not_text(tmp_path, capsys):
    """PowerShell 5.1 and Notepad start a UTF-8 file with a byte-order mark: a Q&A .json with
    one trains, and in a .txt the mark is not a character of the vocabulary."""
    records = [{"question": f"What is {n}?", "answer": f"It is {n}."} for n in range(200)]
    (tmp_path / "qa.json").write_text(json.dumps(records), encoding="utf-8-sig")
    code, _, err = cli(capsys, train.main, "--data", tmp_path / "qa.json", "--out_dir", tmp_path / "run", *TINY_SHAPE,
                       "--max_steps", "2", "--eval_iters", "1", "--sample_tokens", "0", "--plots", "false")
    assert code == 0, err
    (tmp_path / "bom.txt").write_text("To be or not to be\n" * 50, encoding="utf-8-sig")
    assert "\ufeff" not in read_text(str(tmp_path / "bom.txt"))


@pytest.fixture(scope="module")
def crlf_copy(tmp_path_factory):
    """data/input.txt and a copy with Windows line ends, as git's usual checkout there writes it."""
    folder = tmp_path_factory.mktemp("crlf")
    with open(os.path.join(ROOT, "data", "input.txt"), "rb") as f:
        lf = f.read()
    assert b"\r" not in lf
    (folder / "crlf.txt").write_bytes(lf.replace(b"\n", b"\r\n"))
    return os.path.join(ROOT, "data", "input.txt"), str(folder / "crlf.txt"), folder


def test_crlf_and_lf_give_the_same_tokens_and_split_in_memory(crlf_copy):
    lf, crlf, _ = crlf_copy
    a, b = (tokenize(read_text(path)) for path in (lf, crlf))
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)


def test_crlf_and_lf_give_the_same_tokens_and_split_prepared_to_disk(crlf_copy):
    lf, crlf, folder = crlf_copy
    for name, path in (("lf", lf), ("crlf", crlf)):
        prepare.prepare(make_config(TrainConfig, {"data": path}), str(folder / name))
    for split in ("train", "val"):
        a, b = (np.fromfile(folder / name / f"{split}.bin", dtype=np.uint16) for name in ("lf", "crlf"))
        assert len(a) > 0 and np.array_equal(a, b), split


def test_a_checkpoint_held_open_for_a_moment_is_saved_all_the_same(tmp_path, monkeypatch):
    """On Windows a file another process has open cannot be replaced ("Access is denied")
    until it lets go: the save waits and tries again, and the old file is whole meanwhile."""
    path = str(tmp_path / "best.pt")
    checkpoint.save_checkpoint(path, {"step": 1})
    real, refused = os.replace, []

    def held_once(src, dst):
        if not refused:
            refused.append(dst)
            raise PermissionError(13, "Access is denied", dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", held_once)
    checkpoint.save_checkpoint(path, {"step": 2})
    assert refused == [path] and torch.load(path, weights_only=True)["step"] == 2
    assert os.listdir(tmp_path) == ["best.pt"]  # no temporary file left behind


def test_compile_without_a_compiler_is_one_error_line_before_anything_is_written(tmp_path):
    """torch compiles at the first step: a machine without the C++ compiler it needs (Windows
    without Visual C++) hears so in one line before the run writes a checkpoint."""
    (tmp_path / "text.txt").write_text("To be or not to be, that is the question.\n" * 100, encoding="utf-8")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", "text.txt", "--out_dir", "run",
                           *TINY_SHAPE, "--max_steps", "3", "--eval_iters", "1", "--sample_tokens", "0", "--plots",
                           "false", "--compile", "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path,
                          env=subprocess_env(CXX=str(tmp_path / "no-such-compiler")), timeout=300)
    assert_one_line_error(done.returncode, done.stderr, "--compile", "run without --compile")
    assert not list(tmp_path.glob("run/*.pt"))


# ----------------------------------------------------------------------------- a Mac (MPS), through the project's own functions

def test_mocked_mac_adamw_is_not_fused():
    """MPS's fused AdamW refuses float16's skip flag (torch 2.5-2.7) or passes it to a kernel not read
    (2.8 on): on a Mac the optimizer is not fused. The optimizer built for MPS is run here on the CPU."""
    model = GPT(tiny_model_config())
    optimizer = make_optimizer(model, make_config(TrainConfig, {}), torch.device("mps"))
    assert not optimizer.defaults["fused"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert not torch.equal(before["lm_head.weight"], model.lm_head.weight)


class Float64Watch(torch.overrides.TorchFunctionMode):
    """Records every float64 tensor a piece of code makes (torch's public hook for this)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
            self.seen.append(getattr(func, "__name__", str(func)))
        return out


def test_beam_search_holds_no_float64_where_the_device_has_none(monkeypatch):
    """MPS has no float64: there beam search keeps its scores in float32 (score_dtype, run here on
    the CPU), and finds the continuation that float64 finds on this model."""
    assert beam.score_dtype(torch.device("mps")) == torch.float32
    torch.manual_seed(0)
    model = GPT(tiny_model_config()).eval()
    prompt = torch.tensor([[1, 2, 3]])
    new64, total64 = beam.beam_search(model, prompt, 12, 4)
    monkeypatch.setattr(beam, "score_dtype", lambda device: torch.float32)
    with Float64Watch() as watch:
        new32, total32 = beam.beam_search(model, prompt, 12, 4)
    assert watch.seen == [] and torch.equal(new32, new64) and total32 == pytest.approx(total64, rel=1e-5)


def test_a_macs_random_state_is_restored_on_a_mac_and_left_elsewhere():
    """Dropout on a Mac draws from the MPS generator: a resume puts it back as it was saved."""
    saved = {"cuda": [], "mps": torch.arange(8, dtype=torch.uint8)}
    assert device.device_states(saved, SimpleNamespace(gpus=0, mps=True))[1] is saved["mps"]
    assert device.device_states(saved, SimpleNamespace(gpus=0, mps=False))[1] is None


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs a Mac's GPU (MPS)")
def test_on_a_mac_the_gpus_random_state_is_saved_and_restored():
    state = rng_state()
    first = torch.rand(4, device="mps")
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="mps"), first)


def test_an_undecodable_name_in_an_error_line_is_escaped_not_a_crash(tmp_path):
    """A file name Python could not decode (a lone surrogate) in an error line on a cp1252 stderr."""
    script = "import sys; from machinery.cli import run_cli; run_cli(lambda argv: print('bad \\udcff', file=sys.stderr))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT,
                          env=subprocess_env(PYTHONIOENCODING="cp1252"), timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == b"bad \\udcff", done.stderr


@pytest.mark.parametrize("own", [{}, {"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "5"}])
def test_importing_machinery_first_shortens_openmps_spin_unless_the_user_set_it(own):
    """Before torch loads OpenMP, the scripts' first import sets GOMP_SPINCOUNT (a busy second process
    made idle spinning threads slow a 2-core machine), unless the user chose OpenMP's waiting themselves."""
    env = {k: v for k, v in subprocess_env(**own).items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") or k in own}
    done = subprocess.run([sys.executable, "-c", "import machinery, os; print(os.environ.get('GOMP_SPINCOUNT'))"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    expected = {(): "10000", ("OMP_WAIT_POLICY",): "None", ("GOMP_SPINCOUNT",): "5"}[tuple(own)]
    assert done.stdout.strip() == expected, done.stderr
