"""The GPU report (python bench.py gpu_check): tinyllm's commands run as a user runs them, each in its own
process with every output line time-stamped, written beside the targets as one Markdown page and one JSON file."""

import functools
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

import sampling
from deep_dives import graphs
import train
from config import GREEDY
from experiments.runs import ROOT, machine_info, markdown_table, new_run, step_times
from machinery import plots, records
from machinery.annotate import forced_steps
from machinery.cli import log
from machinery.device import choose_device, has_native_bf16, machine


# What the report's figures should be on an H100-class GPU (docs/platforms.md), judged only on an H100 or H200
GPU_TARGETS = {"train_wall": 45.0, "train_best_val": 1.440, "decode_ms": 0.5, "cache_speedup": 3.0,
               "first_over_warm": 2.0, "generate_wall": 5.5}

# --quick: the report's every step at a toy size, a smoke test that runs anywhere (the tests run it)
TOY = dict(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=4)
QUICK = [a for k, v in TOY.items() for a in (f"--{k}", str(v))] + [
    "--max_steps", "10", "--warmup_steps", "2", "--eval_interval", "5", "--eval_iters", "2", "--plots", "false"]

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


def bench_gpu_check(args):
    """Every part of the report in turn, written as Markdown (--out_md) and returned for the JSON (--out)."""
    device = choose_device("auto")
    report = {"quick": args.quick, "machine": {**machine_info(), "cuda": torch.version.cuda}}
    measure = functools.partial(part, report)  # each part on its own: one that fails is reported as such
    log(f"gpu_check on {report['machine']['gpu'] or device}: the GPU tests")
    measure("gpu_tests", lambda: {"summary": "not run (--quick)"} if args.quick else gpu_tests())
    with tempfile.TemporaryDirectory(prefix="tinyllm-gpu-check-", ignore_cleanup_errors=True) as tmp:
        try:
            log("training as a user runs it")
            measure("training", training_runs, args.quick, device, tmp)
            measure("startup", startup, report["training"], device, tmp, args.quick)
            log("decoding")
            measure("decoding", decoding, args.quick, device, tmp)
            measure("generate", generate_runs, os.path.join(tmp, "default", "best.pt"),
                 40 if args.quick else 1000, 1 if args.quick else 3)
            log("the KV cache against recomputation")
            trained = report["training"] if isinstance(report["training"], list) else []  # (else: its error)
            compiled = not args.quick and bool(trained) and all(r["code"] == 0 for r in trained)
            measure("checks", cache_checks, args.quick, device, tmp, compiled)
            measure("speed", steady_speed, args.quick, tmp)
            if machine().gpus > 1:
                measure("torchrun_ok", torchrun_check, tmp)
        finally:  # whatever happened, the page says what was measured
            report["targets"] = target_rows(report)
            with open(args.out_md, "w", encoding="utf-8") as f:
                f.write(markdown(report))
            log(f"wrote {args.out_md}")
    report.update({k: report["speed"].get(k) for k in ("ms_per_step", "tokens_per_s", "mfu")})  # top-level too
    return report


# ----------------------------------------------------------------------------- the report's parts, in order

def gpu_tests():
    if not os.path.isdir(os.path.join(ROOT, "tests")):
        return {"summary": "not run: no tests/ folder beside bench.py"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                          cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace")
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1].strip("= ")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    log(f"  tests/test_gpu.py: {summary}")
    return {"summary": summary, "code": done.returncode, **counts,
            "output": done.stdout.strip().splitlines()[-30:] if done.returncode else []}


def training_runs(quick, device, tmp):
    """python train.py as it comes, then on CUDA with --compile and with --dtype float16 (its loss scaling)."""
    base = QUICK + ["--sample_tokens", "20", "--log_interval", "1"] if quick else []  # (quick: it times start-up too)
    variants = [("default", [])] + [("compile", ["--compile"]), ("float16", ["--dtype", "float16"])] * (
        device.type == "cuda" and not quick)
    return [train_run(base + flags, os.path.join(tmp, name)) for name, flags in variants]


def train_run(flags, out_dir):
    result = run_stamped([sys.executable, "-u", os.path.join(ROOT, "train.py"), *flags, "--out_dir", out_dir])
    path = os.path.join(out_dir, "history.json")
    history = plots.read_history(path) if os.path.isfile(path) else []
    progress, evals = plots.split_history(history)
    evals, steps = [h["val_loss"] for h in evals], [h["ms_per_step"] for h in progress if h["ms_per_step"]]
    mfu = [float(m) for _, line in result["lines"] for m in re.findall(r"MFU ([0-9.]+)%", line)]
    device = next((line for _, line in result["lines"] if line.startswith("device ")), "")
    stamps = {p: next((t for t, line in result["lines"] if line.startswith(p)), None) for p in ("device ", "step ")}
    result.update(best_val=min(evals) if evals else None, ms_per_step=statistics.median(steps) if steps else None,
                  mfu=mfu[-1] if mfu else None, steps=max((h["step"] for h in history), default=0), device=device,
                  first_line=result["lines"][0][0] if result["lines"] else None,
                  device_line=stamps["device "], first_step=stamps["step "])
    log(f"  {run_summary(result)}")
    return result


def run_summary(r):
    if r["code"]:
        return f"exit {r['code']}: {(r['stderr'] or ['?'])[-1]}"
    best = f"best val {r['best_val']:.4f}" if r["best_val"] is not None else "no evaluation"
    ms = f", {r['ms_per_step']:.1f} ms/step" if r["ms_per_step"] else ""
    return f"{best} in {r['wall']:.1f} s ({r['steps']} steps{ms}" + (f", MFU {r['mfu']:.1f}%)" if r["mfu"] else ")")


def startup(training, device, tmp, quick):
    """When train.py's first lines come, beside what a bare script pays for torch before any work (the probe)."""
    before = time.time()
    probe = subprocess.run([sys.executable, "-c", PROBE, device.type], cwd=ROOT, capture_output=True, encoding="utf-8",
                           errors="replace")
    if quick:  # the default run at a toy size reports every step already
        run = dict(training[0], label="python train.py (--quick)")
    else:
        short = ["--max_steps", "20", "--eval_interval", "1000", "--eval_iters", "2", "--plots", "false",
                 "--log_interval", "1", "--sample_tokens", "0"]
        run = dict(train_run(short, os.path.join(tmp, "startup")), label="python train.py (20 steps, a line each)")
    if probe.returncode:
        split = {"error": (probe.stderr.strip().splitlines() or ["?"])[-1]}
    else:  # (not subtracted from train.py's times: it pays these pieces in another order)
        stamps = json.loads(probe.stdout)  # in order: each piece ends at its stamp, the first at Python's start
        times = [before, *stamps.values()]
        split = {name: end - start for name, start, end in zip(stamps, times, times[1:])}
        split["together"] = sum(split.values())
    log("  start-up: " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items() if isinstance(v, float)))
    return {"split": split, "runs": [run]}


def decoding(quick, device, tmp):
    """bench.py generate in a process per dtype, so that each first call is a process's first, as generate.py's is."""
    shape = [a for k, v in TOY.items() if k != "batch_size" for a in (f"--{k}", str(v))] if quick else []
    new_tokens, rows, results = 24 if quick else 1000, [], {}
    for dtype in ["float32"] + ["bfloat16"] * (has_native_bf16(device) and not quick):  # (quick: one process)
        out = os.path.join(tmp, f"generate-{dtype}.json")
        done = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "generate", "--preset", "small", *shape,
                               "--dtype", dtype, "--new_tokens", str(new_tokens), "--repeats", "1" if quick else "3",
                               "--out", out], cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace")
        if done.returncode:
            rows.append([dtype, "failed", (done.stderr.strip().splitlines() or ["?"])[-1], "", ""])
            continue
        with open(out, encoding="utf-8") as f:
            results[dtype] = json.load(f)
        for path, r in results[dtype].items():  # (in bench.py generate's order)
            if path in ("replayed", "kv_cache", "full_recompute"):
                rows.append([dtype, path, f"{r['first_ms_per_token']:.3f}", f"{r['ms_per_token']:.3f}",
                             f"{r['first_seconds'] / r['seconds']:.2f}"])
    return {"preset": "small" + (" (--quick: a toy shape)" if quick else ""), "new_tokens": new_tokens,
            "rows": rows, "results": results}


def generate_runs(checkpoint, new_tokens, repeats, prompt="ROMEO:"):
    """python generate.py CHECKPOINT, repeats times: the wall times, and when the first text after the prompt came."""
    cmd = [sys.executable, "-u", os.path.join(ROOT, "generate.py"), checkpoint, "--prompt", prompt,
           "--max_new_tokens", str(new_tokens), "--seed", "42"]
    runs = [run_stamped(cmd) for _ in range(repeats)]
    walls = [r["wall"] for r in runs if r["code"] == 0]
    arrived = itertools.accumulate(size for _, size in runs[0]["chunks"])
    first = next((t for (t, _), n in zip(runs[0]["chunks"], arrived) if n > len(prompt.encode())), None)
    result = {"command": runs[0]["command"], "new_tokens": new_tokens, "walls": walls,
              "wall": statistics.median(walls) if walls else None, "first_output": first,
              "code": next((r["code"] for r in runs if r["code"]), 0),
              "stderr": next((r["stderr"] for r in runs if r["code"]), [])}
    log(f"  generate.py, {new_tokens} tokens: " + (f"{result['wall']:.2f} s wall (median of {len(walls)})" if walls
                                                    else f"failed: {(result['stderr'] or ['?'])[-1]}"))
    return result


def cache_checks(quick, device, tmp, compiled=True):
    """Every dtype x compile (compiled False: no --compile) trains a few steps, then check_cache."""
    preset, steps, shape = ("tiny", 4, TOY) if quick else ("small", 20, {})
    dtypes = ["float32"] + ["bfloat16"] * has_native_bf16(device) + ["float16"] * (device.type == "cuda")
    rows = []
    for dtype in dtypes:
        for compile in (False, True) if compiled else (False,):
            given = {**shape, "dtype": dtype, "compile": compile, "max_steps": steps, "eval_interval": steps,
                     "log_interval": steps, "eval_iters": 2, "sample_tokens": 0, "plots": False}
            run = new_run(preset, given, os.path.join(tmp, f"check-{dtype}-{compile}"))
            _, evals = plots.split_history(train.train_loop(run)["history"])
            cache = check_cache(run.model.eval(), run.ctx, run.dtype, 48 if quick else 250)
            line = describe_cache_check(cache, run.dtype)
            first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
            rows.append({"dtype": dtype, "compile": compile, "val_first": first, "val_last": last,
                         "cache_agrees": cache["agrees"], "cache": cache, "line": line})
            log(f"check {dtype:<9} compile={compile!s:<5} val {first:.3f} -> {last:.3f} | {line}")
    return rows


def check_cache(model, ctx, dtype, n=250):
    """The KV cache against recomputation over a greedy text of n tokens: the largest logit difference against 8
    ulps of the largest logit; where the greedy texts part, the top-2 margin there (a near-tie: rounding)."""
    device = model.wte.weight.device
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    with ctx:
        full_text, cached_text = (sampling.generate(model, prompt, n, GREEDY, use_cache=c, replay=graphs.replayable)
                                  for c in (False, True))  # the cache as generate.py decodes with it
        new = full_text[:, 1:]
        full, cached = (torch.stack([logits[0].float() for _, logits in forced_steps(model, prompt, new, c)])
                        for c in (False, True))  # each (n, V)
    eps = torch.finfo(getattr(torch, dtype)).eps
    if dtype == "float32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        eps = 2.0 ** -10  # TF32 keeps 10 bits of mantissa
    tolerance, diff = 8 * eps * full.abs().max().item(), (cached - full).abs().max().item()
    parted = (cached_text != full_text)[0].nonzero()
    parts_at = parted[0].item() - 1 if len(parted) else None  # among the new tokens
    top2 = None if parts_at is None else full[parts_at].topk(2).values
    return {"tokens": n, "max_diff": diff, "tolerance": tolerance, "agrees": diff <= tolerance, "parts_at": parts_at,
            "margin": None if top2 is None else (top2[0] - top2[1]).item()}


def describe_cache_check(cache, dtype):
    verdict = "KV cache agrees with recompute" if cache["agrees"] else "KV cache DISAGREES with recompute"
    line = (f"{verdict}: largest logit difference {cache['max_diff']:.2g} over {cache['tokens']} teacher-forced "
            f"tokens (tolerance {cache['tolerance']:.2g} in {dtype})")
    if cache["parts_at"] is None:
        return line + "; the greedy texts are the same"
    return line + (f"; the greedy texts part at token {cache['parts_at']}, where the recomputed top-2 margin "
                   f"is {cache['margin']:.3g}")


def steady_speed(quick, tmp):
    """The default preset's ms/step, tokens/s and MFU once warm, timed in this process."""
    preset, steps, shape = ("tiny", 4, TOY) if quick else (None, 20, {})
    run = new_run(preset, {**shape, "plots": False}, os.path.join(tmp, "speed"))
    ms = statistics.median(step_times([run], 3, steps)[0])
    tokens_per_s, mfu = records.speed(ms, run.cfg.batch_size, run.model, run.device, run.dtype, run.world)
    log(f"{run.preset} ({run.dtype}), warm: {ms:.1f} ms/step | {tokens_per_s:,.0f} tok/s"
        + (f" | MFU {100 * mfu:.1f}%" if mfu else ""))
    return {"preset": run.preset, "dtype": run.dtype, "ms_per_step": ms, "tokens_per_s": tokens_per_s, "mfu": mfu}


def torchrun_check(tmp):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={machine().gpus}",
           os.path.join(ROOT, "train.py"), "--preset", "small", "--max_steps", "20", "--sample_tokens", "0",
           "--out_dir", os.path.join(tmp, "ddp")]
    ok = subprocess.run(cmd).returncode == 0
    log(f"torchrun on {machine().gpus} GPUs: {'ok' if ok else 'FAILED'}")
    return ok


# ----------------------------------------------------------------------------- running a command as a user does

def run_stamped(cmd, timeout=1800):
    """Run cmd from the repository's root, each piece of its stdout stamped with the seconds since the start."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        lines, pending, chunks = [], b"", []
        while chunk := proc.stdout.read1(1 << 16):
            now = time.perf_counter() - start
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
    return {"command": " ".join(shown), "code": code, "wall": wall, "first_output": chunks[0][0] if chunks else None,
            "lines": lines, "chunks": chunks, "stderr": stderr}


def part(report, key, fn, *args):
    try:
        report[key] = fn(*args)
    except Exception as e:  # (not KeyboardInterrupt: Ctrl-C still stops the report)
        report[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        log(f"  {key} failed: {report[key]['error']}")


# ----------------------------------------------------------------------------- the page

def target_rows(report):
    """Each target beside its figure; met or not only on an H100-class GPU, the class they are for."""
    t, judged = GPU_TARGETS, any(name in (report["machine"]["gpu"] or "") for name in ("H100", "H200"))
    training, gen = report.get("training"), report.get("generate", {})  # (a part that failed holds an error)
    default = training[0] if isinstance(training, list) and training[0]["code"] == 0 else {}
    results = report.get("decoding", {}).get("results", {})
    f32 = results.get("float32", {})
    fast = f32.get("replayed") or f32.get("kv_cache")
    first_over_warm = fast and fast["first_seconds"] / fast["seconds"]  # generate.py decodes in float32
    rows = [("python train.py: wall, process start to exit", default.get("wall"), t["train_wall"], "s"),
            ("python train.py: best val loss", default.get("best_val"), t["train_best_val"], ""),
            ("decoding with the cache, float32, ms/token", fast and fast["ms_per_token"], t["decode_ms"], ""),
            ("the cache against recomputing, float32", fast and f32["full_recompute"]["seconds"] / fast["seconds"],
             t["cache_speedup"], "x"),
            ("decoding's first call / warm, float32", first_over_warm, t["first_over_warm"], "x"),
            (f"python generate.py, {gen.get('new_tokens', 1000):,} tokens, wall", gen.get("wall"), t["generate_wall"],
             "s")]
    out = []
    for name, value, target, unit in rows:
        at_least = unit == "x" and "first" not in name
        reached = value is not None and (value >= target if at_least else value <= target)
        met = ("yes" if reached else "NO") if judged and value is not None else "-"
        out.append({"figure": name, "measured": "-" if value is None else f"{value:.3f}{unit}",
                    "target": f"{'>=' if at_least else '<='} {target:g}{unit}", "met": met})
    return out


def seconds(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f} s"


def markdown(report):
    m = report["machine"]
    command = "python bench.py gpu_check" + (" --quick" if report["quick"] else "")
    out = [f"# tinyllm GPU report: {m['gpu'] or 'no GPU, ' + m['cpu']}", "",
           f"torch {m['torch']}" + (f" (CUDA {m['cuda']})" if m.get("cuda") else "") + f", Python {m['python']}, "
           f"commit {m['git'] or 'unknown'}, {m['date']}, `{command}`", ""]
    out += markdown_table(["figure", "measured", "target", "met"],
                          [[t["figure"], t["measured"], t["target"], t["met"]] for t in report["targets"]]).splitlines()
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
    return ([f"`python -m pytest -q tests/test_gpu.py`: {tests['summary']}"]
            + [f"    {line}" for line in tests.get("output", [])])


def startup_page(report, startup):
    g = report.get("generate", {})
    rows = [[r["label"], seconds(r.get("first_line"), 2), seconds(r.get("device_line"), 2),
             seconds(r.get("first_step"), 2), seconds(r.get("wall"), 2)] for r in startup["runs"]]
    if g.get("wall"):
        rows.append([f"python generate.py ({g['new_tokens']:,} tokens)", "-", "-", seconds(g["first_output"], 2),
                     seconds(g["walls"][0], 2)])
    split = startup["split"]
    return (["Seconds since the process started, as its output arrived:", ""]
            + markdown_table(["command", "first line", "device line", "first step / first generated text", "exit"],
                             rows).splitlines()
            + ["", "What a bare script pays before any work of its own: Python, `import torch`, the device's "
                   "first use and the first optimizer's construction (a probe process):", ""]
            + markdown_table(list(split), [[seconds(v, 2) if isinstance(v, float) else v
                                            for v in split.values()]]).splitlines())


def training_page(report, training):
    rows = [[f"`{r['command']}`", seconds(r["wall"]), run_summary(r) if r["code"] or r["best_val"] is None else
             f"{r['best_val']:.4f}", r["steps"], f"{r['ms_per_step']:.1f}" if r["ms_per_step"] else "-",
             f"{r['mfu']:.1f}%" if r["mfu"] else "-"] for r in training]
    speed = report.get("speed", {})
    warm = [] if "ms_per_step" not in speed else [
        "", f"Warm, in one process: preset {speed['preset']} ({speed['dtype']}), {speed['ms_per_step']:.1f} ms/step, "
            f"{speed['tokens_per_s']:,.0f} tokens/s" + (f", MFU {100 * speed['mfu']:.1f}%" if speed["mfu"] else "")]
    return markdown_table(["command", "wall", "best val", "steps", "ms/step", "MFU"], rows).splitlines() + warm


def decoding_page(report, decoding):
    return ([f"`bench.py generate`: preset {decoding['preset']}, batch 1, {decoding['new_tokens']} tokens, greedy; "
             f"each dtype in a process of its own; the first call of each path, then the median of the warm calls", ""]
            + markdown_table(["dtype", "path", "first call, ms/token", "warm, ms/token", "first / warm"],
                             decoding["rows"]).splitlines())


def generate_page(report, g):
    if not g["wall"]:
        return [f"`{g['command']}`: failed: {(g['stderr'] or ['?'])[-1]}"]
    return [f"`{g['command']}`: {seconds(g['wall'], 2)} wall (median of {len(g['walls'])}), the first generated "
            f"text at {seconds(g['first_output'], 2)}"]


def checks_page(report, checks):
    rows = [[c["dtype"], c["compile"], f"{c['val_first']:.3f} -> {c['val_last']:.3f}", c["line"]] for c in checks]
    return markdown_table(["dtype", "compile", "val loss", "check"], rows).splitlines()


SECTIONS = [("gpu_tests", "The GPU tests", tests_page), ("startup", "Start-up", startup_page),
            ("training", "Training runs", training_page), ("decoding", "Decoding", decoding_page),
            ("generate", "generate.py", generate_page), ("checks", "The KV cache against recomputation", checks_page)]
