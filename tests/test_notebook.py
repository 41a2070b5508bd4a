"""The Colab notebook runs top to bottom, here on a CPU with a tiny model (its settings come
from TINYLLM_NOTEBOOK_* variables), writing only into a temporary folder."""

import os

import pytest

from conftest import ROOT, TINY_FLAGS, path_with_this_python, write_head

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_the_colab_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    data = write_head(tmp_path / "data.txt", 20_000)
    flags = [*TINY_FLAGS, "--data", data, "--max_steps", "20", "--eval_interval", "20"]
    monkeypatch.setenv("TINYLLM_NOTEBOOK_FLAGS", " ".join(f"'{f}'" for f in flags if f != "--plots" and f != "false"))
    monkeypatch.setenv("TINYLLM_NOTEBOOK_OUT_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("TINYLLM_NOTEBOOK_TEMPS", "0.8")  # one temperature: each is a process start
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PATH", path_with_this_python())  # the cells' `!python` is this interpreter
    notebook = nbformat.read(os.path.join(ROOT, "colab.ipynb"), as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    outputs = {i: "".join(o.get("text", "") for o in cell.get("outputs", [])) for i, cell in enumerate(notebook.cells)}
    text = "\n".join(outputs.values())
    assert "starting a fresh run" in text and "done: 20 steps" in text
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for cell in notebook.cells for o in cell.get("outputs", []))  # loss.png shown inline
    assert text.count("# checkpoint:") == 1  # the temperature file, printed
    assert sorted(os.listdir(tmp_path / "run" / "samples")) == ["samples_T0.8.txt"]
