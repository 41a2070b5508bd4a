"""The Colab notebook runs top to bottom, here on a CPU with a tiny model (its settings come from
its TINYLLM_NOTEBOOK_* variables), writing only into a temporary folder."""

import os

import pytest
from conftest import ROOT, TINY_FLAGS, corpus_head, script_env


@pytest.mark.slow  # a kernel, and a process for each script it runs
def test_the_colab_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    # imported here, not at collection: only the worker that runs the notebook pays for them
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    (tmp_path / "data.txt").write_text(corpus_head(20_000), encoding="utf-8")
    flags = [f for f in TINY_FLAGS if f not in ("--plots", "false")]  # the notebook shows loss.png
    flags += ["--data", tmp_path / "data.txt", "--max_steps", "20", "--eval_interval", "20"]
    env = script_env(
        TINYLLM_NOTEBOOK_FLAGS=" ".join(f"'{f}'" for f in flags),
        TINYLLM_NOTEBOOK_OUT_DIR=str(tmp_path / "run"),
        TINYLLM_NOTEBOOK_TEMPS="0.8",
    )  # one temperature: each starts a process
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the kernel, and its `!python` (this one), see these
    notebook = nbformat.read(os.path.join(ROOT, "colab.ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "starting a fresh run" in text and "done: 20 steps" in text
    images = [o for o in outputs if o.get("output_type") == "display_data"]
    assert any("image/png" in o.get("data", {}) for o in images)
    assert os.listdir(tmp_path / "run" / "samples") == ["samples_T0.8.txt"]
    assert text.count("# checkpoint:") == 1  # the sweep's file, printed by the last cell
    assert "max_new_tokens=200" in text  # the sweep's settings reached sweep.sh
