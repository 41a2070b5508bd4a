"""The check after a change of one kind, in one command: docs/flags.md written again from config.py (a new
setting's row), then the tests nearest that kind (docs/changing.md says what each covers) and, for a model variant or
a sampling rule, how many of them ran each setting (a new one's too: window=4: 5 passed, 1 skipped).

    python tests/check.py schedule      # or: sampler, model, figure, resume; all: the whole suite
    python tests/check.py try --window 4 -- --min_p 0.1                # your new flags (these two are examples)
    python tests/check.py sampler try -- --min_p 0.1                   # both in one command

try: a run of seconds with the training flags given (its start-up line: a model variant shows there; its last
progress line and history.csv's columns: a new figure shows there; its schedule at every tenth: a new shape shows
there; its ms/step beside the same run's without the flags: a variant's cost), the same run resumed from its
half-way checkpoint (the lines after it must be the same), a time budget's closing line (its last LR at the floor;
10 s, or the first run's time if longer), and a sample past block_size with the generate.py flags after "--" (its
first lines shown, and the same seed's without them), with the KV cache and without (the same text). After a kind,
try runs the stages that kind can change (STAGES: a sampling rule, the sample alone); try alone runs them all.
Skipped tests are listed with their reasons (a GPU's, a Mac's).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from config import GPTConfig, Sampler, TrainConfig  # noqa: E402 (the repository's own, whichever folder this runs from)

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


def run(*args):
    """A script of the repository with args: its output; a failure stops the check with the script's own error."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, encoding="utf-8")
    if done.returncode:
        sys.exit(f"error: python {' '.join(args)} failed:\n{done.stderr.strip()}")
    return done.stdout


def after(lines, step):
    """The step and eval lines after step, without their timings (ms/step, tok/s, ETA differ run to run)."""
    kept = [re.sub(r" \| [0-9.,]+ ms/step.*", "", line) for line in lines.splitlines()]
    return [line for line in kept if re.match(r"(step|eval) +(\d+)/", line) and int(line.split()[1].split("/")[0]) > step]


def variant_names(kind):
    """What the tests' names say of each setting a kind of change adds: a model's choices ('rope'), its on/off
    settings flipped ('bias=False') and its numbers at example= ('window=4'); a sampling rule's name ('top_p')."""
    if kind == "sampler":
        return [f.name for f in fields(Sampler)]
    if kind != "model":
        return []
    return [c for f in fields(GPTConfig) for c in f.metadata["choices"] or ()] + [
        f"{f.name}={not f.default}" for f in fields(GPTConfig) if f.type is bool] + [
        f"{f.name}={f.metadata['example']}" for f in fields(GPTConfig) if f.metadata.get("example") is not None]


def tests_naming(report, names):
    """'name: N passed, M skipped' for each name, from the tests that ran it (a pytest --junitxml report)."""
    counts = {name: Counter() for name in names}
    for case in ET.parse(report).iter("testcase"):
        params = re.search(r"\[(.*)\]$", case.get("name", ""))
        outcome = next((tag for tag in ("failure", "error", "skipped") if case.find(tag) is not None), "passed")
        for name in names:
            if params and name in re.split(r"-(?=[a-z])", params.group(1)):
                counts[name][outcome] += 1
    return [f"{name}: " + (", ".join(f"{n} {outcome}" for outcome, n in c.items()) or "no test") for name, c in
            counts.items()]


# what try runs after its first run, for each kind of change (a kind not named, or none: all of them)
STAGES = {"schedule": ("lr", "resume", "budget"), "sampler": ("sample",),
          "model": ("speed", "resume", "budget", "sample"), "figure": ("resume",), "resume": ("resume",)}


def try_it(train_flags, sample_flags, kind=None):
    """A change end to end: exact resume, a budget's floor, the cache against recomputation (see the top)."""
    stages = STAGES.get(kind, ("lr", "speed", "resume", "budget", "sample"))
    default = TrainConfig()  # speedrun's small, fast model, with the default schedule and floor (a change may set them)
    quick = ["--preset", "speedrun", "--lr_schedule", default.lr_schedule, "--min_lr", f"{default.min_lr:g}",
             "--warmup_steps", "10", "--log_interval", "10", "--dtype", "float32", "--overwrite", *train_flags]
    print("python train.py " + " ".join(quick), flush=True)  # the flags each run starts from
    with tempfile.TemporaryDirectory(prefix="tinyllm-try-") as tmp:
        whole = os.path.join(tmp, "whole")
        started = time.perf_counter()
        straight = run("train.py", *quick, "--max_steps", "60", "--save_interval", "30", "--out_dir", whole)
        seconds = max(10, round(time.perf_counter() - started))  # a budget the machine's pace fits, loaded or not
        print("start-up: " + next(line for line in straight.splitlines() if line.startswith("model ")))
        print("last progress line: " + [line for line in straight.splitlines() if line.startswith("step")][-1])
        with open(os.path.join(whole, "history.csv"), encoding="utf-8") as f:
            print("history.csv columns: " + f.readline().strip())
        if "speed" in stages and train_flags:  # the flags' cost: the same run without them
            plain = run("train.py", *quick[:len(quick) - len(train_flags)], "--max_steps", "60", "--out_dir",
                        os.path.join(tmp, "plain"))
            mine, theirs = ms_per_step(straight), ms_per_step(plain)
            if mine and theirs:  # (a --log_interval of 60 or more prints one progress line: nothing to compare)
                print(f"ms/step after the first progress line, one run each: {mine:.1f} with {' '.join(train_flags)}, "
                      f"{theirs:.1f} without ({mine / theirs:.2f}x)")
        if "lr" in stages:
            lrs = run("train.py", *quick, "--max_steps", "60", "--plot_lr", "--out_dir", os.path.join(tmp, "plot"))
            print("".join(line for line in lrs.splitlines(keepends=True) if line.startswith("lr at step")), end="")
        same = "resume" not in stages or try_resume(straight, whole, os.path.join(tmp, "resumed"))
        if "budget" in stages:
            budget = run("train.py", *quick, "--time_budget", f"{seconds}s", "--out_dir", os.path.join(tmp, "budget"))
            print("".join(line for line in budget.splitlines(keepends=True) if " used, " in line), end="")
        if sample_flags and "sample" not in stages:
            print(f"({kind} try samples nothing: the generate.py flags {' '.join(sample_flags)} were not used)")
        cached_same = "sample" not in stages or try_sample(os.path.join(whole, "best.pt"), sample_flags)
        return 0 if same and cached_same else 1


def ms_per_step(lines):
    """The mean ms/step of a run's progress lines but the first (its steps include the start-up's warm-up)."""
    times = [float(ms.replace(",", "")) for ms in re.findall(r"([0-9.,]+) ms/step", lines)][1:]
    return sum(times) / len(times) if times else None


def try_resume(straight, whole, resumed):
    """Whether the run resumed from its step-30 checkpoint prints the straight run's lines after it."""
    os.makedirs(resumed)
    shutil.copy(os.path.join(whole, "ckpt_0000030.pt"), os.path.join(resumed, "last.pt"))
    again = run("train.py", "--resume", "--out_dir", resumed)
    same = after(straight, 30) == after(again, 30) and after(straight, 30)
    print("resume from step 30: " + (f"the same {len(after(straight, 30))} lines" if same else "DIFFERENT:"))
    if not same:
        print("\n".join(["straight:", *after(straight, 30), "resumed:", *after(again, 30)]))
    return bool(same)


def try_sample(checkpoint, sample_flags):
    """A sample past block_size with the flags, and whether the KV cache's text is recomputation's."""
    sample = ["generate.py", checkpoint, "--max_new_tokens", "200", "--seed", "42", *sample_flags]
    cached, recomputed = run(*sample), run(*sample, "--no_cache")
    print("sample: " + " / ".join(cached.strip().splitlines()[:3]))
    if sample_flags:  # the same seed without them: a rule that changes the odds changes the text
        plain = run(*sample[:-len(sample_flags)])
        print("without " + " ".join(sample_flags) + ": " + ("the same text" if plain == cached else
                                                            " / ".join(plain.strip().splitlines()[:3])))
    print("sample past block_size, with the cache and without: " + ("the same text" if cached == recomputed
                                                                      else "DIFFERENT"))
    return cached == recomputed


def try_flags(rest):
    """try's arguments: (training flags, generate.py flags after "--")."""
    split = rest.index("--") if "--" in rest else len(rest)
    return rest[:split], rest[split + 1:]


def main(argv):
    if argv[:1] == ["try"]:
        sys.exit(try_it(*try_flags(argv[1:])))
    if not argv or argv[0] not in NEAREST or (len(argv) > 1 and argv[1] != "try"):
        print(f"error: give one of {', '.join(NEAREST)} (then try and its flags to run it end to end too), or try: "
              f"python tests/check.py schedule try --lr_schedule wsd", file=sys.stderr)
        sys.exit(2)
    flags = subprocess.run([sys.executable, "-m", "tools.flags"], cwd=ROOT, capture_output=True, encoding="utf-8", check=True)
    with open(os.path.join(ROOT, "docs", "flags.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(flags.stdout)
    print("wrote docs/flags.md from config.py (python -m tools.flags)", flush=True)
    with tempfile.TemporaryDirectory(prefix="tinyllm-check-") as tmp:
        report = os.path.join(tmp, "report.xml")
        failed = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", f"--junitxml={report}",
                                 *NEAREST[argv[0]]], cwd=ROOT).returncode
        if names := variant_names(argv[0]):  # a new setting: did tests run it?
            print("the tests that ran each setting: " + "; ".join(tests_naming(report, names)))
    if argv[1:2] != ["try"]:
        print(f"end to end with your flags: python tests/check.py {argv[0]} try [train.py flags] -- [generate.py flags]")
    sys.exit(failed or (try_it(*try_flags(argv[2:]), kind=argv[0]) if argv[1:2] == ["try"] else 0))


if __name__ == "__main__":
    main(sys.argv[1:])
