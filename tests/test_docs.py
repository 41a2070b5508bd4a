"""Every command the README and docs/ show runs as a user types it, under each preset a machine
picks by default: tiny and mini (CPUs) and small (a CUDA GPU's, given here as --preset). The
commands are read from the pages themselves, so a command added to a page is run without an edit
here. Each is shortened, not changed: a few steps of a narrow model on a short text.

A page is a story told in order. The README's starts from a user's files alone; every other page
starts where the README ends (its checkpoints there), and skips what the README already ran."""

import glob
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
from conftest import ROOT, cli, corpus_head, script_env

from config import PRESETS as PRESETS_OF_CONFIG

PRESETS = ("tiny", "mini", "small")  # a CPU's two defaults, and a CUDA GPU's
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
TRAINING = ("train.py", "finetune.py", "distill.py", "dpo.py")
# not run here, each for its reason
NOT_RUN = {
    "pip": "installs packages",
    "pytest": "the tests themselves",
    "ruff": "the linter",
    "torchrun": "several processes: tests/test_ddp.py runs torchrun's",
    "tools.scaling": "dozens of runs of minutes: tests/test_tools.py runs its parts",
}
NARROW = "--n_layer 1 --n_head 2 --n_embd 32 --batch_size 4 --eval_iters 1".split()
# a tool's own way to be short
SHORT = {
    "tools.ablation": ["--max_steps", "2", "--eval_interval", "1", "--only", "vanilla", *NARROW],
    "tools.decoding": ["--new_tokens", "8", "--seeds", "1", "--beams", "2"],
    "tools.pictures": ["--only", "attention", "--temperatures", "0.8"],
}
# a user's own files, that the pages name
USER_FILES = {
    "notes.txt": corpus_head(3_000),
    "mine.txt": corpus_head(3_000),
    "notes/a.md": corpus_head(2_000),
    "notes/b.txt": corpus_head(1_000),
    "corpus.jsonl": "".join(
        json.dumps({"text": line}) + "\n" for line in corpus_head(30_000).split("\n")
    ),
}


def commands(page):
    """[(line number, command)] of a page, in order: each line of its bash blocks (a line ending in
    a backslash goes on), each part of a line joined by &&, and each inline `python ...`."""
    found = []
    language = None  # outside a block
    lines = open(os.path.join(ROOT, page), encoding="utf-8").read().split("\n")
    going_on = ""  # a block's line that ended in a backslash
    for n, line in enumerate(lines, 1):
        if line.startswith("```"):
            language = line[3:] if language is None else None
        elif language in ("bash", "") and line.endswith("\\"):
            going_on += line[:-1]
        elif language in ("bash", ""):
            found += [(n, part.strip()) for part in (going_on + line).split("&&")]
            going_on = ""
        elif language is None:
            found += [(n, span) for span in re.findall(r"`(python [^`]*)`", line)]
    command = r"(\w+=(\"[^\"]*\"|\S+) +)*(python|bash|torchrun|pip) "
    return [(n, c) for n, c in found if re.match(command, c + " ")]


def words(command):
    """({VAR: value} set before it, [its words]), a comment dropped."""
    typed = shlex.split(command, comments=True)
    env = {}
    while typed and re.fullmatch(r"\w+=.*", typed[0]):
        name, value = typed.pop(0).split("=", 1)
        env[name] = value
    return env, typed


def stories():
    """(page, preset) for each page that shows a command, and each preset: a preset's on one
    worker, which runs its README story once."""
    group = pytest.mark.xdist_group
    return [
        pytest.param(page, preset, marks=group(f"docs-{preset}"))
        for preset in PRESETS
        for page in PAGES
        if commands(page)
    ]


def why_not_run(command, preset):
    """Why a command is not run here, under this preset, or None."""
    typed = words(command)[1]
    for word, why in NOT_RUN.items():
        if word in typed[:3]:
            return why
    if "tools.NAME" in typed:
        return "a template: NAME stands for a tool's"
    if typed[0] == "bash" and preset != PRESETS[0]:  # generate.py's run here under each
        return f"a script that starts generate.py's processes: run under {PRESETS[0]} alone"
    return None


def shortened(typed, preset):
    """The words of a training or sampling command, shortened: a few steps of a narrow model."""
    script = typed[1] if typed[1] != "-m" else typed[2]
    args = typed[2:] if typed[1] != "-m" else typed[3:]
    args = without_placeholders(args)
    if script in TRAINING and not {"--help", "--plot_lr"} & set(args):
        args = drop(args, "--time_budget")
        resumed = "--resume" in args
        fresh = not resumed and "--init_from" not in args
        if not resumed:  # a resume keeps its run's settings but how it reports
            args = drop(args, "--max_steps") + ["--max_steps", "2", "--batch_size", "4"]
            if "--preset" not in args:  # the machine's, here given
                args += ["--preset", preset]
        if fresh and "--n_embd" not in args:  # one block of the preset's heads, 8 wide each
            heads = PRESETS_OF_CONFIG.get(args[args.index("--preset") + 1], {}).get("n_head", 4)
            args += ["--n_layer", "1", "--n_embd", str(8 * heads)]
        args += ["--eval_interval", "2"] if not resumed else []
        args += ["--eval_iters", "1", "--sample_tokens", "8", "--plots", "false"]
    elif script in ("generate.py", "chat.py"):
        args = drop(args, "--max_new_tokens") + ["--max_new_tokens", "8"]
    args += SHORT.get(script, [])
    return script, args


def without_placeholders(args):
    """A template's words without its --NAME VALUE and its --flag NAME: what runs of it."""
    kept = []
    value_of_a_placeholder = False
    for word in args:
        if re.fullmatch(r"--[A-Z]{3,}", word):
            value_of_a_placeholder = True
        elif re.fullmatch(r"[A-Z]{3,}", word):
            if not value_of_a_placeholder:
                kept.pop()  # its flag
            value_of_a_placeholder = False
        else:
            kept.append(word)
    return kept


def drop(args, flag):
    """args without flag and its value."""
    if flag not in args:
        return args
    i = args.index(flag)
    return args[:i] + args[i + 2 :]


def run(command, preset, capsys, monkeypatch):
    """Run a command as typed, shortened, in this folder: (exit status, what it printed)."""
    env, typed = words(command)
    if typed[0] == "bash":  # sweep.sh: one temperature, one top-k, one top-p, few tokens
        env = {k: v.split()[0] for k, v in env.items()} | {"MAX_NEW_TOKENS": "8"}
        env |= {k: env.get(k, v) for k, v in dict(TEMPS="0.8", TOP_KS="0", TOP_PS="1.0").items()}
        typed[1] = os.path.join(ROOT, typed[1])
        done = subprocess.run(typed, env=script_env(**env), capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr
    script, args = shortened(typed, preset)
    main = importlib.import_module(script.removesuffix(".py")).main
    typed_in = iter(["Hello!", "/quit"])  # a chat: one message, then leave
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed_in))
    code, out, err = cli(capsys, main, *args)
    return code, out + err


def story(page, preset, folder, capsys, monkeypatch, ran=()):
    """Run a page's commands in order in folder: {(line, command): (exit status, output)} of those
    that ran, and {command: why} of those that did not; ran: commands run before, skipped."""
    results = {}
    skipped = {}
    monkeypatch.chdir(folder)
    for n, command in commands(page):
        why = why_not_run(command, preset)
        if why:
            skipped[command] = why
        elif words(command)[1] not in [words(c)[1] for _, c in [*ran, *results]]:
            results[(n, command)] = run(command, preset, capsys, monkeypatch)
    return results, skipped


README_RUNS = {}  # preset -> (folder, results, skipped): once a process


def readme_story(preset, tmp_path_factory, capsys, monkeypatch):
    if preset not in README_RUNS:
        folder = tmp_path_factory.mktemp(f"readme-{preset}")
        for name, text in USER_FILES.items():
            os.makedirs(folder / os.path.dirname(name), exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
        shutil.copytree(
            os.path.join(ROOT, "data"), folder / "data", ignore=lambda *a: ["input.txt"]
        )
        (folder / "data" / "input.txt").write_text(corpus_head(30_000), encoding="utf-8")
        README_RUNS[preset] = (folder, *story("README.md", preset, folder, capsys, monkeypatch))
    return README_RUNS[preset]


def failures(results):
    """Each command that failed: its line, and the last line it printed."""
    failed = []
    for (page_line, command), (code, out) in results.items():
        last = out.strip().splitlines()[-1] if out.strip() else ""
        if code != 0:
            failed.append(f"{page_line}: {command}\n  exit {code}: {last}")
    return failed


@pytest.mark.slow  # trains for seconds
@pytest.mark.parametrize("page, preset", stories())
def test_every_command_a_page_shows_runs(
    page, preset, tmp_path, tmp_path_factory, capsys, monkeypatch
):
    folder, results, skipped = readme_story(preset, tmp_path_factory, capsys, monkeypatch)
    if page != "README.md":
        shutil.copytree(folder, tmp_path / "work")
        results, skipped = story(page, preset, tmp_path / "work", capsys, monkeypatch, ran=results)
    for command, why in skipped.items():
        print(f"not run: {command} ({why})")
    assert not failures(results), "\n".join(failures(results))
