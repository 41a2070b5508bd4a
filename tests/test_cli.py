"""The scripts as a user runs them, in their own processes: train, kill -9, resume, Ctrl-C,
resume, then sample the same text twice for the same seed; sweep.sh is reproducible; kill -9
never costs a loadable last.pt, neither mid-run nor in the middle of writing a checkpoint."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, TINY_SHAPE, cli, interrupt_at, subprocess_env, write_head
import generate
import train

from machinery.checkpoint import load_checkpoint
from machinery.cli import StopRequest, log


def start_training(*args):
    """python train.py ARGS in its own process, its output readable line by line."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)


def side_by_side(commands, timeout=120, **env):
    """Run python with each argument list at the same time (one thread each: two fill two cores);
    their CompletedProcesses, in order."""
    procs = [subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=subprocess_env(**env)) for args in commands]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:  # a timeout or a failure leaves none of them running
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]


def eval_step(line):
    """The step of an evaluation line ("eval     30/5000 | ..."), or None for any other line."""
    return int(line.split()[1].split("/")[0]) if line.startswith("eval ") else None


def run_until_it_has_saved_after(proc, step):
    """Read the training process's lines until it has evaluated (and saved last.pt) past step."""
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if (eval_step(line) or -1) > step:
            return eval_step(line)


def test_kill_9_then_ctrl_c_then_resume_and_the_same_seed_samples_the_same_text(tmp_path, capsys, monkeypatch):
    """The learner's path through interruptions: kill -9 lands in a training process mid-run
    (after it has saved at least once), and the last.pt left loads; the same command resumes,
    and Ctrl-C then finishes the step, saves and says how to resume; the run resumes to the
    end; the same seed samples the same text in two processes. (The DDP test sends a real
    SIGTERM to a training process; the same handler serves both signals.)"""
    data, out = write_head(tmp_path / "small.txt", 20_000), tmp_path / "run"
    argv = ["--data", data, "--out_dir", out, *TINY_SHAPE, "--max_steps", "5000", "--eval_interval", "20",
            "--eval_iters", "1", "--log_interval", "10", "--sample_tokens", "20", "--resume"]
    proc = start_training(*argv)
    try:
        run_until_it_has_saved_after(proc, 0)
        time.sleep(random.Random(0).uniform(0.0, 0.2))
    finally:  # (and a failure above leaves no 5000-step run behind)
        proc.kill()  # SIGKILL: no chance to clean up, maybe in the middle of a save
    proc.wait()
    killed_at = load_checkpoint(str(out / "last.pt"))["step"]
    assert 0 < killed_at < 5000

    interrupt_at(monkeypatch, 15, signal.SIGINT)  # resumed by the same command; Ctrl-C during its 15th step
    code, stopped, err = cli(capsys, train.main, *argv)
    monkeypatch.undo()
    assert code == 130, err
    assert f"saved {out}/last.pt at step {killed_at + 15}. Resume with: python train.py --resume --out_dir {out}" \
        in stopped
    assert load_checkpoint(str(out / "last.pt"))["step"] == killed_at + 15

    code, resumed, err = cli(capsys, train.main, *argv, "--max_steps", killed_at + 35)
    assert code == 0, err
    for words in ("resuming", "preset tiny", "parameters", "tokens per step", "sample:"):
        assert words in resumed
    assert load_checkpoint(str(out / "last.pt"))["step"] == killed_at + 35

    seeded = side_by_side([[os.path.join(ROOT, "generate.py"), out / "best.pt", "--max_new_tokens", "60", "--prompt",
                            "ROMEO:", "--seed", 42]] * 2)
    assert all(r.returncode == 0 and r.stdout.startswith("ROMEO:") for r in seeded), seeded[0].stderr
    assert seeded[0].stdout == seeded[1].stdout  # same seed, two processes, the same text
    code, other, err = cli(capsys, generate.main, out / "best.pt", "--max_new_tokens", "60", "--prompt", "ROMEO:",
                           "--seed", "43")
    assert code == 0 and other.startswith("ROMEO:") and other != seeded[0].stdout, err


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="pauses the run with SIGSTOP (POSIX)")
def test_ctrl_c_on_a_run_piped_into_tee_still_saves(tmp_path):
    """`python train.py | tee log` and Ctrl-C, which ends tee too: the line saying the signal came meets a closed
    pipe, and the run still saves and exits 130."""
    data, out = write_head(tmp_path / "small.txt", 20_000), tmp_path / "run"
    proc = start_training("--data", data, "--out_dir", out, *TINY_SHAPE, "--max_steps", "5000", "--eval_interval",
                          "1000", "--eval_iters", "1", "--log_interval", "10", "--sample_tokens", "0")
    try:
        while not (line := proc.stdout.readline()).startswith("step     20/"):
            assert line, proc.stderr.read()
        proc.send_signal(signal.SIGSTOP)  # the run paused: tee goes and Ctrl-C comes in whichever order
        proc.stdout.close()
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        code = proc.wait(timeout=60)
    finally:  # a failure leaves no 5000-step run behind
        proc.kill()
    assert code == 130, proc.stderr.read()
    assert load_checkpoint(str(out / "last.pt"))["step"] >= 20


def test_a_reader_gone_stops_a_training_loop_to_save_and_anything_else_at_once(monkeypatch):
    """`| head`: in a training loop (StopRequest) a line to a closed pipe asks it to save and stop (exit 141, a pipe's
    writer's), and a Ctrl-C after it is still a first Ctrl-C; before or after the loop it ends the script (141)."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    monkeypatch.setattr(sys, "stdout", os.fdopen(write, "w"))
    with pytest.raises(BrokenPipeError):
        log("eval 0")
    with StopRequest(announce=True) as stop:
        log("step 10")
        assert stop.signum == StopRequest.OUTPUT_GONE == 141 - 128
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # no KeyboardInterrupt: save, then exit 130
        assert stop.signum == signal.SIGINT


def test_a_second_ctrl_c_aborts_at_once():
    with StopRequest(announce=False) as stop:
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # the first asks the loop to save and stop
        assert stop.signum == signal.SIGINT
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # a later SIGTERM still just asks
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # a second Ctrl-C does not wait


@pytest.mark.skipif(shutil.which("bash") is None, reason="sweep.sh needs bash")
def test_sweep_script_writes_reproducible_files_with_generate_defaults(trained, tmp_path):
    sweeps = [subprocess.Popen(["bash", os.path.join(ROOT, "sweep.sh"), str(trained[0] / "best.pt")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=subprocess_env(TEMPS="1.0", TOP_KS="5", MAX_NEW_TOKENS="20",
                                                  OUT_DIR=str(tmp_path / run_dir)))
              for run_dir in ("a", "b")]  # side by side: one thread each
    outputs = []
    for sweep, run_dir in zip(sweeps, ("a", "b")):
        _, err = sweep.communicate(timeout=120)
        assert sweep.returncode == 0, err
        outputs.append({p.name: p.read_text() for p in (tmp_path / run_dir).iterdir()})
    assert sorted(outputs[0]) == ["samples_T1.0_k5.txt"]
    assert outputs[0] == outputs[1]
    text = outputs[0]["samples_T1.0_k5.txt"]
    assert "temperature=1.0 top_k=5" in text
    assert "seed=1337" in text and "num_samples=1" in text  # generate.py's own defaults


# ----------------------------------------------------------------------------- kill -9 inside a save

# The crash test for the checkpoint writer. One process imports torch once, then forks a writer
# for each round, which saves checkpoints 1, 2, 3, ... of a few MB as fast as it can, saying
# over a pipe when each one is complete. The driver kills it with SIGKILL, at a random moment
# or at one the round arranges inside the write (half-way through the bytes; after the bytes
# but before the rename), and then loads last.pt as tinyllm does, reporting what it found.
WRITER_CRASHES = textwrap.dedent("""
    import builtins, io, json, os, random, signal, sys, time
    sys.path.insert(0, {root!r})
    import torch
    from machinery.checkpoint import load_checkpoint, save_checkpoint

    path, rounds = sys.argv[1], sys.argv[2].split(",")
    real_open, real_replace = builtins.open, os.replace

    def checkpoint(n):
        return {{"model": {{"w": torch.full((1 << 19,), float(n))}}, "model_config": {{}}, "tokenizer": {{}}, "step": n}}

    def writer(pipe, arranged):
        def stop_here():
            os.write(pipe, b"!")
            time.sleep(60)
        class HalfThenStop(io.RawIOBase):  # the writer stops with half of the 2 MiB file written
            def __init__(self, name):
                self.file, self.written = real_open(name, "wb"), 0
            def writable(self):
                return True
            def write(self, data):
                if self.written + len(data) > 1 << 20:
                    self.file.flush()
                    stop_here()
                self.written += len(data)
                return self.file.write(data)
        if arranged == "mid_write":
            builtins.open = lambda name, mode="r", *a, **k: (HalfThenStop(name) if n > 1 and ".tmp." in str(name)
                                                             else real_open(name, mode, *a, **k))
        if arranged == "before_rename":
            os.replace = lambda *a: stop_here() if n > 1 else real_replace(*a)
        for n in range(1, 10 ** 6):
            save_checkpoint(path, checkpoint(n))
            os.write(pipe, b".")

    rng = random.Random(0)
    for kind in rounds:
        if os.path.exists(path):
            os.remove(path)
        read, write = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(read)
            writer(write, kind)
            os._exit(0)
        os.close(write)
        complete = 0
        while complete < 1 or (kind == "random" and complete < 3):
            complete += os.read(read, 1) == b"."
        if kind == "random":
            time.sleep(rng.uniform(0, 0.05))
        else:
            while os.read(read, 1) != b"!":
                complete += 1
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        complete += os.read(read, 1 << 16).count(b".")  # saves completed while the kill was on its way
        os.close(read)
        found = load_checkpoint(path)
        print(json.dumps({{"kind": kind, "complete": complete, "step": found["step"],
                           "whole": bool((found["model"]["w"] == found["step"]).all())}}), flush=True)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash test forks its writers (POSIX only)")
def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = tmp_path / "crashes.py"
    script.write_text(WRITER_CRASHES.format(root=ROOT))
    rounds = ["mid_write", "before_rename"] + ["random"] * 5
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "last.pt"), ",".join(rounds)],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["kind"] for r in results] == rounds
    for r in results:
        assert r["whole"], r  # never a mix of two checkpoints
        if r["kind"] == "random":  # the one in flight may or may not have been renamed in yet
            assert r["step"] in (r["complete"], r["complete"] + 1), r
        else:  # killed inside the write of checkpoint 2: checkpoint 1 is what loads
            assert r["step"] == r["complete"] == 1, r
