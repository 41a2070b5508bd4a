"""Shared fixtures and helpers: tiny models and tiny data, so the whole suite runs in well under
two minutes on a 2-core CPU, offline, writing only into temporary folders."""

import dataclasses
import functools
import os
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

# Tests about CPU behaviour run on the CPU whatever the machine has: CUDA is hidden from this
# process, before torch can start it, and from every script a test runs. The GPU's own tests
# (tests/test_gpu.py) run their scripts in processes that see it, with the environment as the
# user started pytest with. pytest-xdist starts its workers from a process that has imported this
# file already, so the first process to import it keeps the user's value (or that there was none)
# in USER_CUDA, which the workers inherit, and every process reads it from there.
USER_CUDA = "TINYLLM_USER_CUDA_VISIBLE_DEVICES"
os.environ.setdefault(USER_CUDA, os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
GPU_ENV = {} if os.environ[USER_CUDA] == "<unset>" else {"CUDA_VISIBLE_DEVICES": os.environ[USER_CUDA]}
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import GPTConfig, TrainConfig  # noqa: E402

# Tiny models gain little from a second thread; when pytest-xdist runs several workers, each
# takes its share of the cores, so that they do not fight over them.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // WORKERS)))


def _tree_state():
    """Tracked changes, untracked files and ignored files of the checkout (caches aside)."""
    done = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None  # not a git checkout: nothing to compare
    return sorted(line for line in done.stdout.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line)


@pytest.fixture(scope="session", autouse=True)
def tests_leave_the_tree_as_they_found_it():
    """Tests write only into their temporary folders: the checkout must look the same afterwards."""
    before = _tree_state()
    yield
    after = _tree_state()
    if before is not None and after != before:
        raise AssertionError(f"the tests changed the checkout: {sorted(set(after) ^ set(before))}")


@pytest.fixture(scope="session", autouse=True)
def no_mps():
    """On a Mac, too, the tests run on the CPU unless they mock a device on purpose (through
    the project's functions that ask torch, in machinery/device.py: never torch's own, which torch reads too)."""
    from machinery import device
    real = device.machine
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(device, "machine", lambda: SimpleNamespace(**{**vars(real()), "mps": False}))
        yield


@pytest.fixture
def fake_machine(monkeypatch):
    """pretend(**facts): machinery.device.machine() answers these (cuda, mps, gpus, avx512_bf16, amx, torch)."""
    from machinery import device

    def pretend(**facts):
        real = device.machine
        monkeypatch.setattr(device, "machine", lambda: SimpleNamespace(**{**vars(real()), **facts}))
    return pretend


@pytest.fixture(scope="session", autouse=True)
def no_network():
    """Tests never use the network: a connection from this process to anywhere but this machine
    fails at once. (Subprocesses talk only to localhost: torchrun's rendezvous, the notebook's kernel.)"""
    real_connect = socket.socket.connect

    def local_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("localhost", "::1") \
                and not str(address[0]).startswith("127."):
            raise OSError(f"a test tried to reach {address[0]}: tests run offline")
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", local_only)
        yield


# ----------------------------------------------------------------------------- data

@functools.lru_cache(maxsize=None)
def corpus_head(chars):
    """The first chars characters of the bundled corpus (always by its absolute path)."""
    with open(os.path.join(ROOT, "data", "input.txt"), encoding="utf-8") as f:
        return f.read(chars)


def write_head(path, chars):
    """The first chars characters of the corpus, written to path (a pathlib.Path); returns str(path)."""
    path.write_text(corpus_head(chars), encoding="utf-8")
    return str(path)


@pytest.fixture
def shakespeare_head(tmp_path):
    """The first 30,000 characters of the bundled corpus, as a file."""
    return write_head(tmp_path / "head.txt", 30_000)


def fixed_batch(batch_size=4, block_size=16, vocab_size=65, seed=0):
    """A reproducible batch (x, y) of random token ids, y being x shifted by one."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab_size, (batch_size, block_size + 1), generator=g)
    return data[:, :-1], data[:, 1:]


# ----------------------------------------------------------------------------- models and runs

# the model's switches and every combination of them, as config.py offers them: a new choice is tested with no edit
GPT_SWITCHES = {f.name: f.metadata["choices"] for f in dataclasses.fields(GPTConfig) if f.name in ("norm", "mlp", "pos")}
SCHEDULES = next(f for f in dataclasses.fields(TrainConfig) if f.name == "lr_schedule").metadata["choices"]
# the variants the model tests run (the cache, the fused kernel, the pictures' reference, the replayed step): every
# combination of the switches, each on/off setting flipped (bias=False), each number at its setting's example=
# (a window setting with example=4 runs at 4)
MODEL_VARIANTS = [dict(norm=n, mlp=m, pos=p) for n in GPT_SWITCHES["norm"] for m in GPT_SWITCHES["mlp"]
                  for p in GPT_SWITCHES["pos"]] + [
    {f.name: not f.default} for f in dataclasses.fields(GPTConfig) if f.type is bool] + [
    {f.name: f.metadata["example"]} for f in dataclasses.fields(GPTConfig) if f.metadata.get("example") is not None]


def variant_id(variant):
    """A test's name for a variant: 'rmsnorm-swiglu-rope', 'bias=False'."""
    return "-".join(str(v) if k in GPT_SWITCHES else f"{k}={v}" for k, v in variant.items())


def no_tokens(logits):
    """No tokens so far (B, 0), for the sampler tests of next-token logits (B, V) alone."""
    return torch.zeros(logits.size(0), 0, dtype=torch.long)


def tiny_model_config(**overrides):
    values = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    values.update(overrides)
    return GPTConfig(**values)


def tiny_train_config(data, out_dir, **overrides):
    """Settings of a tiny in-process run. float32 always: --dtype auto measures bfloat16 on a CPU
    that has it, and the suite must train alike on every CI machine (the bfloat16 and float16
    paths have tests of their own). No plots unless a test asks: drawing them costs more than
    the training."""
    values = dict(data=data, out_dir=str(out_dir), batch_size=8, max_steps=20, lr=3e-3, min_lr=3e-4,
                  warmup_steps=5, eval_interval=5, eval_iters=2, log_interval=10, sample_tokens=0, device="cpu",
                  dtype="float32", plots=False)
    values.update(overrides)
    return TrainConfig(**values)


def interrupt_at(monkeypatch, step, signum):
    """During train_step call number step, do what the signal does: call the handler the loop
    installed for it (no signal is sent to the test process: tests/test_ddp.py sends a real
    one to a training process; the same handler serves SIGINT and SIGTERM)."""
    import train
    calls = {"n": 0}
    real = train.train_step

    def step_then_signal(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == step:
            signal.getsignal(signum)(signum, None)
        return out
    monkeypatch.setattr(train, "train_step", step_then_signal)


def float32_sum_tolerance(n, total):
    """How far two float32 sums of the same n terms may lie apart when their terms were computed
    by different kernels (a cached and a recomputed context): each term and each addition can
    be off by float32's relative precision (2**-23) of the running total, so n of them by n
    times that, with the total taken as at least 1 (terms near 0 still carry their logits' error)."""
    return 2 * n * 2.0 ** -23 * max(1.0, abs(float(total)))


def checkpoint_of(model, chars=None):
    """A minimal checkpoint dict for a bare model: its weights, its shape, a char tokenizer."""
    import dataclasses
    chars = chars or [chr(33 + i) for i in range(model.config.vocab_size)]
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "tokenizer": {"kind": "char", "chars": chars}}


class Payload:
    """An object whose unpickling runs code (it opens a file for writing): loading any file that
    holds one must be refused before that happens."""

    def __init__(self, target=os.devnull):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def snapshot(folder):
    """Every file of a folder (not recursive) by name, with its bytes."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


def complex_rope(x, cos, sin):
    """RoPE as a complex multiplication: each pair (x[2i], x[2i+1]) is a complex number turned by
    the angle whose cos and sin are given. The reference the real-arithmetic RoPE is checked against."""
    rotation = torch.complex(cos, sin)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def rope_angles(n_positions, head_size, start=0):
    """cos and sin of RoPE's angles, written out from the formula, for the references above."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_size, 2).float() / head_size))
    angles = torch.arange(start, start + n_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


class KernelCalls(torch.overrides.TorchFunctionMode):
    """Within: every call of F.scaled_dot_product_attention, as (q, k, attn_mask), seen through
    torch's public hook for watching its functions (nothing of torch is replaced)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls.append((args[0], args[1], kwargs.get("attn_mask")))
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- the scripts, as a user runs them

def path_with_this_python():
    """PATH with the interpreter running the tests first: a script that starts `python` (sweep.sh,
    the notebook's cells) starts this one, with this environment's packages, whatever PATH holds."""
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def subprocess_env(gpu=False, **extra):
    """The environment of a script run by a test: one thread (two processes share two cores),
    no GPU unless gpu (the environment's own CUDA_VISIBLE_DEVICES, if any), and `python` is
    the interpreter running the tests."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=path_with_this_python(), **extra)
    if gpu:
        env.pop("CUDA_VISIBLE_DEVICES")
        env.update(GPU_ENV)
    return env


def cli(capsys, main, *argv):
    """Run a script's main() in this process, as its command line would: (exit code, stdout, stderr)."""
    from machinery.cli import run_cli
    code = 0
    try:
        run_cli(main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *words):
    """Bad input: exit status 2 and one `error:` line naming the problem, never a traceback."""
    assert code == 2, f"exit status {code}, not 2: {err}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0], lines[0]


# float32 on any CPU, for the same reason as tiny_train_config
TINY_SHAPE = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--batch_size", "8",
              "--device", "cpu", "--dtype", "float32"]
TINY_FLAGS = TINY_SHAPE + ["--eval_iters", "2", "--sample_tokens", "0", "--plots", "false"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny model trained for 60 steps on the first 20,000 characters of the corpus: (run folder, data file)."""
    folder = tmp_path_factory.mktemp("trained")
    data = write_head(folder / "data.txt", 20_000)
    import train
    torch.manual_seed(0)
    cfg = tiny_train_config(data, folder / "run", max_steps=60, eval_interval=30, lr=1e-2)
    train.train(tiny_model_config(), cfg)
    return folder / "run", folder / "data.txt"


@pytest.fixture(scope="session")
def bpe_trained(tmp_path_factory):
    """A tiny byte-level BPE model trained for 10 steps (vocabulary 300) on the corpus's first
    12,000 characters, with é and ö, which BPE merges into one token each, and, in the val
    split only, ŵ, which stays two byte tokens: its best.pt."""
    folder = tmp_path_factory.mktemp("bpe")
    text = corpus_head(12_000).replace("e", "é").replace("o", "ö")
    text = text[:10_800] + text[10_800:].replace("w", "ŵ")  # the val split is the last 10%
    (folder / "data.txt").write_text(text, encoding="utf-8")
    import train
    torch.manual_seed(0)
    train.train(tiny_model_config(vocab_size=300), tiny_train_config(str(folder / "data.txt"), folder / "run",
                tokenizer="bpe", max_steps=10, eval_interval=10))
    return folder / "run" / "best.pt"
