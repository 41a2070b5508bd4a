"""Shared fixtures and helpers: tiny models and tiny data, offline, writing only into temporary
folders.

CPU tests run on the CPU whatever the machine has: CUDA is hidden from this process and from every
script a test starts, except the GPU tests (test_gpu.py), which see the GPUs pytest was started
with. The first process to import this file keeps those in USER_CUDA; xdist's workers inherit it."""

import contextlib
import dataclasses
import gc
import io
import os
import shlex
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

USER_CUDA = "TINYLLM_USER_CUDA_VISIBLE_DEVICES"
os.environ.setdefault(USER_CUDA, os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
os.environ["CUDA_VISIBLE_DEVICES"] = ""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import GPTConfig, RunOptions, SamplerConfig, TrainConfig  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--flags",
        default="",
        help='train.py or sampling flags for tests/test_promises.py: --flags="--pos rope"',
    )


def pytest_configure(config):
    """A --flags value that train.py or generate.py would refuse stops pytest in one error line
    before any test runs: under it the promise tests would skip, not fail."""
    given = shlex.split(config.getoption("--flags"))
    if given and not hasattr(config, "workerinput"):  # once, in pytest's own process
        from config import TinyLLMError

        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):  # argparse prints its refusal and exits
                check_flags(given)
        except (TinyLLMError, SystemExit) as refused:
            why = said.getvalue().strip().removeprefix("error: ") or str(refused)
            raise pytest.UsageError(f"--flags: {why}") from None


SAMPLING = {f"--{f.name}" for f in dataclasses.fields(SamplerConfig)}
# what the promise tests set themselves: a flag of these would change the tests, not the model
SET_HERE = ["data", "out_dir", "max_steps", "time_budget", "log_interval", "eval_interval"]
SET_HERE += ["sample_tokens", "plots", *(f.name for f in dataclasses.fields(RunOptions))]


def split(flags):
    """(train.py's flags, generate.py's) of a list of flags: a sampling rule's go to generate.py,
    the rest to train.py."""
    ours, sampling, to = [], [], []
    for flag in flags:
        if flag.startswith("--"):
            to = sampling if flag.split("=")[0] in SAMPLING else ours
        to.append(flag)
    return ours, sampling


def check_flags(flags):
    """Refuses a flag as train.py or generate.py would, word for word, or one that the promise
    tests set themselves."""
    from config import add_flags, make_config, require
    from machinery import cli, settings

    train_flags, sampling_flags = split(flags)
    argv0 = sys.argv[0]
    sys.argv[0] = "train.py"  # argparse names the script in its refusal
    try:
        given = settings.flags(train_flags)  # train.py's own parser
        set_here = [f"--{name}" for name in given if name in SET_HERE]
        require(not set_here, f"the promise tests set {' '.join(set_here)} themselves: drop it")
        settings.build_configs(given, {})  # each value's bounds and choices
        parser = cli.ArgumentParser(prog="generate.py", allow_abbrev=False)
        add_flags(parser, SamplerConfig)
        make_config(SamplerConfig, vars(parser.parse_args(sampling_flags)))
    finally:
        sys.argv[0] = argv0


@pytest.fixture
def flags(request):
    """The train.py flags given to pytest with --flags, as a list."""
    return shlex.split(request.config.getoption("--flags"))


# the files of the longest tests, longest first (test_export.py's group holds test_tools.py's tests
# of transformers too)
LONGEST_FIRST = [
    "test_notebook.py",
    "test_docs.py",
    "test_export.py",
    "test_ddp.py",
    "test_chat.py",
    "test_cli.py",
]


def pytest_collection_modifyitems(items):
    """The slow tests first, the longest files' first: each worker takes the next test, or group
    of tests (xdist_group: those that share a fixture too dear to make twice), as it is free, and
    the two end together on the quick ones."""

    def order(item):
        name = item.path.name
        first = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return item.get_closest_marker("slow") is None, first

    items.sort(key=order)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """Collecting imports torch and the scripts: hundreds of thousands of objects, none of them
    garbage, that live until the process ends. The garbage collector waits until they are made
    (it would go through them again and again meanwhile: seconds), then leaves them out of its
    passes (gc.freeze)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return (yield)
    finally:
        if enabled:
            gc.enable()
        gc.freeze()


def pytest_make_parametrize_id(config, val, argname):
    """A parametrized case's id says what it is: flags as typed, settings as name=value."""
    if dataclasses.is_dataclass(val):
        val = {
            f.name: getattr(val, f.name)
            for f in dataclasses.fields(val)
            if getattr(val, f.name) != f.default
        }
    if isinstance(val, dict):
        return ",".join(f"{k}={v}" for k, v in val.items()) or "defaults"
    if isinstance(val, (list, tuple)):
        return " ".join(map(str, val))
    if isinstance(val, bytes):
        return repr(val[:24])
    return None  # pytest's own


def tree_state():
    done = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        return None
    ours = (line for line in done.stdout.splitlines() if "__pycache__" not in line)
    return sorted(ours)


@pytest.fixture(scope="session", autouse=True)
def tests_leave_the_tree_as_they_found_it():
    before = tree_state()
    yield
    assert tree_state() == before, "the tests changed the checkout"


@pytest.fixture(scope="session", autouse=True)
def cpu_and_offline():
    """A Mac's GPU is hidden as CUDA is; a connection anywhere but this machine fails at once.
    One torch thread: tiny models gain nothing from a second, and xdist's workers share the cores.
    (torch is imported here, not above: xdist's controller, which runs no test, skips it.)"""
    import torch

    # an optimizer's first step imports it (seconds): imported here, it is not in a run's time
    import torch._dynamo  # noqa: F401

    from machinery import devices

    torch.set_num_threads(1)
    real_machine, real_connect = devices.machine, socket.socket.connect

    def local_only(sock, address):
        local = str(address[0]).startswith(("127.", "::1", "local"))
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not local:
            raise OSError(f"a test tried to reach {address[0]}: tests run offline")
        return real_connect(sock, address)

    def without_mps():
        return SimpleNamespace(**(vars(real_machine()) | {"mps": False}))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(devices, "machine", without_mps)
        patch.setattr(socket.socket, "connect", local_only)
        yield


@pytest.fixture
def fake_machine(monkeypatch):
    """pretend(**facts): devices.machine() answers these (cuda, mps, gpus, vendor, amx,
    avx512_bf16, torch)."""
    from machinery import devices

    def pretend(**facts):
        real = devices.machine

        def machine():
            return SimpleNamespace(**(vars(real()) | facts))

        monkeypatch.setattr(devices, "machine", machine)

    return pretend


# ---------------------------------------------------------------------------- data, models, runs


def corpus_head(chars):
    with open(os.path.join(ROOT, "data", "input.txt"), encoding="utf-8") as f:
        return f.read(chars)


@pytest.fixture
def text_file(tmp_path):
    """The first 30,000 characters of the bundled corpus, as a file."""
    path = tmp_path / "head.txt"
    path.write_text(corpus_head(30_000), encoding="utf-8")
    return str(path)


GREEDY = SamplerConfig(temperature=0)  # the likeliest token, every time


def tiny_model(**overrides):
    shape = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return GPTConfig(**(shape | overrides))


def generated(model, idx, max_new_tokens, sampler, use_cache=True):
    """What sampling.generate writes, with or without the KV cache: (B, T + new)."""
    import torch

    from sampling import Context, token_stream

    steps = token_stream(Context(model, use_cache), idx, max_new_tokens, sampler)
    return torch.cat([idx, *(token for token, _ in steps)], dim=1)


def tiny_run(data, out_dir, **overrides):
    """A tiny in-process run's settings: float32 always (--dtype auto times bfloat16 on a CPU that
    has it, and the suite must train alike on every machine); no plots or sample unless a test
    asks. The schedule and weight decay are named, so that a new default changes no test's run."""
    settings = dict(
        data=str(data),
        out_dir=str(out_dir),
        batch_size=8,
        max_steps=20,
        lr=3e-3,
        lr_schedule="cosine",
        weight_decay=0.1,
        min_lr=3e-4,
        warmup_steps=5,
        eval_interval=5,
        eval_iters=2,
        log_interval=10,
        sample_tokens=0,
        device="cpu",
        dtype="float32",
        plots=False,
    )
    return TrainConfig(**(settings | overrides))


def train_run(model_cfg, cfg, options=None, given=None, stage="train"):
    """A run of the stage's script (train, finetune, distill, dpo) on these configs, in this
    process, settled as the script settles its flags' (given: the flags a user typed, checked
    against a resume's or a fine-tune's checkpoint). Its time starts now."""
    import importlib
    import time

    import torch

    from config import RunOptions
    from machinery.settings import Settings, settle_run

    options = options or RunOptions()
    started = time.perf_counter()  # its time from now
    asked = Settings(model_cfg, cfg, options, stage, "custom", torch.device("cpu"), started=started)
    settings = settle_run(asked, given or {})
    return getattr(importlib.import_module(stage), stage)(settings)


def untrained(path, data, model_cfg):
    """A checkpoint of a GPT of random weights whose tokenizer knows data's characters and the
    chat template's tokens: what finetune.py starts from to learn conversations from scratch.
    Seeded: its weights do not depend on which tests ran before it on the worker."""
    import torch

    from config import SPECIAL_TOKENS
    from machinery import checkpoint, sources
    from model import GPT
    from tokenizer import CharTokenizer

    text = "".join(sources.iter_documents(str(data)))
    tokenizer = CharTokenizer.from_text(text, SPECIAL_TOKENS)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size))
    checkpoint.save(str(path), checkpoint.create(model, tokenizer.to_dict(), step=0))
    return str(path)


# the same as flags, for the command line
TINY_FLAGS = (
    "--lr_schedule cosine --n_layer 1 --n_embd 32 --n_head 2 --block_size 16 --batch_size 8 "
    "--device cpu "
    "--dtype float32 --eval_iters 2 --sample_tokens 0 --plots false"
).split()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny model trained 30 steps on the corpus's first 20,000 characters: (best.pt, data)."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "data.txt").write_text(corpus_head(20_000), encoding="utf-8")
    cfg = tiny_run(folder / "data.txt", folder / "run", max_steps=30, eval_interval=15, lr=1e-2)
    train_run(tiny_model(), cfg)
    return str(folder / "run" / "best.pt"), str(folder / "data.txt")


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory):
    """A tiny model fine-tuned 20 steps from random weights on the bundled conversations, with
    dropout 0.1 and a context of 128 tokens: it knows the chat template, a preference pair fits in
    its context, and as a frozen reference it would drop out if it trained (test_dpo.py).
    (best.pt, what it printed: its closing sample among it)."""
    import contextlib
    import io

    from config import RunOptions

    folder, out = tmp_path_factory.mktemp("chat"), io.StringIO()
    data = os.path.join(ROOT, "data", "chat_example.jsonl")
    cfg = tiny_run(data, folder / "run", max_steps=20, eval_interval=20, lr=1e-2, sample_tokens=60)
    start = untrained(folder / "untrained.pt", data, tiny_model(block_size=128))
    options = RunOptions(init_from=start)
    with contextlib.redirect_stdout(out):
        train_run(tiny_model(), cfg, options, {"dropout": 0.1}, stage="finetune")
    return str(folder / "run" / "best.pt"), out.getvalue()


def through_the_stage(monkeypatch, change):
    """Each run started from here hands the loop change(stage, settings) in place of the stage its
    script made: how a test brings a fault or a slow step through what a stage hands the loop (its
    model, its batches, its figures), and not by replacing the lesson's functions."""
    import train

    real_fit = train.fit

    def fit(settings, process, corpus, stage):
        return real_fit(settings, process, corpus, change(stage, settings))

    monkeypatch.setattr(train, "fit", fit)


def through_the_model(monkeypatch, step=None, evaluation=None):
    """Each run started from here steps its stage's model inside one that calls step(n, model) as
    step n (from 1, in that run) goes forward; and evaluation(call, out) -> out at each forward
    pass of an evaluation (numbered from 0 over all the runs: eval_iters of train, then of val),
    out being the model's (logits, loss)."""
    import torch

    evaluations = []  # each evaluation's forward pass, in every run

    class Through(torch.nn.Module):
        def __init__(self, model, micro_batches):
            super().__init__()
            self.model = model
            self.micro_batches = micro_batches
            self.forwards = 0

        def forward(self, *args):
            if self.training and step and self.forwards % self.micro_batches == 0:
                step(self.forwards // self.micro_batches + 1, self.model)
            if self.training:
                self.forwards += 1
            out = self.model(*args)
            if not self.training and evaluation:
                out = evaluation(len(evaluations), out)
                evaluations.append(1)
            return out

    def change(stage, settings):
        model = Through(stage.wrapper, settings.cfg.grad_accum_steps)
        return dataclasses.replace(stage, wrapper=model)

    through_the_stage(monkeypatch, change)


def interrupt_at(monkeypatch, step, signum):
    """The signal arrives during step `step` of the runs started from here."""

    def at(n, model):
        if n == step:
            signal.raise_signal(signum)

    through_the_model(monkeypatch, step=at)


def slow_steps(monkeypatch, seconds):
    """Each step of the runs started from here takes seconds more, in real time: a slow machine."""
    import time

    through_the_model(monkeypatch, step=lambda n, model: time.sleep(seconds))


def last_lr_is_the_schedules_end(cfg, summary):
    """A budget's last step is the last of its plan, the step before max_steps: its LR is
    get_lr's there, whatever the schedule."""
    from machinery import checkpoint
    from train import get_lr

    last = checkpoint.load(str(os.path.join(cfg.out_dir, "last.pt")))
    ended = last["max_steps"] == summary["step"]
    return ended and last["lr"] == get_lr(summary["step"] - 1, summary["step"], cfg)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_state(a, b):
    """Nested dicts, lists and tensors equal, exactly."""
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same_state, a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def without_timings(history):
    timings = ("ms_per_step", "tok_per_s", "seconds")
    return [{k: v for k, v in row.items() if k not in timings} for row in history]


# --------------------------------------------------------------- the scripts, as a user runs them


def script_env(**extra):
    """A script's environment: one thread (two processes share two cores), no GPU, this python."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=path, **extra)


def cli(capsys, main, *argv):
    """A script's main() run in this process as its command line would: (exit code, out, err)."""
    from machinery.cli import run_cli

    try:
        run_cli(main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *words):
    """Bad input: exit status 2 and one `error:` line naming the problem, never a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith("error:"), (code, err)
    for w in words:
        assert w in lines[0], lines[0]
