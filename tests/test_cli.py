"""The scripts' command lines (machinery/cli.py): bad input as one `error:` line, --help, the flags'
spellings, running out of memory or disk, --overwrite that never loses a run; stopping train.py's
processes (signals, pipes that close, kill -9); sweep.sh; output in a legacy code page."""

import argparse
import dataclasses
import io
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch
from conftest import (
    ROOT,
    TINY_FLAGS,
    assert_one_line_error,
    check_flags,
    cli,
    script_env,
    through_the_model,
    tiny_model,
)

import generate
import train
from config import (
    PRESETS,
    RunOptions,
    TinyLLMError,
    TrainConfig,
    add_flags,
    check,
    make_config,
    setting,
)
from machinery import checkpoint, devices
from machinery import cli as machinery_cli
from machinery.settings import build_configs, flags
from model import GPT

CPU = torch.device("cpu")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks its runs (POSIX)")


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------- bad input, flags, --help


@pytest.mark.parametrize(
    "argv, word",
    [
        (["--n_embd", "32", "--n_head", "3"], "n_head"),
        (["--dropout", "1"], "dropout"),
        (["--lr", "-1"], "lr"),
        (["--lr", "0.01", "--min_lr", "0.1"], "min_lr"),
        (["--beta1", "1"], "beta1"),
        (["--batch_size", "0"], "batch_size"),
        (["--time_budget", "nonsense"], "time_budget"),
        (["--time_budget", "5m", "--max_steps", "10"], "--max_steps"),
        (["--preset", "nope"], "nope"),
        (["--device", "cuda"], "cuda"),  # CUDA is hidden from the tests: a machine without it
        (["--tag", "a/b"], "tag"),
        (["--seed", "-1"], "seed"),
        (["--threads", "2000"], "threads"),
        (["--data", "missing.txt"], "missing.txt"),
        (["--data_fraction", "0"], "data_fraction"),
        (["--no_such_flag", "1"], "--no_such_flag"),
        (["--init_from", "checkpoints/best.pt"], "finetune.py"),  # another stage's flag: whose
        (["--norm", "bogus"], "norm"),
        (["--plots", "maybe"], "--plots"),
        (["--resume", "checkpoints/last.pt"], "--out_dir"),  # it continues OUT_DIR/last.pt
        (["--grad_accum_steps", "3"], "grad_accum_steps"),  # batch 8
    ],
)
def test_train_refuses_nonsense_in_one_line_and_writes_nothing(
    text_file, tmp_path, capsys, argv, word
):
    # not the preset's five minutes, should it not be refused
    steps = [] if "--time_budget" in argv else ["--max_steps", 2]
    code, _, err = cli(
        capsys,
        train.main,
        *TINY_FLAGS,
        "--data",
        text_file,
        "--out_dir",
        tmp_path / "run",
        *steps,
        *argv,
    )
    assert_one_line_error(code, err, word)
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


def test_flags_take_bare_switches_values_tags_and_the_courses_spellings(capsys):
    argv = [
        "--overwrite",
        "--plots",
        "false",
        "--tag",
        "night",
        "--lr-max",
        "0.01",
        "--warmup",
        "7",
    ]
    given = flags(argv)
    options = make_config(RunOptions, given)
    cfg = build_configs(given, PRESETS["tiny"])[1]
    assert options.overwrite and not cfg.plots
    assert os.path.normpath(cfg.out_dir) == os.path.join("checkpoints", "night")
    assert cfg.lr == 0.01 and cfg.warmup_steps == 7
    assert flags(["--plots", "--preset", "tiny"])["plots"]


def test_the_courses_warmup_stays_the_warmup_beside_a_new_setting_named_warmup_something():
    # a learner's new schedule setting, e.g. warmup_share, must not make --warmup ambiguous
    @dataclasses.dataclass
    class Schedule:
        warmup_steps: int = setting(100, "warmup steps", at_least=0)
        warmup_share: float = setting(0.05, "the warmup's share of the run", at_least=0)

    parser = argparse.ArgumentParser()
    add_flags(parser, Schedule)
    assert vars(parser.parse_args(["--warmup", "7"])) == {"warmup_steps": 7}


@pytest.mark.parametrize("gpu", [False, True])
def test_help_shows_this_machines_preset_and_what_auto_means_here(
    fake_machine, monkeypatch, capsys, gpu
):
    if gpu:  # a CUDA machine: --help must not start CUDA to ask the GPU
        fake_machine(cuda=True, mps=False, gpus=1)
        monkeypatch.setattr(devices, "gpu", lambda *a: pytest.fail("--help asked the GPU"))
    precision = torch.get_float32_matmul_precision()
    code, out, _ = cli(capsys, train.main, "--help")
    torch.set_float32_matmul_precision(precision)  # (a mocked GPU turned TF32 on)
    out = " ".join(out.split())
    preset, device = ("small", "cuda") if gpu else ("tiny", "cpu")
    assert code == 0 and f"'{preset}'" in out and f"{device} here" in out
    for name, value in PRESETS[preset].items():
        assert f"default: {value}, preset {preset})" in out, name
    assert f"(default: 0, {torch.get_num_threads()} here)" in out  # --threads auto


# ----------------------------------------------------------------------------- memory and disk


@pytest.mark.parametrize("memory", ["device", "cpu"])
def test_running_out_of_memory_is_one_line_saying_what_to_try(
    text_file, tmp_path, capsys, monkeypatch, memory
):
    def out_of_memory(n, model):  # the first step's forward pass
        if memory == "cpu":  # the allocator's own error: more bytes than any machine has
            torch.empty(2**62, dtype=torch.uint8)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    through_the_model(monkeypatch, step=out_of_memory)
    code, _, err = cli(
        capsys, train.main, *TINY_FLAGS, "--data", text_file, "--out_dir", tmp_path / "run"
    )
    assert_one_line_error(code, err, "out of memory", "--batch_size")


@pytest.mark.skipif(os.name != "posix", reason="limits a file's size with setrlimit (POSIX)")
@pytest.mark.parametrize("blocked", ["read-only folder", "full disk"])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_previous_file_is_kept(
    trained, tmp_path, capsys, blocked
):
    import resource

    # best.pt, last.pt, history.csv
    run = shutil.copytree(os.path.dirname(trained[0]), tmp_path / "run")
    before = folder_bytes(run)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if blocked == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder all the same")
        run.chmod(0o555)
    else:  # the disk fills up, as the system says it: no file may grow past 20 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        code, _, err = cli(capsys, train.main, "--resume", "--out_dir", run, "--max_steps", 62)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        run.chmod(0o755)
    assert_one_line_error(code, err, "last.pt")
    assert folder_bytes(run) == before  # last.pt as it was, nothing half-written left


def test_overwrite_never_loses_a_run_to_bad_input(trained, tmp_path, capsys):
    # best.pt, last.pt, history.csv
    run = shutil.copytree(os.path.dirname(trained[0]), tmp_path / "run")
    before = folder_bytes(run)
    typo = ["--overwrite", "--data", tmp_path / "typo.txt"]
    for extra, words in (([], ["--overwrite"]), (typo, ["typo.txt"])):
        code, _, err = cli(
            capsys, train.main, *TINY_FLAGS, "--data", trained[1], "--out_dir", run, *extra
        )
        assert_one_line_error(code, err, *words)
        assert folder_bytes(run) == before


# ----------------------------------------------------------------------------- stopping


def left(deadline):
    return max(0, deadline - time.monotonic())


def read_until(fd, prefix, timeout=60, count=1):
    """What fd gives up to the count-th line that starts with prefix."""
    text, deadline = b"", time.monotonic() + timeout
    while sum(line.startswith(prefix) for line in text.split(b"\n")[:-1]) < count:
        assert select.select([fd], [], [], left(deadline))[0], text
        chunk = os.read(fd, 1 << 16)
        assert chunk, text  # the process has ended
        text += chunk
    return text


class Child:
    """train.py's command line (or main's, in cwd) in a process forked from this one, which has
    imported torch: no start-up to pay (exec: `python -X importtime train.py` itself, its imports
    timed on its stderr). Its stdout goes into a pipe: read here (self.stdout) or by another
    process (pipe given), in the encoding given (the interpreter's for PYTHONIOENCODING)."""

    def __init__(
        self, argv, err_file, pipe=None, encoding="utf-8", exec=False, main=train.main, cwd=None
    ):
        if not exec:  # what a run's optimizer imports (torch's compiler: a second or two),
            # imported here once, not again in each forked run
            train.make_optimizer(GPT(tiny_model()), TrainConfig(), CPU)
        read, write = pipe or os.pipe()
        self.stdout = None if pipe else read
        self.err_file, self.status = err_file, None
        self.pid = os.fork()
        if self.pid == 0:
            code = 99
            try:
                os.close(read)  # the reader's end: when the reader goes, the pipe is closed
                os.dup2(write, 1)
                os.dup2(os.open(err_file, os.O_WRONLY | os.O_CREAT), 2)
                if exec:
                    train_py = os.path.join(ROOT, "train.py")
                    script = [sys.executable, "-X", "importtime", train_py, *map(str, argv)]
                    os.execve(sys.executable, script, script_env())
                torch.set_num_threads(1)  # OpenMP's threads are the parent's: using them would hang
                sys.stdout = open(1, "w", encoding=encoding, closefd=False)
                sys.stderr = open(2, "w", encoding=encoding, closefd=False)
                if cwd:
                    os.chdir(cwd)
                machinery_cli.run_cli(main, [str(a) for a in argv])
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc(file=sys.stderr)
                sys.stderr.flush()
            finally:
                os._exit(code)
        if not pipe:
            os.close(write)

    def poll(self):
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status

    def wait(self, timeout=60):
        """(exit status, stdout, stderr) once it has ended; a negative status: the signal that
        ended it."""
        out, deadline = b"", time.monotonic() + timeout
        while self.stdout and select.select([self.stdout], [], [], left(deadline))[0]:
            chunk = os.read(self.stdout, 1 << 16)
            if not chunk:
                break
            out += chunk
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        code = None if self.status is None else os.waitstatus_to_exitcode(self.status)
        self.end()
        return code, out.decode(), open(self.err_file, encoding="utf-8", errors="replace").read()

    def end(self):
        """Killed if still running: a failed test leaves no endless run behind."""
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.status = os.waitpid(self.pid, 0)[1]
        if self.stdout:
            os.close(self.stdout)
            self.stdout = None


def endless_run(text_file, out_dir, *flags):
    return [*TINY_FLAGS, "--data", text_file, "--out_dir", out_dir, "--max_steps", 100_000, *flags]


@pytest.mark.slow
@needs_fork
def test_signals_stop_a_run_that_saves_and_resume_finishes_it_and_kill_9_leaves_a_loadable_file(
    text_file, tmp_path, capsys
):
    # a line every 2 steps, saves at step 0 only; a line and a save every 10 steps
    every = {"sigint": (2, 10**6), "sigterm": (2, 10**6), "sigkill": (10, 10)}
    argv = {
        name: endless_run(
            text_file, tmp_path / name, "--log_interval", n, "--eval_interval", m, "--resume"
        )
        for name, (n, m) in every.items()
    }
    # the Ctrl-C to `python train.py` itself, started first; while it imports torch, the forked
    # runs are stopped one after the other: no endless run waits for the CPU beside another
    children, results = {}, {}
    try:
        for name in argv:
            children[name] = Child(argv[name], tmp_path / f"{name}.err", exec=name == "sigint")
            if name == "sigint":
                continue
            # after its first progress line, however busy the machine: its steps have begun; for
            # the kill -9, its second: step 10's save is done, and the kill lands likely in step
            # 20's evaluation and save
            read_until(children[name].stdout, b"step", count=1 + (name == "sigkill"))
            os.kill(children[name].pid, getattr(signal, name.upper()))
            results[name] = children[name].wait()
        read_until(children["sigint"].stdout, b"step")
        os.kill(children["sigint"].pid, signal.SIGINT)
        results["sigint"] = children["sigint"].wait()
    finally:
        for child in children.values():
            child.end()
    for name, code in (("sigint", 130), ("sigterm", 143), ("sigkill", -signal.SIGKILL)):
        assert results[name][0] == code and "Traceback" not in results[name][2], results[name]
    assert checkpoint.load(str(tmp_path / "sigkill" / "last.pt"))  # loadable, whenever killed
    saved = {
        name: checkpoint.load(str(tmp_path / name / "last.pt")) for name in ("sigint", "sigterm")
    }
    stopped = [saved[name]["step"] for name in ("sigint", "sigterm")]
    assert min(stopped) > 0
    assert "--resume" in results["sigint"][1] and "--resume" in results["sigterm"][1]
    # python train.py's clock (a time budget's) counts from its start, imports included: its
    # first evaluation comes later on it than the import of torch took, as the process measured it
    torch_us = [
        int(line.split("|")[1])
        for line in results["sigint"][2].splitlines()
        if line.startswith("import time:") and line.split("|")[2].strip() == "torch"
    ]
    first = saved["sigint"]["history"][0]
    assert first["kind"] == "eval" and first["seconds"] > torch_us[0] / 1e6
    code, out, err = cli(capsys, train.main, *argv["sigint"], "--max_steps", stopped[0] + 3)
    assert code == 0 and f"step {stopped[0]}" in out and "done" in out, err
    assert checkpoint.load(str(tmp_path / "sigint" / "last.pt"))["step"] == stopped[0] + 3


class CtrlCWhileALineIsWritten(io.RawIOBase):
    """A terminal that a Ctrl-C reaches while it takes the first progress line."""

    def writable(self):
        return True

    def write(self, data):
        if bytes(data).startswith(b"step") and not getattr(self, "sent", False):
            self.sent = True
            signal.raise_signal(signal.SIGINT)  # its handler runs now, as after a real write
        return len(data)


def test_a_ctrl_c_that_lands_while_a_line_is_written_still_saves(
    text_file, tmp_path, capsys, monkeypatch
):
    terminal = io.TextIOWrapper(io.BufferedWriter(CtrlCWhileALineIsWritten()), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", terminal)
    code, _, err = cli(capsys, train.main, *endless_run(text_file, tmp_path, "--log_interval", 2))
    assert code == 130 and checkpoint.load(str(tmp_path / "last.pt"))["step"] >= 2, err


def test_a_second_ctrl_c_aborts_at_once(text_file, tmp_path, capsys, monkeypatch):
    def ctrl_c_twice(n, model):  # real signals, the second while the first is being honoured
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)

    through_the_model(monkeypatch, step=ctrl_c_twice)
    argv = endless_run(text_file, tmp_path, "--eval_interval", 1000)
    code, out, _ = cli(capsys, train.main, *argv)
    assert code == 130 and "--resume" not in out
    # nothing is written before the first step, and an abort writes nothing
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.slow
@needs_fork
@pytest.mark.skipif(not (shutil.which("tee") and shutil.which("head")), reason="needs tee and head")
def test_a_run_whose_output_pipe_closes_saves_and_stops(text_file, tmp_path):
    """`train.py | tee log` and a Ctrl-C to both: exit 130. `train.py | head`: exit 141, as a pipe's
    writer."""
    children, readers = {}, {}
    for name, reader in (("tee", ["tee", tmp_path / "log"]), ("head", ["head", "-n", "10"])):
        read, write = os.pipe()
        every = 2 if name == "tee" else 1
        argv = endless_run(
            text_file, tmp_path / name, "--log_interval", every, "--eval_interval", 1000
        )
        children[name] = Child(argv, tmp_path / f"{name}.err", pipe=(read, write))
        out = subprocess.PIPE if name == "tee" else subprocess.DEVNULL
        readers[name] = subprocess.Popen(reader, stdin=read, stdout=out)
        os.close(read)  # the pipe's ends are the child's and its reader's alone
        os.close(write)
    try:
        read_until(readers["tee"].stdout.fileno(), b"step")  # its steps have begun
        # the Ctrl-C ends tee first (SIGTERM here: a launcher may have tee ignore SIGINT), and
        # the run's next line meets a closed pipe
        os.kill(children["tee"].pid, signal.SIGSTOP)
        readers["tee"].terminate()
        readers["tee"].wait(60)
        os.kill(children["tee"].pid, signal.SIGINT)
        os.kill(children["tee"].pid, signal.SIGCONT)
        results = {name: child.wait() for name, child in children.items()}
    finally:
        for child in children.values():
            child.end()
        for reader in readers.values():
            reader.kill()
            reader.wait()
        readers["tee"].stdout.close()
    assert results["tee"][0] == 130 and results["head"][0] == 141, results
    for name in ("tee", "head"):
        assert checkpoint.load(str(tmp_path / name / "last.pt"))["step"] > 0
        assert "Resume with: python train.py --resume" in results[name][2]  # said where it shows


# ------------------------------------------------------------------ sweep.sh, a legacy code page

OUTSIDE_CP1252 = "Жили-были→дед и баба⇒ у самого синего моря. Ёж↔ёлка! "  # Cyrillic and arrows


# its tests run on one worker (xdist_group): it runs once
CP1252 = pytest.mark.xdist_group("cp1252_runs")


@pytest.fixture(scope="module")
def cp1252_runs(tmp_path_factory):
    """On a text outside cp1252, printing into pipes in cp1252 (PYTHONIOENCODING=cp1252: what
    Windows gives a redirect): train.py (forked), then generate.py (forked) beside sweep.sh (its
    own processes) with the same settings. {name: (exit status, stdout, stderr)}, and their
    folder."""
    folder = tmp_path_factory.mktemp("cp1252")
    (folder / "text.txt").write_text(OUTSIDE_CP1252 * 200, encoding="utf-8")
    argv = [
        *TINY_FLAGS,
        "--data",
        folder / "text.txt",
        "--out_dir",
        folder / "run",
        "--max_steps",
        3,
        "--sample_tokens",
        30,
    ]
    results = {"train": Child(argv, folder / "train.err", encoding="cp1252").wait()}
    settings = dict(TEMPS="0.8", SEED="7", MAX_NEW_TOKENS="40", PROMPT="Жили")  # sweep.sh's
    sweep = None
    if shutil.which("bash"):
        sweep = subprocess.Popen(
            ["bash", os.path.join(ROOT, "sweep.sh"), "run/best.pt"],
            cwd=folder,
            env=script_env(PYTHONIOENCODING="cp1252", OUT_DIR="sweep", **settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
    try:
        argv = ["run/best.pt", "--temperature", 0.8, "--seed", 7, "--max_new_tokens", 40]
        argv += ["--prompt", "Жили", "--output_file", "plain.txt"]  # the same settings
        generating = Child(
            argv, folder / "generate.err", encoding="cp1252", main=generate.main, cwd=folder
        )
        results["generate"] = generating.wait()
        if sweep:
            out, err = sweep.communicate(timeout=120)
            results["sweep"] = (sweep.returncode, out, err)
    finally:
        if sweep:
            sweep.kill()
    return results, folder


@pytest.mark.slow
@CP1252
@needs_fork
def test_train_and_generate_print_any_character_into_a_legacy_code_page(cp1252_runs):
    results, folder = cp1252_runs
    for code, _, err in (results["train"], results["generate"]):
        assert code == 0 and "Traceback" not in err, err
    sample = results["train"][1].split("sample:", 1)[1]
    # read as UTF-8, and not as \u escapes: characters outside cp1252
    assert set(sample) - set(sample.encode("cp1252", "ignore").decode("cp1252"))
    printed = results["generate"][1].rsplit("wrote", 1)[0]
    assert "Жили" in printed
    assert (folder / "plain.txt").read_text(encoding="utf-8").endswith(printed)


@pytest.mark.slow
@CP1252
@needs_fork
@pytest.mark.skipif(not shutil.which("bash"), reason="sweep.sh needs bash")
def test_sweep_writes_per_temperature_what_a_plain_generate_call_writes(cp1252_runs):
    results, folder = cp1252_runs
    assert results["sweep"][0] == 0, results["sweep"][2]
    written = (folder / "sweep" / "samples_T0.8.txt").read_text(encoding="utf-8")
    assert written == (folder / "plain.txt").read_text(encoding="utf-8")
    assert "temperature=0.8" in written


def test_a_number_setting_may_be_unset_where_its_help_says_so():
    @dataclasses.dataclass(frozen=True)
    class Settings:
        min_p: float = setting(None, "keep tokens this likely at least; none: off", above=0)

        def __post_init__(self):
            check(self)

    assert Settings().min_p is None and Settings(min_p=0.1).min_p == 0.1
    with pytest.raises(TinyLLMError, match="min_p"):
        Settings(min_p=0.0)
    parser = machinery_cli.ArgumentParser()
    add_flags(parser, Settings)
    assert vars(parser.parse_args([])) == {}
    assert vars(parser.parse_args(["--min_p", "0.05"])) == {"min_p": 0.05}
    assert "(default: none)" in parser.format_help()


def test_a_percent_in_a_settings_help_shows_as_written_plain_or_as_argparse_escapes_it():
    @dataclasses.dataclass(frozen=True)
    class Settings:
        warmup_share: float = setting(0.05, "warmup: 5% of the steps", at_least=0)
        decay_share: float = setting(0.2, "decay: the last 20%% of the steps", at_least=0)

    parser = machinery_cli.ArgumentParser()
    add_flags(parser, Settings)
    shown = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "warmup: 5% of the steps" in shown and "decay: the last 20% of the steps" in shown


@pytest.mark.slow  # starts pytest in a process
def test_the_test_command_ends_on_its_summary_with_no_leaked_binding_lines():
    # an optimizer's first step imports torch._dynamo, and with it triton where pip installs it
    test = "tests/test_train.py::test_the_step_clips_before_the_update_at_the_lr_it_is_given"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n0", test],
        cwd=ROOT,
        env=script_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout
    assert "leaked" not in done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("1 passed")


@pytest.mark.parametrize(
    "given, word",
    [
        ("--bogus 1", "--bogus"),
        ("--n_layer 0", "--n_layer"),
        ("--top_p 2", "--top_p"),
        ("--lora_rank 4", "finetune.py"),  # another script's flag
        ("--max_steps 5", "--max_steps"),  # the promise tests set it: the budget's would skip
    ],
)
def test_flags_the_scripts_refuse_are_one_error_line_for_the_promise_tests(capsys, given, word):
    code, out, err = cli(capsys, check_flags, *given.split())
    assert_one_line_error(code, err, word)


@pytest.mark.slow  # starts pytest
def test_pytest_stops_on_a_refused_flag_before_any_test_runs():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n0",
            "--flags=--n_layer 0",
            "tests/test_promises.py",
        ],
        cwd=ROOT,
        env=script_env(),
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 4, done.stdout  # pytest's exit status for a bad option
    assert len(lines) == 1 and lines[0].startswith("ERROR: --flags: --n_layer"), done.stderr
    assert "passed" not in done.stdout and "skipped" not in done.stdout  # no test ran


@pytest.mark.slow  # trains
@pytest.mark.parametrize("preset", ["tiny", "mini", "small"])  # the machines' defaults
def test_a_run_from_a_trained_model_keeps_its_dropout_and_decays_to_0_under_every_preset(
    trained, tmp_path, capsys, preset
):
    import finetune

    flags = ["--init_from", trained[0], "--data", trained[1], "--preset", preset, "--lr", "3e-5"]
    flags += ["--max_steps", 2, "--batch_size", 4, "--eval_iters", 1, "--sample_tokens", 0]
    code, _, err = cli(capsys, finetune.main, *flags, "--out_dir", tmp_path, "--plots", "false")
    assert code == 0, err
    saved = checkpoint.load(str(tmp_path / "last.pt"))
    base = checkpoint.load(trained[0])
    assert saved["model_config"]["dropout"] == base["model_config"]["dropout"]  # not the preset's
    assert saved["train_config"]["min_lr"] == 0 and saved["train_config"]["lr"] == 3e-5


def test_a_fine_tunes_help_shows_what_it_takes_from_a_trained_model_on_a_gpu(fake_machine, capsys):
    import finetune

    fake_machine(cuda=True, mps=False, gpus=1)  # small's dropout is 0.2, its floor 1e-4
    precision = torch.get_float32_matmul_precision()
    code, out, _ = cli(capsys, finetune.main, "--help")
    torch.set_float32_matmul_precision(precision)
    out = " ".join(out.split())
    assert (
        code == 0 and "(default: the checkpoint's)" in out.rsplit("--dropout DROPOUT", 1)[1][:120]
    )
    assert "(default: 0.0, from a trained model)" in out.rsplit("--min_lr MIN_LR", 1)[1][:120]
