"""The house rules that keep the code readable: the root holds the design card's scripts and the
lesson; beside it, folders named for whom they serve (machinery/ for a run, tools/, experiments/)
import one way, and no modules import each other in a circle; every function fits on a screen."""

import ast
import collections
import contextlib
import glob
import os
import pkgutil
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT


# The folders by whom they serve, in the one direction imports go: the lesson and its deep dives,
# what a run needs besides them (machinery/), the scripts and stand-alone tools, the experiments.
FOLDERS = ("deep_dives", "machinery", "tools", "experiments")
ENTRY_SCRIPTS = ("train", "generate", "bench")  # what machinery/ and tools/ must never import
# experiments/ drive train.py's own set-up and loop, so they import train; bench.py is their command line
MODULES = sorted([os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))]
                 + [f"{folder}.{os.path.basename(p)[:-3]}" for folder in FOLDERS
                    for p in glob.glob(os.path.join(ROOT, folder, "*.py")) if not p.endswith("__init__.py")])


def folder_rank(name):
    """0: the lesson and deep_dives/; 1: machinery/; 2: the scripts (train.py, generate.py) and tools/;
    3: experiments/ and bench.py, their command line."""
    if "." not in name:
        return {"train": 2, "generate": 2, "bench": 3}.get(name, 0)
    return {"deep_dives": 0, "machinery": 1, "tools": 2, "experiments": 3}[name.split(".")[0]]


@pytest.mark.parametrize("name", MODULES)
def test_the_folders_import_one_way(name):
    upward = [m for m in imports_of(name) if folder_rank(m) > folder_rank(name)]
    assert not upward, f"{name} imports {upward}"


def tree(name):
    with open(os.path.join(ROOT, *name.split(".")) + ".py", encoding="utf-8") as f:
        return ast.parse(f.read())


def imports_of(name):
    """The project's modules that name imports, anywhere in its file."""
    imported = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported |= {f"{node.module}.{a.name}" for a in node.names}  # from machinery import cli
    return imported & set(MODULES)


def test_the_root_holds_the_design_cards_scripts_and_at_most_three_more():
    root = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
    card = ["config.py", "generate.py", "model.py", "train.py", "utils.py"]
    assert set(card) <= set(root) and len(root) <= 8, root


def test_the_package_never_imports_the_entry_scripts_and_nothing_imports_in_a_circle():
    graph = {name: imports_of(name) for name in MODULES}
    for name, imported in graph.items():
        folder = name.split(".")[0]
        forbidden = {"bench"} if folder == "experiments" else set(ENTRY_SCRIPTS) if folder in FOLDERS else set()
        assert not imported & forbidden, f"{name} imports {imported & forbidden}"
    done, path = set(), []

    def visit(name):  # depth first: a module met again on the current path closes a circle
        assert name not in path, "import cycle: " + " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in MODULES:
        visit(name)


@pytest.mark.parametrize("name", MODULES)
def test_every_function_fits_on_a_screen(name):
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree(name))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long


def writes_to_the_state(node):
    """Whether node assigns to, or appends to, a field of a run's state (state.x, run.state.x, self.state.x)."""
    def of_state(target):
        inner = target.value if isinstance(target, ast.Attribute) else None
        return inner is not None and (isinstance(inner, ast.Name) and inner.id == "state"
                                      or isinstance(inner, ast.Attribute) and inner.attr == "state")
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(of_state(t) for target in targets for t in ast.walk(target) if isinstance(t, ast.Attribute))
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("append", "extend")
            and of_state(node.func.value))


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"train"}))
def test_the_runs_state_is_written_by_train_py_alone(name):
    """train.py makes the TrainState (fresh, or as checkpoint.restore put a resume back) and alone writes it."""
    writes = [node.lineno for node in ast.walk(tree(name)) if writes_to_the_state(node)]
    assert not writes, f"{name} writes the run's state at line(s) {writes}: let it return the value, train.py keep it"


# The lesson: the files the README asks a learner to read, in order.
LESSON = ("utils", "model", "optim", "train", "sampling")


@pytest.mark.parametrize("name", LESSON)
def test_every_function_of_the_lesson_reads_in_one_go(name):
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree(name))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 50]
    assert not long, "a function of the lesson fits on a screen (50 lines)"


def test_the_readme_lists_the_lesson_in_order():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    listed = re.findall(r"^\d+\. `(\w+)\.py`", readme, flags=re.M)
    assert tuple(listed) == LESSON


def test_the_readme_gives_the_lessons_length_within_a_tenth():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    lines = 0
    for name in LESSON:
        with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
            lines += len(f.read().splitlines())
    said = re.findall(r"five files (?:and|are) about ([\d,]+) lines", readme)  # about: a learner's change keeps it true
    assert said and all(abs(int(n.replace(",", "")) - lines) <= 0.1 * lines for n in said), \
        f"the lesson is {lines} lines"


@pytest.mark.parametrize("name", MODULES)
def test_every_module_says_what_it_is_for(name):
    assert ast.get_docstring(tree(name))


def flag_tables():
    with open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8") as f:
        return f.read()


def test_a_virtualenv_made_inside_the_checkout_stays_out_of_git_status():
    for path in (".venv/bin/python", "venv/lib/site.py", "pictures/attention.png", "checkpoints/best.pt"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True)
        if done.returncode == 128:
            pytest.skip("not a git checkout")
        assert done.returncode == 0, f"{path} would show up in git status"


def markdown_files():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for path in markdown_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or a heading on the same page
            if not os.path.exists(os.path.join(os.path.dirname(path), target.split("#")[0])):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target}")
    assert not broken


def test_the_flags_page_is_what_tools_flags_prints_with_every_setting(capsys):
    import config
    from tools import flags
    flags.main()
    printed = capsys.readouterr().out
    assert printed == flag_tables(), "docs/flags.md is generated: python -m tools.flags > docs/flags.md"
    for table in (flags.markdown_presets(), flags.markdown_flags(),
                  flags.markdown_flags((config.Sampler, config.SampleConfig))):
        assert table in printed


# words that tell the story of how the code was written rather than what it does
HISTORY = re.compile(r"\bsessions?\b|\bissue \d+|\bharness\b|\bbefore this\b|\bearlier machine\b|\bthree designs\b",
                     re.IGNORECASE)


def prose_of(path):
    """A markdown file's text, or a Python file's comments and docstrings."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith(".py"):
        return text
    import io
    import tokenize
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = [ast.get_docstring(n) or "" for n in ast.walk(ast.parse(text)) if isinstance(n, documented)]
    return "\n".join(comments + docstrings)


def test_the_docs_and_comments_speak_of_the_software_not_its_history():
    paths = markdown_files() + sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py")))
    found = [f"{os.path.relpath(p, ROOT)}: {m.group(0)!r}" for p in paths for m in HISTORY.finditer(prose_of(p))]
    assert not found


# ----------------------------------------------------------------------------- tests stand in for the project's seams only

REPLACERS = ("setattr", "delattr", "patch", "object")  # monkeypatch.setattr, setattr, mock.patch(.object)


def replaced_in(source):
    """What a piece of test code replaces: (line, the object whose attribute it replaces, as
    code, or a dotted name as a string) for every setattr-like call and attribute assignment,
    in the code and in the scripts it writes out as strings."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in REPLACERS:
                found.append((node.lineno, node.args[0]))
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [(node.lineno, t.value) for t in targets if isinstance(t, ast.Attribute)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "\n" in node.value:
            found += [(node.lineno, target) for _, target in replaced_in(script_in(node.value))]
    return found


def script_in(text):
    """text if it is Python code, or the code it makes as a str.format template; else ''."""
    for candidate in (text, "format"):
        try:
            code = textwrap.dedent(text.format_map(collections.defaultdict(str)) if candidate == "format" else text)
            ast.parse(code)
            return code
        except (SyntaxError, ValueError, IndexError):
            continue
    return ""


def owner(target, namespace):
    """The top-level package that the replaced attribute belongs to, or None when the code names
    something this test cannot resolve (a local variable: a test's own object)."""
    try:
        if isinstance(target, ast.Constant):  # "package.module.name": the name's holder, imported
            obj = pkgutil.resolve_name(str(target.value).rpartition(".")[0])
        else:
            obj = eval(compile(ast.Expression(target), "<target>", "eval"), namespace)
    except Exception:
        return str(target.value).split(".")[0] if isinstance(target, ast.Constant) else None
    name = obj.__name__ if isinstance(obj, type(os)) else getattr(obj, "__module__", None) or type(obj).__module__
    return name.split(".")[0]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "tests", "*.py"))), ids=os.path.basename)
def test_no_test_replaces_anything_of_torch_or_another_library(path):
    """torch's own code reads its functions too (its compiler read a replaced MPS probe and
    failed), so tests stand in for a machine or a failing disk through the project's own seams
    (the functions in machinery/device.py that ask torch, a file that fails to write, ...), never a library's."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    namespace = {}
    for node in ast.walk(ast.parse(source)):
        scripts = [script_in(node.value)] if isinstance(node, ast.Constant) and isinstance(node.value, str) else []
        for imported in [node, *(n for code in scripts for n in ast.walk(ast.parse(code)))]:
            if isinstance(imported, (ast.Import, ast.ImportFrom)):
                with contextlib.suppress(ImportError):  # (prose that happens to parse as an import)
                    exec(ast.unparse(imported), namespace)  # the names the test file's code can mean
    ours = set(MODULES) | {m.split(".")[0] for m in MODULES} | {"conftest", "builtins", "pytest", "_pytest"} | \
        {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "tests", "*.py"))}
    foreign = [(line, ast.unparse(target), root) for line, target in replaced_in(source)
               if (root := owner(target, namespace)) and root not in ours and root not in sys.stdlib_module_names]
    assert not foreign, f"{os.path.basename(path)} replaces attributes of a library (line, object, package): {foreign}"
