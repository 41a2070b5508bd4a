"""Check a change before its commit, in one command. It lints and formats the code, runs every
quick test with your flags, then the time budget's promise, which waits on real seconds. Each part
prints one line; the first part that fails prints its output and ends the check. Last, it shows
what the change does: a short run of the micro preset with your flags, and a sample from it.

    python -m tools.check
    python -m tools.check --pos rope --top_k 5   # the promises with these flags on
"""

import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import fields

from config import RunOptions, SamplerConfig, add_flags, make_config, require
from machinery import cli, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLING = {f"--{f.name}" for f in fields(SamplerConfig)}
# what the check's runs set themselves: a flag of these would change the runs, not the model
SET_HERE = ["data", "out_dir", "max_steps", "time_budget", "log_interval", "eval_interval"]
SET_HERE += ["sample_tokens", "plots", *(f.name for f in fields(RunOptions))]


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
    """Refuses, in one error line, a flag that train.py or generate.py would refuse, or one that the
    check sets itself. A refused flag would skip the promises, not fail them."""
    train_flags, sampling_flags = split(flags)
    given = settings.flags(train_flags)  # train.py's own parser, its errors word for word
    set_here = [f"--{name}" for name in given if name in SET_HERE]
    require(not set_here, f"the check sets {' '.join(set_here)} itself: drop it")
    settings.build_configs(given, {})  # checks each value's bounds and choices
    parser = cli.ArgumentParser(prog="generate.py", allow_abbrev=False)
    add_flags(parser, SamplerConfig)
    make_config(SamplerConfig, vars(parser.parse_args(sampling_flags)))


def run(name, command):
    """Runs a part of the check and prints its last line; a part that fails ends the check."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    output = (done.stdout + done.stderr).strip()
    last = output.splitlines()[-1] if output else "done"
    cli.log(f"{name}: {last} ({time.perf_counter() - started:.0f}s)")
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
    here = os.path.realpath(os.getcwd()) == os.path.realpath(ROOT)
    require(
        here, f"run the check in tinyllm's folder, {ROOT}: it lints and tests the folder it is in"
    )
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
