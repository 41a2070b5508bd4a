"""Check a change before its commit, in one command. It lints and formats the code, runs every
quick test with your flags, then the time budget's promise, which waits on real seconds. Each part
prints one line; the first part that fails prints its output and ends the check. Last, it shows
what the change does: a short run of the micro preset with your flags, and a sample from it.

    python -m tools.check
    python -m tools.check --pos rope --top_k 5   # the promises with these flags on
"""

import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import fields

from config import GPTConfig, SamplerConfig, TrainConfig, add_flags, make_config
from machinery import cli

SAMPLING = {f"--{f.name}" for f in fields(SamplerConfig)}


def split(flags):
    """Returns (train.py's flags, generate.py's) of a list of flags: a sampling rule's go to
    generate.py, the rest to train.py."""
    ours, sampling, to = [], [], []
    for flag in flags:
        if flag.startswith("--"):
            to = sampling if flag.split("=")[0] in SAMPLING else ours
        to.append(flag)
    return ours, sampling


def check_flags(flags):
    """Refuses a flag that train.py or generate.py would refuse, in one error line. A refused flag
    would skip the promises, not fail them."""
    parser = cli.ArgumentParser(prog="train.py or generate.py")
    for cls in (GPTConfig, TrainConfig, SamplerConfig):
        add_flags(parser, cls)
    given = vars(parser.parse_args(flags))
    for cls in (GPTConfig, TrainConfig, SamplerConfig):
        make_config(cls, given)  # checks each value's bounds and choices


def run(name, command):
    """Runs a part of the check and prints its last line; a part that fails ends the check."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    output = (done.stdout + done.stderr).strip()
    cli.log(f"{name}: {output.splitlines()[-1]} ({time.perf_counter() - started:.0f}s)")
    if done.returncode:
        cli.log(output)
        print(f"error: {name} failed: the check stops here", file=sys.stderr, flush=True)
        sys.exit(done.returncode)
    return done.stdout


def show(flags):
    """Prints a 20-step run of the micro preset with the flags, its history's columns, and a
    seeded sample from it, drawn with the KV cache and without."""
    train_flags, sampling_flags = split(flags)
    with tempfile.TemporaryDirectory(prefix="tinyllm-check-") as out:
        steps = ["--max_steps", "20", "--log_interval", "5", "--eval_interval", "10"]
        steps += ["--out_dir", out, "--sample_tokens", "0", "--plots", "false"]
        trained = run(
            "a run", [sys.executable, "train.py", "--preset", "micro", *steps, *train_flags]
        )
        with open(f"{out}/history.csv", encoding="utf-8") as f:
            columns = f.readline().strip()
        sample = [sys.executable, "generate.py", f"{out}/best.pt", "--max_new_tokens", "60"]
        sample += ["--seed", "1", *sampling_flags]
        text = run("a sample", sample)
        same = text == run("a sample without the KV cache", [*sample, "--no_cache"])
    cli.log(f"the run, with {shlex.join(train_flags) or 'the defaults'}:\n{trained.strip()}")
    cli.log(f"history.csv: {columns}")
    cli.log(f"the sample, with {shlex.join(sampling_flags) or 'the defaults'}:\n{text.strip()}")
    cli.log(f"the same without the KV cache: {'yes' if same else 'NO'}")


def main(argv=None):
    parser = cli.ArgumentParser(
        description="Lint, format and test a change, part by part, then show what it does.",
        epilog="Any other flag is train.py's or generate.py's: the promises run with it.",
    )
    flags = parser.parse_known_args(argv)[1]
    check_flags(flags)
    pytest = [sys.executable, "-m", "pytest", "-q", "-x", f"--flags={shlex.join(flags)}"]
    run("lint", [sys.executable, "-m", "ruff", "check", "--fix", "."])
    run("format", [sys.executable, "-m", "ruff", "format", "."])
    run("quick tests", [*pytest, "-m", "not slow"])
    run("time budget", [*pytest, "-n0", "-m", "slow", "tests/test_promises.py"])
    show(flags)
    proved = "exact resume, the budget, the KV cache, sampling"
    cli.log(f"checked with {shlex.join(flags) or 'no flags'}: {proved}")


if __name__ == "__main__":
    cli.run_cli(main)
