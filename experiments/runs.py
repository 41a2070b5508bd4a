"""What every experiment shares: the machine, a run set up by train.py, timed steps, a Markdown table."""

import contextlib
import datetime
import os
import platform
import subprocess
import sys

import torch

import train
from config import RunOptions, build_configs, default_preset
from machinery.cli import log
from machinery.device import choose_device, gpu, interleaved, machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_info():
    """Enough to tell two result files apart: numbers from different machines do not compare."""
    cpu, git = platform.processor() or platform.machine(), ""
    # platform.processor() is often just "x86_64" on Linux; /proc/cpuinfo has the model name
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    with contextlib.suppress(OSError):  # no git here
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu()[0] if machine().cuda else None,
            "torch": torch.__version__, "python": platform.python_version(), "git": git.strip() or None,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def peak_memory_mib(device):
    """CUDA: the allocator's high-water mark. A CPU: the process's peak resident memory. MPS: None
    (torch keeps no high-water mark there, and its memory is not the process's resident set)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps" or sys.platform == "win32":  # (resource, below, is Unix only)
        return None
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def sync(device):
    # GPUs run asynchronously: without this a timer measures the launch, not the work
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def new_run(preset, given, out_dir):
    """A training run set up by train.py itself, not yet stepped; given: settings as flags would give them."""
    preset = preset or default_preset(choose_device(given.get("device", "auto")).type)
    given = {"time_budget": "", **given, "out_dir": out_dir}  # benchmarks fix their steps; no planning
    model_cfg, train_cfg = build_configs(given, preset)
    return train.setup_run(model_cfg, train_cfg, RunOptions(), preset, given)


def step_times(runs, untimed, steps):
    """Milliseconds of each timed optimizer step of each run, the runs interleaved step by step."""
    log(f"{untimed} untimed steps, then {steps} timed steps" + (", variants interleaved" if len(runs) > 1 else ""))

    def step_of(run):  # () -> one step at the peak LR, waited for
        return lambda: (run.train_step(run.cfg.lr), sync(run.device))

    return [[1000 * s for s in seconds] for seconds in interleaved([step_of(run) for run in runs], untimed, steps)]


def markdown_table(headers, rows):
    """A markdown table, every column padded to its widest cell so it also reads as plain text."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"
