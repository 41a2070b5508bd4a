"""Check a change before its commit, in one command. It lints and formats the code, runs every
quick test with your flags, then the time budget's promise, which waits on real seconds. Each part
prints one line; the first part that fails prints its output and ends the check.

    python -m tools.check
    python -m tools.check --pos rope --top_k 5   # the promises with these flags on
"""

import shlex
import subprocess
import sys
import time

from config import GPTConfig, SamplerConfig, TrainConfig, add_flags, make_config
from machinery import cli


def check_flags(flags):
    """Refuses a flag that train.py or generate.py would refuse, in one error line. A refused flag
    would skip the promises, not fail them."""
    parser = cli.ArgumentParser(prog="train.py or generate.py")
    for cls in (GPTConfig, TrainConfig, SamplerConfig):
        add_flags(parser, cls)
    given = vars(parser.parse_args(shlex.split(flags)))
    for cls in (GPTConfig, TrainConfig, SamplerConfig):
        make_config(cls, given)  # checks each value's bounds and choices


def main(argv=None):
    parser = cli.ArgumentParser(
        description="Lint, format and test a change, part by part.",
        epilog="Any other flag is train.py's or generate.py's: the promises run with it.",
    )
    flags = shlex.join(parser.parse_known_args(argv)[1])
    check_flags(flags)
    pytest = [sys.executable, "-m", "pytest", "-q", "-x", f"--flags={flags}"]
    parts = {
        "lint": [sys.executable, "-m", "ruff", "check", "--fix", "."],
        "format": [sys.executable, "-m", "ruff", "format", "."],
        "quick tests": [*pytest, "-m", "not slow"],
        "time budget": [*pytest, "-n0", "-m", "slow", "tests/test_promises.py"],
    }
    for name, command in parts.items():
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        output = (done.stdout + done.stderr).strip()
        cli.log(f"{name}: {output.splitlines()[-1]} ({time.perf_counter() - started:.0f}s)")
        if done.returncode:
            cli.log(output)
            print(f"error: {name} failed: the check stops here", file=sys.stderr, flush=True)
            sys.exit(done.returncode)
    cli.log(f"checked with {flags or 'no flags'}: exact resume, the budget, the KV cache, sampling")


if __name__ == "__main__":
    cli.run_cli(main)
