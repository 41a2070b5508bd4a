"""The GPU report, python bench.py gpu_check: read this when you want to know how its figures are
made. It runs tinyllm's commands as a user runs them, each in a process of its own from the
repository's root, and stamps every line of their output with the seconds since the process
was started; bench.py adds what it measures in its own process (the KV cache's agreement in
every precision) and the targets, and this module writes it all as one Markdown page and one
JSON file.

Start-up is split by a probe, a fresh process that imports torch, starts the device and builds
a first optimizer, timing each: what train.py takes before its device line beyond those is
tinyllm's own set-up (by subtraction, so it carries their noise).
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from machinery.cli import log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process's start-up, piece by piece: the seconds since the epoch after each.
PROBE = """
import json, sys, time
stamps = {"python": time.time()}
import torch
stamps["import torch"] = time.time()
device = torch.device(sys.argv[1])
torch.zeros(1, device=device).sum().item()
stamps["device start"] = time.time()
weight = torch.nn.Parameter(torch.zeros(8, device=device))
torch.optim.AdamW([weight], fused=device.type in ("cuda", "cpu", "mps"))
stamps["first optimizer"] = time.time()
print(json.dumps(stamps))
"""


# ----------------------------------------------------------------------------- running a command as a user does

def run_stamped(cmd, timeout=1800):
    """Run cmd (python ... as a list) from the repository's root. Returns its exit code, wall
    seconds, the seconds at which its standard output first showed anything, and its lines,
    each (seconds since the start when it arrived, text); and its standard error's last lines."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        lines, first, pending, chunks = [], None, b"", []
        while chunk := proc.stdout.read1(1 << 16):
            now = time.perf_counter() - start
            first = now if first is None else first
            chunks.append((now, len(chunk)))
            pending += chunk
            *done, pending = pending.split(b"\n")
            lines += [(now, line.decode("utf-8", "replace")) for line in done]
        code = proc.wait()
        wall = time.perf_counter() - start
        killer.cancel()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace").strip().splitlines()[-5:]
    if pending:
        lines.append((wall, pending.decode("utf-8", "replace")))
    shown = ["python"] + [os.path.relpath(a, ROOT) if a.startswith(ROOT + os.sep) else a for a in cmd[1:] if a != "-u"]
    return {"command": " ".join(shown), "code": code, "wall": wall, "first_output": first, "lines": lines,
            "chunks": chunks, "stderr": stderr}


def part(report, key, fn, *args):
    """report[key] = fn(*args); a part that fails holds its error instead, and the report goes on."""
    try:
        report[key] = fn(*args)
    except Exception as e:  # (not KeyboardInterrupt: Ctrl-C still stops the report)
        report[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        log(f"  {key} failed: {report[key]['error']}")


def stamp_of(result, prefix):
    """When the first line starting with prefix arrived (seconds since the start), or None."""
    return next((t for t, line in result["lines"] if line.startswith(prefix)), None)


def startup_split(device_type):
    """The seconds a fresh Python process takes to start, import torch, start the device and
    build a first optimizer (torch's own work, which every script pays before its own)."""
    before = time.time()
    done = subprocess.run([sys.executable, "-c", PROBE, device_type], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    stamps = json.loads(done.stdout)
    names, times = ["python"] + [k for k in stamps if k != "python"], [before] + list(stamps.values())
    return {name: times[i + 1] - times[i] for i, name in enumerate(names)}


# ----------------------------------------------------------------------------- train.py and generate.py

def train_run(flags, out_dir):
    """python train.py FLAGS --out_dir OUT_DIR, as a user runs it: its wall time, when its first
    line, its device line, its first progress line and its exit came, its best val loss, the
    median ms/step of its progress lines and the MFU its last one printed."""
    result = run_stamped([sys.executable, "-u", os.path.join(ROOT, "train.py"), *flags, "--out_dir", out_dir])
    history = []
    if os.path.isfile(os.path.join(out_dir, "history.json")):
        with open(os.path.join(out_dir, "history.json"), encoding="utf-8") as f:
            history = json.load(f)
    evals = [h["val_loss"] for h in history if h["kind"] == "eval"]
    steps = [h["ms_per_step"] for h in history if h["kind"] == "train" and h["ms_per_step"]]
    mfu = [float(m) for _, line in result["lines"] for m in re.findall(r"MFU ([0-9.]+)%", line)]
    device = next((line for _, line in result["lines"] if line.startswith("device ")), "")
    result.update(best_val=min(evals) if evals else None, ms_per_step=statistics.median(steps) if steps else None,
                  mfu=mfu[-1] if mfu else None, steps=max((h["step"] for h in history), default=0), device=device,
                  first_line=result["lines"][0][0] if result["lines"] else None,
                  device_line=stamp_of(result, "device "), first_step=stamp_of(result, "step "))
    log(f"  {describe_run(result)}")
    return result


def describe_run(r):
    if r["code"]:
        return f"exit {r['code']}: {(r['stderr'] or ['?'])[-1]}"
    best = f"best val {r['best_val']:.4f}" if r["best_val"] is not None else "no evaluation"
    ms = f", {r['ms_per_step']:.1f} ms/step" if r["ms_per_step"] else ""
    return f"{best} in {r['wall']:.1f} s ({r['steps']} steps{ms}" + (f", MFU {r['mfu']:.1f}%)" if r["mfu"] else ")")


def generate_runs(checkpoint, new_tokens, repeats, prompt="ROMEO:"):
    """python generate.py CHECKPOINT --prompt PROMPT --max_new_tokens N --seed 42, repeats times:
    each one's wall time, and when its first generated text came (after the prompt it echoes)."""
    cmd = [sys.executable, "-u", os.path.join(ROOT, "generate.py"), checkpoint, "--prompt", prompt,
           "--max_new_tokens", str(new_tokens), "--seed", "42"]
    runs = [run_stamped(cmd) for _ in range(repeats)]
    walls = [r["wall"] for r in runs if r["code"] == 0]
    echoed, arrived, first = len(prompt.encode()), 0, None
    for t, size in runs[0]["chunks"]:
        arrived += size
        if arrived > echoed:
            first = t
            break
    result = {"command": runs[0]["command"], "new_tokens": new_tokens, "walls": walls,
              "wall": statistics.median(walls) if walls else None, "first_output": first,
              "code": next((r["code"] for r in runs if r["code"]), 0),
              "stderr": next((r["stderr"] for r in runs if r["code"]), [])}
    log(f"  generate.py, {new_tokens} tokens: " + (f"{result['wall']:.2f} s wall (median of {len(walls)})" if walls
                                                    else f"failed: {(result['stderr'] or ['?'])[-1]}"))
    return result


def gpu_tests():
    """python -m pytest -q tests/test_gpu.py, the README's test command on the GPU's tests."""
    if not os.path.isdir(os.path.join(ROOT, "tests")):
        return {"summary": "not run: no tests/ folder beside bench.py"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                          cwd=ROOT, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1].strip("= ")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    log(f"  tests/test_gpu.py: {summary}")
    return {"summary": summary, "code": done.returncode, **counts,
            "output": done.stdout.strip().splitlines()[-30:] if done.returncode else []}


# ----------------------------------------------------------------------------- the page

def seconds(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f} s"


def markdown(report):
    """The report as one Markdown page, what a bug report can quote whole."""
    m = report["machine"]
    out = [f"# tinyllm GPU report: {m['gpu'] or 'no GPU, ' + m['cpu']}", "",
           f"torch {m['torch']}" + (f" (CUDA {m['cuda']})" if m.get("cuda") else "") + f", Python {m['python']}, "
           f"commit {m['git'] or 'unknown'}, {m['date']}, `python bench.py gpu_check{' --quick' if report['quick'] else ''}`",
           ""]
    out += table(["figure", "measured", "target", "met"], [[t["figure"], t["measured"], t["target"], t["met"]]
                                                            for t in report["targets"]])
    for key, title, render in SECTIONS:
        out += ["", f"## {title}", ""]
        part = report.get(key)
        if part is None:
            out.append("not measured: the report stopped before this part")
        elif isinstance(part, dict) and "error" in part:
            out.append(f"failed: {part['error']}")
        else:
            out += render(report, part)
    return "\n".join(out) + "\n"


def tests_page(report, tests):
    return [f"`python -m pytest -q tests/test_gpu.py`: {tests['summary']}"] + [f"    {line}" for line in tests.get("output", [])]


def startup_page(report, startup):
    g = report.get("generate", {})
    rows = [[r["label"], seconds(r.get("first_line"), 2), seconds(r.get("device_line"), 2),
             seconds(r.get("first_step"), 2), seconds(r.get("wall"), 2)] for r in startup["runs"]]
    if g.get("wall"):
        rows.append([f"python generate.py ({g['new_tokens']:,} tokens)", "-", "-", seconds(g["first_output"], 2),
                     seconds(g["walls"][0], 2)])
    split = startup["split"]
    return (["Seconds since the process started, as its output arrived:", ""]
            + table(["command", "first line", "device line", "first step / first generated text", "exit"], rows)
            + ["", "What a fresh process spends before any of tinyllm's own work (a probe), and train.py's own "
                   "set-up up to its device line (the rest, by subtraction):", ""]
            + table(list(split), [[seconds(v, 2) if isinstance(v, float) else v for v in split.values()]]))


def training_page(report, training):
    rows = [[f"`{r['command']}`", seconds(r["wall"]), describe_run(r) if r["code"] or r["best_val"] is None else
             f"{r['best_val']:.4f}", r["steps"], f"{r['ms_per_step']:.1f}" if r["ms_per_step"] else "-",
             f"{r['mfu']:.1f}%" if r["mfu"] else "-"] for r in training]
    speed = report.get("speed", {})
    warm = [] if "ms_per_step" not in speed else [
        "", f"Warm, in one process: preset {speed['preset']} ({speed['dtype']}), {speed['ms_per_step']:.1f} ms/step, "
            f"{speed['tokens_per_s']:,.0f} tokens/s" + (f", MFU {100 * speed['mfu']:.1f}%" if speed["mfu"] else "")]
    return table(["command", "wall", "best val", "steps", "ms/step", "MFU"], rows) + warm


def decoding_page(report, decoding):
    return ([f"`bench.py generate`: preset {decoding['preset']}, batch 1, {decoding['new_tokens']} tokens, greedy; "
             f"each dtype in a process of its own; the first call of each path, then the median of the warm calls", ""]
            + table(["dtype", "path", "first call, ms/token", "warm, ms/token", "first / warm"], decoding["rows"]))


def generate_page(report, g):
    if not g["wall"]:
        return [f"`{g['command']}`: failed: {(g['stderr'] or ['?'])[-1]}"]
    return [f"`{g['command']}`: {seconds(g['wall'], 2)} wall (median of {len(g['walls'])}), the first generated "
            f"text at {seconds(g['first_output'], 2)}"]


def checks_page(report, checks):
    return table(["dtype", "compile", "val loss", "check"],
                 [[c["dtype"], c["compile"], f"{c['val_first']:.3f} -> {c['val_last']:.3f}", c["line"]] for c in checks])


SECTIONS = [("gpu_tests", "The GPU tests", tests_page), ("startup", "Start-up", startup_page),
            ("training", "Training runs", training_page), ("decoding", "Decoding", decoding_page),
            ("generate", "generate.py", generate_page), ("checks", "The KV cache against recomputation", checks_page)]


def table(headers, rows):
    return [f"| {' | '.join(map(str, headers))} |", f"|{' --- |' * len(headers)}"] + \
           [f"| {' | '.join(map(str, row))} |" for row in rows]


def write(report, path):
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(report))
    log(f"wrote {path}")
