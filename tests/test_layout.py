"""The house rules that keep the code readable: every function of a top-level script fits on a
screen, and the modules import only down the flow of the work, never up it."""

import ast
import glob
import os
import subprocess

import pytest

from conftest import ROOT

# The flow of the work, bottom to top: a module may import from its own level or below.
LEVELS = {
    "config": 0, "cli": 0,
    "model": 1, "bpe": 1, "tokenizer": 1, "optim": 1, "muon": 1,
    "sources": 2, "utils": 2, "device": 2, "precision": 2, "distributed": 2, "checkpoint": 2, "safety": 2,
    "plots": 2,
    "lifecycle": 3, "calibrate": 3, "hf_gpt2": 3, "annotate": 3,
    "train": 4, "generate": 4, "prepare": 4,
    "bench": 5, "pictures": 5,
}
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


def tree(name):
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        return ast.parse(f.read())


def test_every_top_level_module_has_a_place_in_the_flow():
    assert SCRIPTS == sorted(LEVELS)


@pytest.mark.parametrize("name", sorted(LEVELS))
def test_imports_go_down_the_flow(name):
    imported = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    upward = [m for m in imported & set(LEVELS) if LEVELS[m] > LEVELS[name]]
    assert not upward, f"{name} imports {upward}, which sit above it"


@pytest.mark.parametrize("name", sorted(LEVELS))
def test_every_function_fits_on_a_screen(name):
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree(name))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long


# The lesson: the files the README's "Reading the code" asks a learner to read first, in order.
LESSON = ("tokenizer", "utils", "model", "optim", "train")


@pytest.mark.parametrize("name", LESSON)
def test_every_function_of_the_lesson_reads_in_one_go(name):
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree(name))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 40]
    assert not long


@pytest.mark.parametrize("name", sorted(LEVELS))
def test_every_module_says_what_it_is_for(name):
    assert ast.get_docstring(tree(name))


def test_the_readme_lists_every_flag_as_config_py_describes_it():
    import config
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert config.markdown_flags() in readme
    assert config.markdown_flags((config.SampleConfig,)) in readme
    assert config.markdown_presets() in readme


def test_python_config_py_prints_the_tables_the_readme_shows(capsys):
    import config
    config.main()
    printed = capsys.readouterr().out
    tables = [block for block in printed.split("\n\n") if block.startswith("|")]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(tables) == 3 and all(table.strip() in readme for table in tables)


def test_a_virtualenv_made_inside_the_checkout_stays_out_of_git_status():
    for path in (".venv/bin/python", "venv/lib/site.py", "pictures/attention.png", "checkpoints/best.pt"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True)
        if done.returncode == 128:
            pytest.skip("not a git checkout")
        assert done.returncode == 0, f"{path} would show up in git status"
