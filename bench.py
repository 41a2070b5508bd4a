"""Benchmarks: how fast tinyllm trains and generates, how long it takes to reach a
validation loss, and what each modern part (RMSNorm, SwiGLU, RoPE, ...) buys.

    python bench.py train --preset small --steps 50            # ms/step, tokens/s, memory, MFU
    python bench.py generate --preset small --new_tokens 1000  # tokens/s with and without the KV cache
    python bench.py time_to_target --target 1.886 --preset small -- --max_steps 5000
    python bench.py ablation --preset tiny --max_steps 1000 --only vanilla,rope

Every mode prints its figures and writes them, with a description of the machine,
as JSON to --out (default bench_results/MODE.json). Flags after `--` go to train.py.
"""

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from config import PRESETS, TinyLLMError, add_config_flags, build_configs, default_preset
from model import GPT
from train import peak_flops, train_step
from utils import (autocast, choose_device, get_batch, log, make_optimizer, new_plot, resolve_dtype, run_cli,
                   save_plot, seed_everything)

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN_PY = os.path.join(ROOT, "train.py")  # module-level so tests can point it at a stand-in script


# ----------------------------------------------------------------------------- the machine

def cpu_name():
    # platform.processor() is often just "x86_64" on Linux; /proc/cpuinfo has the real model name
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    """The commit benchmarked, with +dirty when tracked files have changed; None outside git."""
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def machine_info():
    """Enough to tell two result files apart: numbers from different machines do not compare."""
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def peak_memory_mib(device):
    """(MiB, what was measured). CUDA: the allocator's high-water mark since the last reset.
    Elsewhere: the whole process's peak resident memory, interpreter and torch included."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    try:
        import resource  # Unix only
    except ImportError:
        return None, "unavailable"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return peak * bytes_per_unit / 2**20, "process peak RSS"


def sync(device):
    # GPUs run asynchronously: without this a timer measures the launch, not the work
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def write_json(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    log(f"wrote {path}")


# ----------------------------------------------------------------------------- train: throughput

def bench_train(args, extra):
    device = choose_device(args.device or "auto")
    preset = args.preset or default_preset(device.type)
    model_cfg, train_cfg = build_configs(args, preset)
    device = choose_device(train_cfg.device)  # the preset's, if it names one
    if args.steps < 1 or args.warmup < 0:
        raise TinyLLMError(f"--steps must be at least 1 and --warmup 0 or more, got {args.steps} and {args.warmup}")
    dtype = resolve_dtype(train_cfg.dtype, device)
    ctx = autocast(device, dtype)
    seed_everything(train_cfg.seed)
    torch.set_float32_matmul_precision("high")  # as train.py: TF32 matmuls on GPUs that have them

    model = GPT(model_cfg).to(device)
    optimizer = make_optimizer(model, train_cfg.lr, train_cfg.weight_decay, (train_cfg.beta1, train_cfg.beta2), device,
                               train_cfg.optimizer, train_cfg.muon_lr)
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    run_model = torch.compile(model) if train_cfg.compile else model

    # random tokens: the time of a step does not depend on what the tokens say, and no data file is needed.
    # get_batch is the one train.py uses, so batch making and the host-to-device copy are counted too.
    data = torch.randint(model_cfg.vocab_size, (1_000_000 + model_cfg.block_size,))
    micro_batch = train_cfg.batch_size // train_cfg.grad_accum_steps
    next_batch = lambda: get_batch(data, micro_batch, model_cfg.block_size, device)  # noqa: E731
    tokens_per_step = train_cfg.batch_size * model_cfg.block_size

    log(f"bench train | preset {preset} | {device} ({dtype}{', compiled' if train_cfg.compile else ''}, "
        f"{torch.get_num_threads()} threads) | {train_cfg.optimizer}")
    log(f"model {model.num_params():,} parameters: {model_cfg.n_layer} layers, {model_cfg.n_head} heads, "
        f"{model_cfg.n_embd} wide, block {model_cfg.block_size}, vocab {model_cfg.vocab_size} | "
        f"norm {model_cfg.norm}, mlp {model_cfg.mlp}, pos {model_cfg.pos}")
    log(f"tokens per step {tokens_per_step:,} = batch {train_cfg.batch_size} x block {model_cfg.block_size} | "
        f"{args.warmup} warm-up steps, then {args.steps} timed steps")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms, warmup_start = [], time.perf_counter()
    report_every = max(1, args.steps // 5)
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        # a constant LR: the schedule costs nothing, and the value does not change the speed
        loss, _ = train_step(run_model, optimizer, next_batch, train_cfg.lr, train_cfg.grad_accum_steps,
                             train_cfg.grad_clip, ctx, scaler)
        sync(device)
        dt = time.perf_counter() - t0
        if step == args.warmup - 1:
            # warm-up pays one-time costs (compilation, allocator, kernel autotuning); it is not timed
            log(f"warm-up: {args.warmup} steps in {time.perf_counter() - warmup_start:.2f} s")
        if step >= args.warmup:
            step_ms.append(1000 * dt)
            done = len(step_ms)
            if done % report_every == 0 or done == args.steps:
                log(f"step {done:>5}/{args.steps} | loss {loss:.4f} | {1000 * dt:.1f} ms | "
                    f"median so far {statistics.median(step_ms):.1f} ms/step")

    ms = statistics.median(step_ms)
    tokens_per_s = tokens_per_step / (ms / 1000)
    memory, memory_kind = peak_memory_mib(device)
    flops_per_token = model.flops_per_token()
    peak = peak_flops(device)
    mfu = flops_per_token * tokens_per_s / peak if peak else None  # only where we know the GPU's peak
    log(f"result: median {ms:.2f} ms/step (min {min(step_ms):.2f}, max {max(step_ms):.2f}) | {tokens_per_s:,.0f} tok/s"
        + (f" | peak memory {memory:,.0f} MiB ({memory_kind})" if memory is not None else "")
        + (f" | MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s" if mfu is not None else ""))
    return {
        "preset": preset,
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(train_cfg),  # optimizer, batch size, compile, ... (data is unused)
        "device": str(device),
        "dtype": dtype,
        "params": model.num_params(),
        "warmup": args.warmup,
        "steps": args.steps,
        "tokens_per_step": tokens_per_step,
        "ms_per_step": ms,
        "ms_per_step_min": min(step_ms),
        "ms_per_step_max": max(step_ms),
        "tokens_per_s": tokens_per_s,
        "peak_memory_mib": memory,
        "peak_memory_kind": memory_kind,
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "mfu": mfu,
        "step_ms": step_ms,
    }


# ----------------------------------------------------------------------------- generate: KV cache speed-up

def bench_generate(args, extra):
    model_cfg, train_cfg = build_configs(args, args.preset)
    if args.new_tokens < 1 or args.num_samples < 1:
        raise TinyLLMError(f"--new_tokens and --num_samples must be at least 1, got {args.new_tokens} and "
                           f"{args.num_samples}")
    if args.temperature < 0:
        raise TinyLLMError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    device = choose_device(train_cfg.device)
    dtype = resolve_dtype(train_cfg.dtype, device)
    ctx = autocast(device, dtype)
    seed_everything(train_cfg.seed)
    # random weights: the time per token depends on the shapes, not on what the model has learned
    model = GPT(model_cfg).to(device).eval()
    prompt = torch.zeros((args.num_samples, 1), dtype=torch.long, device=device)  # one token per sample

    def timed(use_cache, n_tokens):
        generator = torch.Generator(device).manual_seed(train_cfg.seed)  # same draws for both paths
        sync(device)
        t0 = time.perf_counter()
        with ctx:
            out = model.generate(prompt, n_tokens, temperature=args.temperature, use_cache=use_cache,
                                 generator=generator)
        sync(device)
        return out, time.perf_counter() - t0

    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, seed {train_cfg.seed}"
    log(f"bench generate | preset {args.preset} | {device} ({dtype}, {torch.get_num_threads()} threads) | "
        f"{model.num_params():,} parameters, block {model_cfg.block_size}, pos {model_cfg.pos}")
    log(f"{args.num_samples} sample(s) x {args.new_tokens} new tokens, {how}")
    timed(True, min(16, args.new_tokens))  # warm-up: first calls pay for allocations and kernel choice
    timed(False, min(16, args.new_tokens))
    results = {}
    for name, use_cache in (("kv_cache", True), ("full_recompute", False)):
        out, seconds = timed(use_cache, args.new_tokens)
        n = args.num_samples * args.new_tokens
        results[name] = {"seconds": seconds, "tokens_per_s": n / seconds,
                         "ms_per_step": 1000 * seconds / args.new_tokens,  # one step makes a token for every row
                         "tokens": out[:, 1:]}
        label = "with KV cache" if use_cache else "full recomputation"
        log(f"{label:<20} {n:,} tokens in {seconds:.3f} s | {n / seconds:,.1f} tok/s | "
            f"{1000 * seconds / args.new_tokens:.2f} ms per step")
    speedup = results["kv_cache"]["tokens_per_s"] / results["full_recompute"]["tokens_per_s"]
    # with random weights the logits are nearly tied, so rounding can flip a token: informative, not a test
    same = torch.equal(results["kv_cache"].pop("tokens"), results["full_recompute"].pop("tokens"))
    log(f"result: KV-cache speed-up {speedup:.2f}x | both paths produced the same tokens: {'yes' if same else 'no'}")
    return {
        "preset": args.preset,
        "model_config": dataclasses.asdict(model_cfg),
        "device": str(device),
        "dtype": dtype,
        "params": model.num_params(),
        "new_tokens": args.new_tokens,
        "num_samples": args.num_samples,
        "temperature": args.temperature,
        "seed": train_cfg.seed,
        **results,
        "speedup": speedup,
        "same_tokens": same,
    }


# ----------------------------------------------------------------------------- reading train.py's output

EVAL_LINE = re.compile(r"^eval\s+(\d+)/(\d+)\s+\|\s+train\s+(\S+)\s+\|\s+val\s+(\S+)(?:\s+\((\S+) bits/char\))?")
PARAMS_LINE = re.compile(r"^model\s+([\d,]+)\s+parameters")
MS_PER_STEP = re.compile(r"([\d.]+) ms/step")


def parse_eval_line(line):
    """train.py's `eval  250/3000 | train 1.9123 | val 1.9876 (2.870 bits/char) | ...` as a dict, else None."""
    m = EVAL_LINE.match(line.strip())
    if not m:
        return None
    try:
        ev = {"step": int(m[1]), "max_steps": int(m[2]), "train_loss": float(m[3]), "val_loss": float(m[4])}
        if m[5] is not None:
            ev["bits_per_char"] = float(m[5])
    except ValueError:
        return None
    return ev


def parse_params_line(line):
    """The parameter count from train.py's `model 824,897 parameters: ...` line, else None."""
    m = PARAMS_LINE.match(line.strip())
    return int(m[1].replace(",", "")) if m else None


def stop_process(proc):
    """SIGTERM lets train.py finish its step, save and exit; kill it if that takes too long.
    communicate() also drains the pipe, so the child never blocks writing its last lines."""
    proc.terminate()  # a no-op for a process that has already exited
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def run_train(cmd, stop_when=None, threads=None, label=""):
    """Run a train.py command line, echo its eval lines as they arrive, and return what it said.
    stop_when(eval dict) -> True ends the run at that eval. Times count from just before the
    process starts, so interpreter start-up, imports and data loading are all included."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch in the child reads this for its thread count
    evals, tail = [], collections.deque(maxlen=20)  # tail: the last other lines, to explain a failure
    params, ms_per_step, stopped_at, finished = None, None, None, False
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                            errors="replace", env=env)
    try:
        for line in proc.stdout:
            seconds = time.perf_counter() - start
            line = line.rstrip("\n")
            ms = MS_PER_STEP.search(line)
            if ms:
                ms_per_step = float(ms[1])  # train.py's running mean over the run so far
            ev = parse_eval_line(line)
            if ev is None:
                params = params or parse_params_line(line)
                tail.append(line)
                continue
            ev["seconds"] = seconds
            evals.append(ev)
            log(f"[{label}{seconds:8.1f} s] {line}")
            if stop_when is not None and stop_when(ev):
                stopped_at = ev
                break
        else:
            finished = True  # end of output: train.py is exiting by itself
    finally:
        if finished:
            proc.wait()  # no signal: one sent while it exits could turn a success into exit code -15
        else:
            stop_process(proc)  # we stopped early, or an error or Ctrl-C here
    return {"command": cmd, "returncode": proc.returncode, "wall_s": time.perf_counter() - start, "evals": evals,
            "params": params, "ms_per_step": ms_per_step, "stopped_at": stopped_at,
            "tail": [l for l in tail if l.strip()]}


# ----------------------------------------------------------------------------- time to target

def bench_time_to_target(args, extra):
    with tempfile.TemporaryDirectory(prefix="tinyllm-ttt-", ignore_cleanup_errors=True) as out_dir:
        # --out_dir last, so flags after -- cannot point the run at a real checkpoint folder
        cmd = [sys.executable, TRAIN_PY, *(["--preset", args.preset] if args.preset else []), *extra,
               "--out_dir", out_dir]
        log(f"bench time_to_target | val <= {args.target} | {' '.join(cmd[1:])}")
        run = run_train(cmd, stop_when=lambda ev: ev["val_loss"] <= args.target, threads=args.threads)
    hit = run["stopped_at"]
    if hit:
        log(f"result: val {hit['val_loss']:.4f} <= {args.target} at step {hit['step']} after {hit['seconds']:.1f} s "
            f"(wall clock from process start; checked only at eval steps)")
    else:
        best = min(run["evals"], key=lambda ev: ev["val_loss"], default=None)
        log(f"result: never reached val <= {args.target} in {run['wall_s']:.1f} s"
            + (f" (best val {best['val_loss']:.4f} at step {best['step']})" if best else "")
            + f"; train.py exited with code {run['returncode']}")
        if run["returncode"] != 0:
            for line in run["tail"][-5:]:
                log(f"  | {line}")
    # missing the target is a result; train.py failing before it got there is an error
    error = None if hit or run["returncode"] == 0 else f"train.py exited with code {run['returncode']}"
    return {"target": args.target, "preset": args.preset, "reached": hit is not None,
            "seconds": hit["seconds"] if hit else None, "step": hit["step"] if hit else None,
            "val_loss": hit["val_loss"] if hit else None, **run, "error": error}


# ----------------------------------------------------------------------------- ablation

# Every run sets all three switches, so a preset that picks (say) RoPE cannot leak into "vanilla".
VARIANTS = {
    "vanilla": dict(norm="layernorm", mlp="gelu", pos="learned"),
    "rmsnorm": dict(norm="rmsnorm", mlp="gelu", pos="learned"),
    "swiglu": dict(norm="layernorm", mlp="swiglu", pos="learned"),
    "sinusoidal": dict(norm="layernorm", mlp="gelu", pos="sinusoidal"),
    "rope": dict(norm="layernorm", mlp="gelu", pos="rope"),
    "all": dict(norm="rmsnorm", mlp="swiglu", pos="rope"),
}


def select_variants(only):
    if not only:
        return list(VARIANTS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        asked = ", ".join(unknown) if unknown else repr(only)
        raise TinyLLMError(f"unknown variant(s) {asked}; choose from {', '.join(VARIANTS)}")
    return names


def read_history(out_dir):
    path = os.path.join(out_dir, "history.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summarize_variant(name, run, history):
    """One row of the ablation: the curve from history.json (full precision) when train.py
    wrote it, else from the eval lines it printed."""
    curve = [(h["step"], h["val_loss"]) for h in (history or run["evals"])]
    row = {"name": name, **VARIANTS[name], "params": run["params"], "wall_s": run["wall_s"],
           "ms_per_step": run["ms_per_step"], "returncode": run["returncode"], "curve": curve,
           "steps": None, "best_val_loss": None, "best_step": None, "bpc": None, "error": None}
    if run["returncode"] != 0 or not curve:
        row["error"] = run["tail"][-1] if run["tail"] else f"train.py exited with code {run['returncode']}"
        return row
    best_step, best = min(curve, key=lambda point: point[1])
    row.update(best_val_loss=best, best_step=best_step, steps=curve[-1][0])
    # bits per character: train.py prints it on each eval line (right for every tokenizer);
    # without it, val / ln 2 holds for the char tokenizer, where one token is one character
    printed = [ev.get("bits_per_char") for ev in run["evals"] if ev["step"] == best_step]
    row["bpc"] = printed[0] if printed and printed[0] is not None else best / math.log(2)
    return row


def markdown_table(headers, rows):
    """A markdown table, every column padded to its widest cell so it also reads as plain text."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def ablation_table(rows):
    baseline = next((r["best_val_loss"] for r in rows if r["name"] == "vanilla" and r["error"] is None), None)
    headers = ["variant", "norm", "mlp", "pos", "params", "steps", "best val loss", "vs vanilla", "val bpc",
               "ms/step", "wall time"]
    table = []
    for r in rows:
        if r["error"] is not None:
            table.append([r["name"], r["norm"], r["mlp"], r["pos"], "", "", f"failed: {r['error'][:60]}", "", "",
                          "", f"{r['wall_s']:.0f} s"])
            continue
        delta = f"{r['best_val_loss'] - baseline:+.4f}" if baseline is not None else ""
        table.append([r["name"], r["norm"], r["mlp"], r["pos"], f"{r['params']:,}" if r["params"] else "?",
                      r["steps"], f"{r['best_val_loss']:.4f}", delta, f"{r['bpc']:.3f}",
                      f"{r['ms_per_step']:.1f}" if r["ms_per_step"] else "?", f"{r['wall_s']:.0f} s"])
    return markdown_table(headers, table)


def plot_curves(rows, path, title):
    fig, ax = new_plot(height=4)
    for r in rows:
        if r["curve"]:  # a failed variant has none
            ax.plot([s for s, _ in r["curve"]], [v for _, v in r["curve"]], marker=".", label=r["name"])
    ax.set(xlabel="step", ylabel="val loss (nats/token)", title=title)
    save_plot(fig, ax, path)


def bench_ablation(args, extra):
    names = select_variants(args.only)
    if args.max_steps is not None and args.max_steps < 1:
        raise TinyLLMError(f"--max_steps must be at least 1, got {args.max_steps}")
    keep_runs = args.runs_dir is not None  # a temp folder otherwise: checkpoints of every variant add up
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="tinyllm-ablation-")
    setting = f"preset {args.preset or 'default'}, {args.max_steps or 'preset'} steps"
    log(f"bench ablation | {len(names)} variant(s): {', '.join(names)} | {setting}"
        + (f" | train.py flags: {' '.join(extra)}" if extra else "") + f" | runs in {runs_dir}")
    rows = []
    try:
        for name in names:
            out_dir = os.path.join(runs_dir, name)
            switches = [f"--{k}={v}" for k, v in VARIANTS[name].items()]
            # the same settings for every variant; the switches and --out_dir come last,
            # so flags after -- cannot override what is being compared
            cmd = [sys.executable, TRAIN_PY, "--sample_tokens", "0",
                   *(["--preset", args.preset] if args.preset else []),
                   *(["--max_steps", str(args.max_steps)] if args.max_steps else []),
                   *extra, *switches, "--out_dir", out_dir]
            log(f"--- {name}: {' '.join(switches)}")
            run = run_train(cmd, threads=args.threads, label=f"{name:<10} ")
            row = summarize_variant(name, run, read_history(out_dir))
            rows.append(row)
            if row["error"]:
                log(f"{name} failed (exit code {run['returncode']}):")
                for line in run["tail"][-5:]:
                    log(f"  | {line}")
            else:
                log(f"{name}: best val {row['best_val_loss']:.4f} at step {row['best_step']} | {row['bpc']:.3f} bpc | "
                    f"{row['params'] or 0:,} parameters | {row['wall_s']:.1f} s")
    finally:
        if not keep_runs:
            shutil.rmtree(runs_dir, ignore_errors=True)

    table = ablation_table(rows)
    log(table.rstrip("\n"))
    png = os.path.splitext(args.out_md)[0] + ".png"
    title = f"val loss by variant ({setting})"
    plot_curves(rows, png, title)
    machine = machine_info()
    with open(args.out_md, "w", encoding="utf-8") as f:
        f.write(f"# Ablation: {setting}\n\n"
                f"Each row trains with train.py under the same settings, changing only the switches shown. "
                f"Best val loss over the evaluations; bpc = bits per character. Wall time includes start-up and "
                f"evaluation; ms/step is train.py's running mean.\n\n"
                f"Machine: {machine['cpu']}" + (f", {machine['gpu']}" if machine["gpu"] else "")
                + f"; torch {machine['torch']}; {machine['date']}"
                + (f"; train.py flags: `{' '.join(extra)}`" if extra else "") + "\n\n"
                + table + f"\n![val loss by variant]({os.path.basename(png)})\n")
    log(f"wrote {args.out_md} and {png}")
    failed = [r["name"] for r in rows if r["error"]]
    error = f"variant(s) failed: {', '.join(failed)}" if failed else None
    return {"preset": args.preset, "max_steps": args.max_steps, "train_flags": extra, "variants": rows,
            "markdown": args.out_md, "plot": png, "error": error}


# ----------------------------------------------------------------------------- command line

MODES = {"train": bench_train, "generate": bench_generate, "time_to_target": bench_time_to_target,
         "ablation": bench_ablation}


def build_parser():
    parser = argparse.ArgumentParser(description="Benchmark tinyllm: training and generation speed, time to a "
                                                 "target loss, and an ablation of the model's parts.")
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    def mode(name, summary):
        # conflict_handler="resolve": our own --compile (a plain switch) replaces config.py's --compile BOOL
        p = modes.add_parser(name, help=summary, description=summary, allow_abbrev=False, conflict_handler="resolve")
        p.add_argument("--out", default=os.path.join("bench_results", f"{name}.json"),
                       help="where the JSON goes (default: %(default)s)")
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
        return p

    p = mode("train", "training throughput on random tokens: ms/step, tokens/s, peak memory, MFU")
    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: as train.py)")
    p.add_argument("--steps", type=int, default=50, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps first, for compilation and allocation (default: %(default)s)")
    # train.py's flags, e.g. --n_layer --n_embd --batch_size --pos --optimizer (data, eval, schedule: unused)
    add_config_flags(p)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")

    p = mode("generate", "generation tokens/s with the KV cache and with full recomputation")
    p.add_argument("--preset", default="small", help=f"one of {', '.join(PRESETS)} (default: %(default)s)")
    p.add_argument("--new_tokens", type=int, default=1000, help="tokens generated per sample (default: %(default)s)")
    p.add_argument("--num_samples", type=int, default=1,
                   help="rows generated together, a batch (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy (the default); else sampling with --seed")
    add_config_flags(p)  # the model's shape, --device, --dtype, --seed; training-only flags do nothing here

    p = mode("time_to_target", "wall-clock seconds until train.py's val loss reaches a target")
    p.add_argument("--target", type=float, default=1.886, help="val loss to reach (default: %(default)s)")
    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: as train.py)")

    p = mode("ablation", "train the vanilla model and each modern swap at equal steps; a table and a plot")
    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: as train.py)")
    p.add_argument("--max_steps", type=int, default=None, help="steps per variant (default: the preset's)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--out_md", default=os.path.join("bench_results", "ablation.md"),
                   help="markdown table; the plot goes next to it as .png (default: %(default)s)")
    p.add_argument("--runs_dir", default=None, help="keep each variant's train.py output here (default: a temp "
                                                    "folder, removed)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:  # what follows -- is passed to train.py untouched
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if extra and args.mode not in ("time_to_target", "ablation"):
        parser.error(f"flags after -- go to train.py; only time_to_target and ablation run it, not {args.mode}")
    if args.threads is not None:
        if args.threads < 1:
            raise TinyLLMError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    result = MODES[args.mode](args, extra)
    write_json(args.out, {"mode": args.mode, "machine": machine_info(), **result})
    if result.get("error"):  # written first, so the figures of what did run are kept
        raise TinyLLMError(f"{result['error']} (see {args.out})")
    return result


if __name__ == "__main__":
    run_cli(main)
