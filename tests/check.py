"""The check after a change of one kind, in one command: docs/flags.md written again from config.py (a new
setting's row), then the tests nearest that kind (docs/changing.md says what each covers).

    python tests/check.py schedule      # or: sampler, model, figure, resume; all: the whole suite
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NEAREST = {  # the pytest arguments of each kind of change: its nearest files whole, and the run tests naming it
    "schedule": ["tests/test_data.py", "tests/test_budget.py", "tests/test_runs.py", "tests/test_train.py",
                 "-k", "test_data or test_budget or lr_schedule or progress or max_steps or get_lr or step_order"],
    "sampler": ["tests/test_model.py", "tests/test_generate_probs.py", "tests/test_runs.py",
                "-k", "not test_runs or top or greedy or temperature or header or beam"],
    "model": ["tests/test_model.py", "tests/test_pictures.py", "tests/test_hf_gpt2.py", "tests/test_decoding.py",
              "tests/test_runs.py", "-k", "not test_runs or start_up"],
    "figure": ["tests/test_runs.py", "tests/test_train.py", "-k", "history or resume"],
    "resume": ["tests/test_runs.py", "tests/test_train.py", "-k", "resume"],  # a resume continues exactly
    "all": [],
}


def main(argv):
    if len(argv) != 1 or argv[0] not in NEAREST:
        print(f"error: give one of {', '.join(NEAREST)}: python tests/check.py schedule", file=sys.stderr)
        sys.exit(2)
    flags = subprocess.run([sys.executable, "config.py"], cwd=ROOT, capture_output=True, encoding="utf-8", check=True)
    with open(os.path.join(ROOT, "docs", "flags.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(flags.stdout)
    print("wrote docs/flags.md from config.py", flush=True)
    sys.exit(subprocess.run([sys.executable, "-m", "pytest", "-q", *NEAREST[argv[0]]], cwd=ROOT).returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
