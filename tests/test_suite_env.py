"""The suite's own environment: under the README's command (pytest-xdist workers), a GPU test
sees CUDA as the user started pytest with, while every other test runs on the CPU. This runs on
any machine: it starts pytest with a worker on a one-test file that loads tests/conftest.py,
as the suite does, and reads what a worker saw."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, path_with_this_python

PROBE = '''
import json, os
import conftest


def test_probe():
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump({"gpu_env": conftest.GPU_ENV, "visible": os.environ["CUDA_VISIBLE_DEVICES"],
                   "gpu_run": conftest.subprocess_env(gpu=True).get("CUDA_VISIBLE_DEVICES"),
                   "worker": os.environ.get("PYTEST_XDIST_WORKER")}, f)
'''


def worker_sees(tmp_path, user_value):
    """What a pytest-xdist worker saw, pytest being started with CUDA_VISIBLE_DEVICES=user_value
    (None: not set at all)."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "TINYLLM_USER_CUDA_VISIBLE_DEVICES")
           and not k.startswith(("PYTEST_", "TINYLLM_"))}
    env.update(PYTHONPATH=os.path.join(ROOT, "tests"), PROBE_OUT=str(tmp_path / "seen.json"),
               PATH=path_with_this_python(), OMP_NUM_THREADS="1")
    if user_value is not None:
        env["CUDA_VISIBLE_DEVICES"] = user_value
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "1", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((tmp_path / "seen.json").read_text())


@pytest.mark.parametrize("user_value", ["3,5", None])
def test_a_worker_hands_the_gpu_tests_cuda_as_the_user_started_pytest_with(tmp_path, user_value):
    seen = worker_sees(tmp_path, user_value)
    assert seen["worker"]  # it ran in a pytest-xdist worker, as the README's command runs it
    assert seen["visible"] == ""  # the worker itself, and what its CPU tests start, see no GPU
    assert seen["gpu_env"] == ({} if user_value is None else {"CUDA_VISIBLE_DEVICES": user_value})
    assert seen["gpu_run"] == user_value  # the GPU tests' scripts: the user's value, or none set
