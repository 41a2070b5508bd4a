"""Benchmarks: how fast tinyllm trains and generates, how soon it reaches a validation loss,
and what each modern part buys. A figure is printed next to a baseline measured in the same
process wherever there is one (variants interleaved step by step: shared machines drift by a
quarter and more), and written with a description of the machine as JSON to --out.

    python bench.py train --preset reference --compare dtype=float32,bfloat16   # ms/step, tokens/s, ratios
    python bench.py generate --preset small --new_tokens 1000                  # KV cache vs recompute
    python bench.py sample --checkpoint checkpoints/best.pt                     # generate.py, start-up included
    python bench.py time_to_target --target 1.886 --preset speedrun --baseline reference
    python bench.py ablation --preset tiny --max_steps 400
    python bench.py decoding --checkpoint checkpoints/best.pt --prompt "To be or not"   # greedy, beam, sampling
    python bench.py scaling                                                    # scaling laws, about 30 minutes
    python bench.py gpu_check                                                  # the GPU report, once on a GPU

Training runs go through train.py's own setup (setup_run) and records (history.json); no
console output is parsed.
"""

import machinery.openmp  # noqa: F401 (before torch loads: OpenMP's idle threads soon sleep)

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from config import GREEDY, PRESETS, GPTConfig, Sampler, RunOptions, TinyLLMError, TrainConfig, build_configs, default_preset
import sampling
import train

from machinery import beam, hardware, records
from machinery.annotate import forced_steps, model_odds
from machinery.calibrate import interleaved
from machinery.cli import (ArgumentParser, add_config_flags, bool_flag, check_writable, explicit_flags, format_seconds,
                           log, run_cli)
from machinery.device import choose_device, flops_per_token
from machinery.plots import new_plot, save_plot, split_history
from tools.plots import read_history

ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- the machine

def machine_info():
    """Enough to tell two result files apart: numbers from different machines do not compare."""
    cpu = platform.processor() or platform.machine()
    try:  # platform.processor() is often just "x86_64" on Linux; /proc/cpuinfo has the model name
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:  # no git here
        git = ""
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": hardware.gpu_name() if hardware.cuda_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "git": git.strip() or None,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def peak_memory_mib(device):
    """CUDA: the allocator's high-water mark. Elsewhere: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # Unix only
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def sync(device):
    # GPUs run asynchronously: without this a timer measures the launch, not the work
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def parse_compare(text):
    """--compare dtype=float32,bfloat16 -> [("dtype=float32", {"dtype": "float32"}), ...];
    none -> one variant, the settings as given. The first is the baseline."""
    if not text:
        return [("as given", {})]
    name, _, values = text.partition("=")
    fields = {f.name: f.type for cls in (GPTConfig, TrainConfig) for f in dataclasses.fields(cls)}
    if name not in fields or not values:
        raise TinyLLMError(f"--compare takes FIELD=A,B,... with a train.py setting, got {text!r}")
    kind = fields[name]
    try:
        return [(f"{name}={v}", {name: (bool_flag if kind is bool else kind)(v)}) for v in values.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise TinyLLMError(f"--compare {text}: values must be {kind.__name__}") from None


def new_run(preset, given, out_dir):
    """A training run set up by train.py itself (data, model, optimizer), not yet stepped.
    given: settings as flags would give them; the preset fills in the rest."""
    preset = preset or default_preset(choose_device(given.get("device", "auto")).type)
    given = {"time_budget": "", **given, "out_dir": out_dir}  # benchmarks fix their steps; no planning
    model_cfg, train_cfg = build_configs(given, preset)
    return train.setup_run(model_cfg, train_cfg, RunOptions(), preset, given)


# ----------------------------------------------------------------------------- train: throughput

def time_steps(runs, untimed, steps):
    """Milliseconds of each timed optimizer step of each run, the runs interleaved step by step."""
    log(f"{untimed} untimed steps, then {steps} timed steps" + (", variants interleaved" if len(runs) > 1 else ""))

    def step_of(run):
        cfg = run.cfg

        def step():
            train.train_step(run.train_model, run.optimizer, run.next_batch, cfg.lr, cfg.grad_accum_steps,
                             cfg.grad_clip, run.ctx, run.scaler)
            sync(run.device)
        return step

    return [[1000 * s for s in seconds] for seconds in interleaved([step_of(run) for run in runs], untimed, steps)]


def bench_train(args):
    variants = parse_compare(args.compare)
    with tempfile.TemporaryDirectory(prefix="tinyllm-bench-") as tmp:
        runs = [new_run(args.preset, {**explicit_flags(args), **overrides}, os.path.join(tmp, str(i)))
                for i, (_, overrides) in enumerate(variants)]
        times = time_steps(runs, args.untimed, args.steps)
    rows = []
    for (name, _), run, ms in zip(variants, runs, times):
        median = statistics.median(ms)
        tokens_per_s, mfu = records.speed(run, median)
        rows.append({"variant": name, "dtype": run.dtype, "ms_per_step": median, "ms_min": min(ms),
                     "tokens_per_s": tokens_per_s, "mfu": mfu, "params": run.model.num_params(), "step_ms": ms,
                     "speedup": rows[0]["ms_per_step"] / median if rows else 1.0})
    for r in rows:
        log(f"result {r['variant']:<20} median {r['ms_per_step']:8.2f} ms/step | {r['tokens_per_s']:>10,.0f} tok/s "
            f"| {r['speedup']:.2f}x the first" + (f" | MFU {100 * r['mfu']:.1f}%" if r["mfu"] else ""))
    memory = peak_memory_mib(runs[0].device)
    log(f"peak memory {memory:,.0f} MiB" if memory else "peak memory unknown")
    return {"preset": runs[0].preset, "variants": rows, "peak_memory_mib": memory,
            "model_config": dataclasses.asdict(runs[0].model_cfg), "tokens_per_step":
                runs[0].cfg.batch_size * runs[0].model_cfg.block_size}


# ----------------------------------------------------------------------------- generate: KV cache

def bench_generate(args):
    """Decoding speed, ms per token, on random weights of the preset's shape: with the KV cache
    (its one-token step recorded in a CUDA graph and replayed, where the device records one;
    then the step as it is) and recomputing the whole context. Each path's first call, which pays
    for allocations and kernel choices, is timed on its own, then its warm calls, interleaved."""
    from model import GPT

    from machinery import graphs
    from machinery.precision import autocast, resolve_dtype  # generation only
    preset = args.preset or "small"  # the README's KV-cache figure; the default help says so
    given = explicit_flags(args)
    model_cfg, train_cfg = build_configs(given, preset)
    device = choose_device(train_cfg.device)
    torch.manual_seed(train_cfg.seed)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size or 65)
    model = GPT(model_cfg).to(device).eval()  # random weights: the time per token depends on the shapes only
    # float32 unless --dtype says otherwise, as generate.py samples
    dtype = resolve_dtype(given["dtype"], device) if "dtype" in given else "float32"
    ctx = autocast(device, dtype)
    prompt = torch.zeros((args.num_samples, 1), dtype=torch.long, device=device)
    paths = {"kv_cache": (True, False), "full_recompute": (False, False)}  # name: (use_cache, replay)
    if graphs.recorder(device):
        paths = {"replayed": (True, True), **paths}

    def timed(name):
        use_cache, replay = paths[name]
        sync(device)
        t0 = time.perf_counter()
        with ctx, (contextlib.nullcontext() if replay else graphs.disabled()):
            out = sampling.generate(model, prompt, args.new_tokens, GREEDY, use_cache=use_cache)
        sync(device)
        return out, time.perf_counter() - t0

    log(f"bench generate | preset {preset} | {device} {dtype} | {model.num_params():,} parameters, block "
        f"{model_cfg.block_size} | {args.num_samples} x {args.new_tokens} tokens, greedy, {args.repeats} repeats")
    first = {name: timed(name)[1] for name in paths}  # the first call of each, the process's first first
    seconds = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved, so drift hits every path alike
        for name in paths:
            out, s = timed(name)
            seconds[name].append(s)
    result = {name: {"seconds": statistics.median(s), "ms_per_token": 1000 * statistics.median(s) / args.new_tokens,
                     "tokens_per_s": args.num_samples * args.new_tokens / statistics.median(s),
                     "first_seconds": first[name], "first_ms_per_token": 1000 * first[name] / args.new_tokens}
              for name, s in seconds.items()}
    speedup = result["full_recompute"]["seconds"] / result["kv_cache"]["seconds"]
    for name, r in result.items():
        log(f"{name:<15} {r['ms_per_token']:7.2f} ms per token | {r['tokens_per_s']:,.1f} tok/s | first call "
            f"{r['first_ms_per_token']:.2f} ms per token")
    log(f"result: the KV cache is {speedup:.2f}x faster than recomputing the context"
        + (f", {result['full_recompute']['seconds'] / result['replayed']['seconds']:.2f}x replayed"
           if "replayed" in result else ""))
    return {"preset": preset, "dtype": dtype, "model_config": dataclasses.asdict(model_cfg), **result,
            "speedup": speedup, "new_tokens": args.new_tokens, "num_samples": args.num_samples,
            "tokens_shape": list(out.shape)}


def bench_sample(args):
    """`python generate.py CHECKPOINT --max_new_tokens N` as a user runs it, start-up included,
    next to the floor under it: starting Python and importing generate.py. Interleaved."""
    if not os.path.isfile(args.checkpoint):
        raise TinyLLMError(f"checkpoint {args.checkpoint} not found (train one with: python train.py)")
    runs = {"generate.py": [sys.executable, os.path.join(ROOT, "generate.py"), args.checkpoint, "--max_new_tokens",
                            str(args.new_tokens), "--seed", "42", *(["--no_cache"] if args.no_cache else [])],
            "import only": [sys.executable, "-c", "import generate"]}
    seconds = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, cmd in runs.items():
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            seconds[name].append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise TinyLLMError(f"{name} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    wall, floor = (statistics.median(seconds[name]) for name in runs)
    log(f"result: {args.new_tokens} tokens in {wall:.2f} s wall, start-up included (median of {args.repeats}); "
        f"Python + imports alone {floor:.2f} s; sampling {1000 * (wall - floor) / args.new_tokens:.2f} ms per token")
    return {"checkpoint": args.checkpoint, "new_tokens": args.new_tokens, "wall_s": wall, "import_s": floor,
            "runs": seconds}


# ----------------------------------------------------------------------------- decoding

def repeated_ngrams(text, n=3):
    """The share of the text's word n-grams that are repeats of an earlier one: 0 when every
    one is new, near 1 when the text loops."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def bench_decoding(args):
    """The decoding lesson, measured on one checkpoint and prompt: greedy, beam search and
    sampling at several temperatures (several seeds each). For every text: its log-probability
    per token under the model (temperature 1, scored alike for every method), the share of
    repeated word 3-grams, the seconds it took, and the text itself."""
    from machinery.checkpoint import load_model
    from machinery.sources import encode_prompt
    if not os.path.isfile(args.checkpoint):
        raise TinyLLMError(f"checkpoint {args.checkpoint} not found (train one with: python train.py)")
    model, tokenizer, _ = load_model(args.checkpoint)
    idx = torch.tensor([encode_prompt(tokenizer, args.prompt)])  # (1, T), as generate.py encodes it
    methods = [("greedy", 0, None)] + [(f"beam {w}", None, w) for w in args.beams]
    methods += [(f"sampling, T = {t:g}", t, None) for t in args.temperatures]
    rows = []
    for name, temperature, width in methods:
        for seed in range(args.seeds) if temperature else [None]:
            t0 = time.perf_counter()
            if width:
                new, _ = beam.beam_search(model, idx, args.new_tokens, width)
            else:
                generator = torch.Generator().manual_seed(seed if seed is not None else 0)
                new = sampling.generate(model, idx, args.new_tokens, Sampler(temperature=temperature),
                                        generator=generator)[:, idx.size(1):]
            seconds = time.perf_counter() - t0
            logp = sum(math.log(p[0, t[0, 0]].item()) for t, p in model_odds(model, idx, new)) / new.size(1)
            text = tokenizer.decode(new[0].tolist())
            rows.append({"method": name, "seed": seed, "logp_per_token": logp, "repeated_3grams": repeated_ngrams(text),
                         "seconds": seconds, "text": text})
            log(f"{name:<18} seed {seed if seed is not None else '-':>2} | log p per token {logp:7.3f} | repeated "
                f"word 3-grams {100 * rows[-1]['repeated_3grams']:5.1f}% | {seconds:5.2f} s")
    if args.out_md:
        write_decoding_md(rows, args)
    return {"checkpoint": args.checkpoint, "prompt": args.prompt, "new_tokens": args.new_tokens, "rows": rows}


def write_decoding_md(rows, args):
    """A table (sampling: the mean over seeds and their range) and each method's first text."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"| method | log-probability per token | repeated word 3-grams | seconds for {args.new_tokens} tokens |",
             "| --- | --- | --- | --- |"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]

        def cell(key, scale=1.0, fmt="{:.3f}"):
            values = [scale * r[key] for r in rs]
            mean = fmt.format(statistics.mean(values))
            return mean if len(values) == 1 else f"{mean} ({fmt.format(min(values))} to {fmt.format(max(values))})"
        lines.append(f"| {m} | {cell('logp_per_token')} | {cell('repeated_3grams', 100, '{:.0f}%')} | "
                     f"{cell('seconds', fmt='{:.2f}')} |")
    texts = [f"**{m}**\n\n```\n{args.prompt}{next(r for r in rows if r['method'] == m)['text']}\n```" for m in methods]
    with open(args.out_md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n\n" + "\n\n".join(texts) + "\n")
    log(f"wrote {args.out_md}")


# ----------------------------------------------------------------------------- time to target

def time_to_target(preset, target, extra, label):
    """Run train.py in its own process until val <= target; the seconds run from just before the
    process starts (interpreter, imports and data loading included) to its exit."""
    with tempfile.TemporaryDirectory(prefix="tinyllm-ttt-") as out_dir:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *(["--preset", preset] if preset else []), *extra,
               "--target_loss", str(target), "--plots", "false", "--sample_tokens", "0", "--out_dir", out_dir]
        log(f"[{label}] {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise TinyLLMError(f"train.py failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        _, evals = split_history(read_history(out_dir))
    return reached(evals, target, wall, preset, label)


def reached(evals, target, wall, preset, label):
    """What a run's evaluations say about a target: reached or not, where, and in how long."""
    hit = next((h for h in evals if h["val_loss"] <= target), None)
    best = min(evals, key=lambda h: h["val_loss"])
    log(f"[{label}] " + (f"val {hit['val_loss']:.4f} <= {target} at step {hit['step']}: {wall:.1f} s from process "
                         f"start" if hit else f"never reached {target} (best {best['val_loss']:.4f}) in {wall:.1f} s"))
    return {"preset": preset, "reached": hit is not None, "seconds": wall if hit else None,
            "step": hit and hit["step"], "val_loss": hit and hit["val_loss"], "evals": evals}


def bench_time_to_target(args, extra):
    result = {"target": args.target, "run": time_to_target(args.preset, args.target, extra, args.preset or "default")}
    if args.baseline:
        result["baseline"] = time_to_target(args.baseline, args.target, [], args.baseline)
        if result["run"]["reached"] and result["baseline"]["reached"]:
            result["ratio"] = result["run"]["seconds"] / result["baseline"]["seconds"]
            log(f"result: {result['ratio']:.2f}x the time of preset {args.baseline}")
    return result


# ----------------------------------------------------------------------------- ablation

# Every run sets all three switches, so a preset that picks (say) RoPE cannot leak into "vanilla".
VARIANTS = {
    "vanilla": dict(norm="layernorm", mlp="gelu", pos="learned"),
    "rmsnorm": dict(norm="rmsnorm", mlp="gelu", pos="learned"),
    "swiglu": dict(norm="layernorm", mlp="swiglu", pos="learned"),
    "sinusoidal": dict(norm="layernorm", mlp="gelu", pos="sinusoidal"),
    "rope": dict(norm="layernorm", mlp="gelu", pos="rope"),
    "all": dict(norm="rmsnorm", mlp="swiglu", pos="rope"),
    "all+muon": dict(norm="rmsnorm", mlp="swiglu", pos="rope", optimizer="muon"),
}


def select_variants(only):
    names = [n.strip() for n in (only or ",".join(VARIANTS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise TinyLLMError(f"unknown variant(s) {', '.join(unknown) or repr(only)}; choose from {', '.join(VARIANTS)}")
    return names


def markdown_table(headers, rows):
    """A markdown table, every column padded to its widest cell so it also reads as plain text."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def bench_ablation(args):
    rows = []
    with tempfile.TemporaryDirectory(prefix="tinyllm-ablation-") as tmp:
        for name in select_variants(args.only):
            log(f"--- {name}: {VARIANTS[name]}")
            given = {**explicit_flags(args), "sample_tokens": 0, "plots": False, **VARIANTS[name]}
            run = new_run(args.preset, given, os.path.join(tmp, name))
            summary = train.train_loop(run)
            _, evals = split_history(summary["history"])
            best = min(evals, key=lambda h: h["val_loss"])
            rows.append({"name": name, **VARIANTS[name], "params": run.model.num_params(),
                         "best_val_loss": best["val_loss"], "best_step": best["step"],
                         "bpc": best["val_loss"] / run.corpus.chars_per_token / math.log(2),
                         "seconds": summary["seconds"], "curve": [(h["step"], h["val_loss"]) for h in evals]})
    base = rows[0]["best_val_loss"]
    table = markdown_table(["variant", "norm", "mlp", "pos", "optimizer", "params", "best val loss",
                            f"vs {rows[0]['name']}", "val bits/char", "train time"],
                           [[r["name"], r["norm"], r["mlp"], r["pos"], r.get("optimizer", "adamw"), f"{r['params']:,}",
                             f"{r['best_val_loss']:.4f}", f"{r['best_val_loss'] - base:+.4f}", f"{r['bpc']:.3f}",
                             f"{r['seconds']:.0f} s"] for r in rows])
    log(table)
    fig, ax = new_plot(height=4)
    for r in rows:
        ax.plot([s for s, _ in r["curve"]], [v for _, v in r["curve"]], marker=".", label=r["name"])
    ax.set(xlabel="step", ylabel="val loss (nats/token)", title="val loss by variant")
    png = os.path.splitext(args.out_md)[0] + ".png"
    save_plot(fig, ax, png)
    machine = machine_info()
    with open(args.out_md, "w", encoding="utf-8") as f:
        f.write(f"# Ablation\n\nEach row is a train.py run with the same settings but the switches shown. "
                f"Machine: {machine['cpu']}{', ' + machine['gpu'] if machine['gpu'] else ''}; torch {machine['torch']}; "
                f"{machine['date']}.\n\n{table}\n![val loss by variant]({os.path.basename(png)})\n")
    log(f"wrote {args.out_md} and {png}")
    return {"variants": rows, "markdown": args.out_md, "plot": png}


# ----------------------------------------------------------------------------- scaling laws

# (n_layer, n_embd, n_head): model sizes from about 30 thousand to 1.3 million parameters (43x),
# the default tiny preset's 2 x 160 among them; the rest of each run is the tiny preset's
SCALING_SHAPES = [(1, 48, 2), (2, 64, 2), (2, 96, 3), (2, 160, 5), (3, 192, 6)]
DATA_FRACTIONS = [1 / 8, 1 / 4, 1 / 2, 1]
SCALING_EVAL_ITERS = 30  # batches per split at each evaluation: a val loss to about 0.01


def scaling_run(shape, steps, out_dir, dtype, data, data_fraction=1.0, evals=1):
    """A tiny-preset run of the given shape, trained by train.py's loop to steps (warmup a tenth
    of it, the cosine to its end), on the first data_fraction of the training split. Evaluated
    evals times, the last at the end: {"params", "flops", "val", "best_val", "train", "seconds"}."""
    n_layer, n_embd, n_head = shape
    run = new_run("tiny", {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "max_steps": steps,
                           "warmup_steps": max(1, min(100, steps // 10)), "eval_iters": SCALING_EVAL_ITERS,
                           "eval_interval": max(1, steps // evals), "log_interval": steps, "sample_tokens": 0,
                           "plots": False, "dtype": dtype, "data": data}, out_dir)
    run.corpus.train = run.corpus.train[:int(len(run.corpus.train) * data_fraction)]  # the batches read it lazily
    t0 = time.perf_counter()
    _, evals = split_history(train.train_loop(run)["history"])
    vals = [e for e in evals if e["step"] > 0]  # the step-0 evaluation is the untrained model's
    tokens = steps * run.cfg.batch_size * run.model_cfg.block_size
    return {"params": run.model.num_params(), "flops": flops_per_token(run.model) * tokens, "steps": steps,
            "val": vals[-1]["val_loss"], "best_val": min(v["val_loss"] for v in vals), "train": vals[-1]["train_loss"],
            "seconds": time.perf_counter() - t0, "dtype": run.dtype}


def step_seconds(shapes, out_dir, data):
    """(seconds per training step, training FLOPs per step) of each shape on this machine (3
    untimed and 5 timed steps each, interleaved), and the precision --dtype auto takes here."""
    runs = []
    for i, (n_layer, n_embd, n_head) in enumerate(shapes):
        given = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "max_steps": 10, "warmup_steps": 1,
                 "plots": False, "sample_tokens": 0, "data": data,
                 "dtype": runs[0].dtype if runs else "auto"}  # measured once, by the first
        runs.append(new_run("tiny", given, os.path.join(out_dir, f"probe{i}")))
    times = time_steps(runs, 3, 5)
    return ([statistics.mean(t) / 1000 for t in times],
            [flops_per_token(r.model) * r.cfg.batch_size * r.model_cfg.block_size for r in runs], runs[0].dtype)


def plan_scaling(seconds, flops, minutes, budgets, default):
    """The study's compute budgets (training FLOPs), 2x apart, as large as lets every shape train
    at every budget and the default shape on each share of the text (for half the steps the
    largest budget gives it) within minutes on this machine."""
    per_flop = sum(s / f for s, f in zip(seconds, flops))  # seconds for a FLOP of every shape
    share = [2.0 ** -k for k in range(budgets - 1, -1, -1)]  # 1/2^(n-1) ... 1/2, 1
    data = len(DATA_FRACTIONS) / 2 * seconds[default] / flops[default]  # seconds per FLOP of the top budget
    top = minutes * 60 / (per_flop * sum(share) + data)
    return [top * x for x in share]


def fit_power_law(C, L):
    """L(C) = L_inf + a * C^(-alpha), least squares with L_inf >= 0 (a loss has no negative floor):
    for each alpha on a grid, L_inf and a are a linear fit (a alone when L_inf would fall below
    0); the alpha with the smallest error (and a > 0) wins. Returns (L_inf, a, alpha, rms error),
    or None when no alpha fits a falling curve. L_inf = 0 says this range of compute shows no
    floor yet: the points lie on a straight line in log-log."""
    C, L = torch.tensor(C, dtype=torch.float64), torch.tensor(L, dtype=torch.float64)
    alphas = torch.linspace(0.01, 1.5, 1491, dtype=torch.float64)
    x = (C / C.min())[None, :] ** -alphas[:, None]  # (alphas, points)
    X = torch.stack([torch.ones_like(x), x], dim=2)  # (alphas, points, 2)
    coef = torch.linalg.lstsq(X, L.expand(len(alphas), -1)[..., None]).solution[..., 0]  # (alphas, 2)
    floorless = torch.stack([torch.zeros(len(alphas), dtype=torch.float64), (x @ L) / (x * x).sum(1)], dim=1)
    coef = torch.where((coef[:, :1] < 0), floorless, coef)
    err = ((X @ coef[..., None])[..., 0] - L).pow(2).mean(1).sqrt().masked_fill(coef[:, 1] <= 0, math.inf)
    k = int(err.argmin())
    if not math.isfinite(err[k]):
        return None
    alpha = alphas[k].item()
    return coef[k, 0].item(), coef[k, 1].item() * C.min().item() ** alpha, alpha, err[k].item()


def isoflop_minimum(rows):
    """The compute-optimal point of one budget: a parabola through loss against log(params) of its
    best three runs around the lowest, its vertex where it lies inside them, else the lowest run.
    Returns (params, loss)."""
    rows = sorted(rows, key=lambda r: r["params"])
    i = min(range(len(rows)), key=lambda j: rows[j]["val"])
    around = rows[max(0, min(i - 1, len(rows) - 3)):][:3]
    x = torch.tensor([math.log(r["params"]) for r in around], dtype=torch.float64)
    y = torch.tensor([r["val"] for r in around], dtype=torch.float64)
    a, b, c = torch.linalg.lstsq(torch.stack([x ** 2, x, torch.ones_like(x)], 1), y[:, None]).solution[:, 0].tolist()
    if len(around) == 3 and a > 0 and x[0] <= -b / (2 * a) <= x[-1]:
        vertex = -b / (2 * a)
        return math.exp(vertex), a * vertex ** 2 + b * vertex + c
    return rows[i]["params"], rows[i]["val"]


def bench_scaling(args):
    """Scaling laws on this machine: every shape at every compute budget (IsoFLOP curves), the
    compute-optimal frontier fitted with L(C) = L_inf + a C^-alpha, and one shape on fractions of
    the training text; progress with an ETA, plots, and the size five minutes of compute buys."""
    shapes = SCALING_SHAPES[1:4] if args.quick else SCALING_SHAPES
    budgets_n, minutes = (3, 3.0) if args.quick else (args.budgets, args.minutes)
    saved = {}
    if args.reuse and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            saved = json.load(f)
    done, probe = {r["key"]: r for r in saved.get("runs", [])}, saved.get("probe")
    with tempfile.TemporaryDirectory(prefix="tinyllm-scaling-") as tmp:
        default = shapes.index((2, 160, 5)) if (2, 160, 5) in shapes else len(shapes) // 2
        if not probe:  # --reuse keeps the saved plan, so the saved runs are the plan's runs
            seconds, flops, dtype = step_seconds(shapes, tmp, args.data)
            probe = {"seconds": seconds, "flops": flops, "dtype": dtype,
                     "budgets": plan_scaling(seconds, flops, minutes, budgets_n, default),
                     "five_minutes": 0.9 * 300 / seconds[default] * flops[default]}  # the default run's 5 minutes
        seconds, flops, dtype, budgets, five_minutes = (probe[k] for k in ("seconds", "flops", "dtype", "budgets",
                                                                           "five_minutes"))
        for (L, C, H), s, f in zip(shapes, seconds, flops):
            log(f"{L} x {C}: {1000 * s:.0f} ms/step in {dtype}, {f:.2e} FLOPs/step")
        data_steps = max(10, round(budgets[-1] / flops[default] / 2))
        plan = [("iso", shape, max(10, round(b / f)), b, 1.0) for b in budgets for shape, f in zip(shapes, flops)]
        plan += [("data", shapes[default], data_steps, None, frac) for frac in DATA_FRACTIONS]
        rows, t0 = [], time.perf_counter()
        expected = [steps * seconds[shapes.index(shape)] for _, shape, steps, _, _ in plan]
        for i, (kind, shape, steps, budget, frac) in enumerate(plan):
            key = f"{kind} {shape} {steps} {budget} {frac}"
            if key in done:
                row = done[key]
            else:
                row = {"key": key, "kind": kind, "shape": list(shape), "budget": budget, "data_fraction": frac,
                       **scaling_run(shape, steps, os.path.join(tmp, f"run{i}"), dtype, args.data, frac,
                                     evals=4 if kind == "data" else 1)}
            rows.append(row)
            spent = time.perf_counter() - t0
            left = sum(expected[i + 1:]) * spent / max(1e-9, sum(expected[:i + 1]))
            log(f"run {i + 1}/{len(plan)} {kind:<4} {shape[0]} x {shape[1]:<3} {row['params']:>9,} params | "
                f"{steps:>5} steps | {row['flops']:.2e} FLOPs | data {frac:.3g} | val {row['val']:.4f} "
                f"(best {row['best_val']:.4f}) | {row['seconds']:.0f} s | elapsed {format_seconds(spent)}, "
                f"ETA {format_seconds(left)}")
            with open(args.out, "w", encoding="utf-8") as f:  # (kept up to date: --reuse continues an interrupted study)
                json.dump({"probe": probe, "runs": rows}, f, indent=1)
    return {"probe": probe, **summarize_scaling(rows, budgets, five_minutes, args)}


def summarize_scaling(rows, budgets, five_minutes, args):
    """The frontier, the fit, what it says at five minutes of compute, the plots and the markdown."""
    iso = [r for r in rows if r["kind"] == "iso"]
    frontier = []
    for b in budgets:
        at = [r for r in iso if r["budget"] == b]
        n_opt, l_opt = isoflop_minimum(at)
        frontier.append({"flops": statistics.mean(r["flops"] for r in at), "params": n_opt, "val": l_opt})
    l_inf, a, alpha, err = fit_power_law([p["flops"] for p in frontier], [p["val"] for p in frontier])
    fits = [fit_power_law([p["flops"] for j, p in enumerate(frontier) if j != k],
                          [p["val"] for j, p in enumerate(frontier) if j != k]) for k in range(len(frontier))]
    alphas = [f[2] for f in fits if f]
    spread = math.sqrt((len(alphas) - 1) / len(alphas) * sum((x - statistics.mean(alphas)) ** 2 for x in alphas))
    logs = torch.tensor([[math.log(p["flops"]), math.log(p["params"])] for p in frontier], dtype=torch.float64)
    slope, icpt = torch.linalg.lstsq(torch.stack([logs[:, 0], torch.ones(len(logs), dtype=torch.float64)], 1),
                                     logs[:, 1:]).solution[:, 0].tolist()
    n_five = math.exp(slope * math.log(five_minutes) + icpt)
    result = {"runs": rows, "frontier": frontier, "fit": {"L_inf": l_inf, "a": a, "alpha": alpha, "alpha_jackknife": spread,
              "rms": err}, "params_vs_flops_exponent": slope, "five_minutes_flops": five_minutes,
              "optimal_params_at_five_minutes": n_five,
              "predicted_loss_at_five_minutes": l_inf + a * five_minutes ** -alpha}
    log(f"fit: L(C) = {l_inf:.3f} + {a:.3g} C^-{alpha:.3f} (alpha {alpha:.3f} +- {spread:.3f} by jackknife, rms "
        f"{err:.4f}); compute-optimal params ~ C^{slope:.2f}")
    log(f"five minutes here: {five_minutes:.2e} FLOPs -> compute-optimal size about {n_five:,.0f} parameters, "
        f"predicted val {result['predicted_loss_at_five_minutes']:.3f}")
    draw_scaling(result, budgets, args.out_png)
    return result


def draw_scaling(result, budgets, path):
    """Three panels: loss against parameters at each budget (the IsoFLOP curves); loss against
    training FLOPs with the frontier and its fitted law; loss against the share of the text."""
    fig, axes = new_plot(4.2, 15, grid=(1, 3))
    iso, data = ([r for r in result["runs"] if r["kind"] == k] for k in ("iso", "data"))
    for b in budgets:
        at = sorted((r for r in iso if r["budget"] == b), key=lambda r: r["params"])
        axes[0][0].plot([r["params"] for r in at], [r["val"] for r in at], marker="o", label=f"{b:.1e} FLOPs")
    axes[0][0].plot([p["params"] for p in result["frontier"]], [p["val"] for p in result["frontier"]], "k*",
                    markersize=10, label="compute-optimal")
    axes[0][0].set(xscale="log", xlabel="parameters", ylabel="val loss (nats/token)", title="IsoFLOP: loss by size")
    for shape in sorted({tuple(r["shape"]) for r in iso}):
        at = [r for r in iso if tuple(r["shape"]) == shape]
        axes[0][1].plot([r["flops"] for r in at], [r["val"] for r in at], marker="o", linestyle="none",
                        label=f"{shape[0]} x {shape[1]} ({at[0]['params']:,})")
    fit, five = result["fit"], result["five_minutes_flops"]
    c = torch.logspace(math.log10(min(r["flops"] for r in iso)), math.log10(five * 2), 100).tolist()
    axes[0][1].plot(c, [fit["L_inf"] + fit["a"] * x ** -fit["alpha"] for x in c], "k-",
                    label=f"L = {fit['L_inf']:.2f} + {fit['a']:.3g} C^-{fit['alpha']:.3f}")
    axes[0][1].axvline(five, color="grey", linestyle="--", label="five minutes here")
    axes[0][1].set(xscale="log", xlabel="training FLOPs", ylabel="val loss", title="loss against compute")
    fracs = [r["data_fraction"] for r in data]
    axes[0][2].plot(fracs, [r["val"] for r in data], marker="o", label="at the end")
    axes[0][2].plot(fracs, [r["best_val"] for r in data], marker="s", label="best of 4 evaluations")
    axes[0][2].plot(fracs, [r["train"] for r in data], marker=".", linestyle=":", label="train loss at the end")
    axes[0][2].set(xscale="log", xlabel="share of the training text", ylabel="loss",
                   title=f"one model, {data[0]['steps'] if data else 0} steps, less text" if data else "")
    axes[0][2].set_xticks(fracs, [f"1/{round(1 / f)}" if f < 1 else "all" for f in fracs])
    axes[0][2].minorticks_off()
    for ax in axes[0]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_plot(fig, None, path)
    log(f"wrote {path}")


# ----------------------------------------------------------------------------- gpu_check

def check_cache(model, ctx, dtype, n=250):
    """Does the KV cache compute what recomputation computes, here? Over a greedy text of n
    tokens (recomputed), the largest difference between the two's logits, judged against the
    precision's tolerance (8 units in the last place of the largest logit; TF32's where CUDA
    multiplies float32 in TF32); and where the two greedy texts first part, with the recomputed
    top-2 margin there. Once they part every later token differs, so a share of agreeing tokens
    measures nothing; a parting at a near-tie is rounding, not a wrong cache."""
    device = model.wte.weight.device
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    with ctx:
        full_text, cached_text = (sampling.generate(model, prompt, n, GREEDY, use_cache=c)
                                  for c in (False, True))
        new = full_text[:, 1:]
        full, cached = (torch.stack([logits[0].float() for _, logits in forced_steps(model, prompt, new, c)])
                        for c in (False, True))  # each (n, V)
    eps = torch.finfo(getattr(torch, dtype)).eps
    if dtype == "float32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        eps = 2.0 ** -10  # TF32 keeps 10 bits of mantissa
    tolerance, diff = 8 * eps * full.abs().max().item(), (cached - full).abs().max().item()
    parted = (cached_text != full_text)[0].nonzero()
    parts_at = parted[0].item() - 1 if len(parted) else None  # among the new tokens
    margin = None
    if parts_at is not None:
        top2 = full[parts_at].topk(2).values
        margin = (top2[0] - top2[1]).item()
    return {"tokens": n, "max_diff": diff, "tolerance": tolerance, "agrees": diff <= tolerance, "parts_at": parts_at,
            "margin": margin}


def describe_cache_check(cache, dtype):
    verdict = "KV cache agrees with recompute" if cache["agrees"] else "KV cache DISAGREES with recompute"
    line = (f"{verdict}: largest logit difference {cache['max_diff']:.2g} over {cache['tokens']} teacher-forced "
            f"tokens (tolerance {cache['tolerance']:.2g} in {dtype})")
    if cache["parts_at"] is None:
        return line + "; the greedy texts are the same"
    return line + (f"; the greedy texts part at token {cache['parts_at']}, where the recomputed top-2 margin "
                   f"is {cache['margin']:.3g}")


# What the report's figures should be on an H100-class GPU (docs/platforms.md). The report checks
# them where the GPU's name says H100 or H200, and shows them beside the figures elsewhere.
GPU_TARGETS = {"train_wall": 45.0, "train_best_val": 1.440, "decode_ms": 0.5, "cache_speedup": 3.0,
               "first_over_warm": 2.0, "generate_wall": 5.5}
# --quick: the report's every step at a toy size, a smoke test that runs anywhere (the tests run it)
QUICK = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--batch_size", "4",
         "--max_steps", "10", "--warmup_steps", "2", "--eval_interval", "5", "--eval_iters", "2", "--plots", "false"]


def bench_gpu_check(args):
    """The GPU report, one command: the GPU's tests under the README's test command; start-up
    timestamps of train.py and generate.py, split into torch's share and tinyllm's; the default
    run, --compile and --dtype float16 as a user runs them (wall, best val, ms/step, MFU);
    decoding in float32 and bfloat16, first call and warm; generate.py's 1,000 tokens, start-up
    included; and the KV cache's agreement with recomputation in every dtype x compile. Written as
    Markdown (--out_md) and JSON (--out). --quick: all of it at a toy size, no GPU tests."""
    from experiments import gpu_report
    device = choose_device("auto")
    report = {"quick": args.quick, "machine": {**machine_info(), "cuda": torch.version.cuda}}
    part = functools.partial(gpu_report.part, report)  # each part on its own: one that fails is reported as such
    log(f"gpu_check on {report['machine']['gpu'] or device}: the GPU tests")
    part("gpu_tests", lambda: {"summary": "not run (--quick)"} if args.quick else gpu_report.gpu_tests())
    with tempfile.TemporaryDirectory(prefix="tinyllm-gpu-check-", ignore_cleanup_errors=True) as tmp:
        try:
            log("training as a user runs it")
            part("training", training_runs, args.quick, device, tmp)
            part("startup", startup, report["training"], device, tmp, args.quick)
            log("decoding")
            part("decoding", decoding, args.quick, device, tmp)
            part("generate", gpu_report.generate_runs, os.path.join(tmp, "default", "best.pt"),
                 40 if args.quick else 1000, 1 if args.quick else 3)
            log("the KV cache against recomputation")
            compiled = not args.quick and all(r["code"] == 0 for r in report.get("training", []))
            part("checks", cache_checks, args.quick, device, tmp, compiled)
            part("speed", steady_speed, args.quick, tmp)
            if hardware.gpu_count() > 1:
                part("torchrun_ok", torchrun_check, tmp)
        finally:  # whatever happened, the page says what was measured
            report["targets"] = target_rows(report)
            gpu_report.write(report, args.out_md)
    report.update({k: report["speed"].get(k) for k in ("ms_per_step", "tokens_per_s", "mfu")})  # as the JSON had them
    return report


def training_runs(quick, device, tmp):
    """python train.py as it comes, then with --compile and with --dtype float16 (each where it
    applies: --compile needs a compiler; float16's loss scaling is for CUDA)."""
    from experiments import gpu_report
    base = QUICK + ["--sample_tokens", "20", "--log_interval", "1"] if quick else []  # (quick: it times start-up too)
    variants = [("default", [])] + [("compile", ["--compile"]), ("float16", ["--dtype", "float16"])] * (
        device.type == "cuda" and not quick)
    return [gpu_report.train_run(base + flags, os.path.join(tmp, name)) for name, flags in variants]


def startup(training, device, tmp, quick):
    """When train.py's first line, device line and first step come (a short run that reports
    every step), and what of its start-up is torch's (the probe) and what tinyllm's own."""
    from experiments import gpu_report
    split = gpu_report.startup_split(device.type)
    if quick:  # the default run at a toy size reports every step already
        run = dict(training[0], label="python train.py (--quick)")
    else:
        short = ["--max_steps", "20", "--eval_interval", "1000", "--eval_iters", "2", "--plots", "false",
                 "--log_interval", "1", "--sample_tokens", "0"]
        run = dict(gpu_report.train_run(short, os.path.join(tmp, "startup")), label="python train.py (20 steps, a line each)")
    if "error" not in split and run["device_line"] is not None:
        split["train.py's own set-up"] = run["device_line"] - sum(split.values())
    log("  start-up: " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items() if isinstance(v, float)))
    return {"split": split, "runs": [run]}


def decoding(quick, device, tmp):
    """bench.py generate in a process of its own for each dtype, so that each first call is a
    process's first, as generate.py's is."""
    from machinery.precision import has_native_bf16
    dtypes = ["float32"] + ["bfloat16"] * has_native_bf16(device)
    shape = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16"] if quick else []
    new_tokens, rows, results = 24 if quick else 1000, [], {}
    for dtype in dtypes:
        out = os.path.join(tmp, f"generate-{dtype}.json")
        done = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "generate", "--preset", "small", *shape,
                               "--dtype", dtype, "--new_tokens", str(new_tokens), "--repeats", "1" if quick else "3",
                               "--out", out], cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            rows.append([dtype, "failed", (done.stderr.strip().splitlines() or ["?"])[-1], "", ""])
            continue
        with open(out, encoding="utf-8") as f:
            results[dtype] = json.load(f)
        for path in ("replayed", "kv_cache", "full_recompute"):
            if path in results[dtype]:
                r = results[dtype][path]
                rows.append([dtype, path, f"{r['first_ms_per_token']:.3f}", f"{r['ms_per_token']:.3f}",
                             f"{r['first_seconds'] / r['seconds']:.2f}"])
    return {"preset": "small" + (" (--quick: a toy shape)" if quick else ""), "new_tokens": new_tokens,
            "rows": rows, "results": results}


def cache_checks(quick, device, tmp, compiled=True):
    """Every dtype x compile trains a few steps, then the KV cache (replayed where the device
    records it) must compute what recomputation computes, within the precision's tolerance.
    compiled False: no --compile (quick, or train.py --compile failed here: no compiler)."""
    from machinery.precision import has_native_bf16
    preset, steps = ("tiny", 4) if quick else ("small", 20)
    shape = dict(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=4) if quick else {}
    dtypes = ["float32"] + ["bfloat16"] * has_native_bf16(device) + ["float16"] * (device.type == "cuda")
    rows = []
    for dtype in dtypes:
        for compile in (False, True) if compiled else (False,):
            given = {**shape, "dtype": dtype, "compile": compile, "max_steps": steps, "eval_interval": steps,
                     "log_interval": steps, "eval_iters": 2, "sample_tokens": 0, "plots": False}
            run = new_run(preset, given, os.path.join(tmp, f"check-{dtype}-{compile}"))
            _, evals = split_history(train.train_loop(run)["history"])
            cache = check_cache(run.model.eval(), run.ctx, run.dtype, 48 if quick else 250)
            line = describe_cache_check(cache, run.dtype)
            rows.append({"dtype": dtype, "compile": compile, "val_first": evals[0]["val_loss"],
                         "val_last": evals[-1]["val_loss"], "cache_agrees": cache["agrees"], "cache": cache, "line": line})
            log(f"check {dtype:<9} compile={compile!s:<5} val {evals[0]['val_loss']:.3f} -> "
                f"{evals[-1]['val_loss']:.3f} | {line}")
    return rows


def steady_speed(quick, tmp):
    """The default preset's ms/step, tokens/s and MFU once warm, timed in this process."""
    preset, steps = ("tiny", 4) if quick else (None, 20)
    shape = dict(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=4) if quick else {}
    run = new_run(preset, {**shape, "plots": False}, os.path.join(tmp, "speed"))
    ms = statistics.median(time_steps([run], 3, steps)[0])
    tokens_per_s, mfu = records.speed(run, ms)
    log(f"{run.preset} ({run.dtype}), warm: {ms:.1f} ms/step | {tokens_per_s:,.0f} tok/s"
        + (f" | MFU {100 * mfu:.1f}%" if mfu else ""))
    return {"preset": run.preset, "dtype": run.dtype, "ms_per_step": ms, "tokens_per_s": tokens_per_s, "mfu": mfu}


def torchrun_check(tmp):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={hardware.gpu_count()}",
           os.path.join(ROOT, "train.py"), "--preset", "small", "--max_steps", "20", "--sample_tokens", "0",
           "--out_dir", os.path.join(tmp, "ddp")]
    ok = subprocess.run(cmd).returncode == 0
    log(f"torchrun on {hardware.gpu_count()} GPUs: {'ok' if ok else 'FAILED'}")
    return ok


def target_rows(report):
    """Each target beside its figure; met or not only on an H100-class GPU, the class they are for."""
    t, judged = GPU_TARGETS, any(name in (report["machine"]["gpu"] or "") for name in ("H100", "H200"))
    training, gen = report.get("training"), report.get("generate", {})  # (a part that failed holds an error)
    default = training[0] if isinstance(training, list) and training[0]["code"] == 0 else {}
    results = report.get("decoding", {}).get("results", {})
    f32 = results.get("float32", {})
    fast = f32.get("replayed") or f32.get("kv_cache")
    users = [r.get("replayed") or r.get("kv_cache") for r in results.values()]  # what generate.py decodes with
    worst_first = max((p["first_seconds"] / p["seconds"] for p in users if p), default=None)
    rows = [("python train.py: wall, process start to exit", default.get("wall"), t["train_wall"], "s"),
            ("python train.py: best val loss", default.get("best_val"), t["train_best_val"], ""),
            ("decoding with the cache, float32, ms/token", fast and fast["ms_per_token"], t["decode_ms"], ""),
            ("the cache against recomputing, float32", fast and f32["full_recompute"]["seconds"] / fast["seconds"],
             t["cache_speedup"], "x"),
            ("decoding's first call / warm, worst dtype", worst_first, t["first_over_warm"], "x"),
            (f"python generate.py, {gen.get('new_tokens', 1000):,} tokens, wall", gen.get("wall"), t["generate_wall"],
             "s")]
    out = []
    for name, value, target, unit in rows:
        at_least = unit == "x" and "first" not in name
        met = "-" if not judged or value is None else ("yes" if (value >= target if at_least else value <= target) else "NO")
        out.append({"figure": name, "measured": "-" if value is None else f"{value:.3f}{unit}",
                    "target": f"{'>=' if at_least else '<='} {target:g}{unit}", "met": met})
    return out


# ----------------------------------------------------------------------------- command line

def build_parser():
    parser = ArgumentParser(description="Benchmark tinyllm's training, generation, time to a target loss, and "
                                        "an ablation of the model's parts.")
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    def mode(name, summary, train_flags=True):
        p = modes.add_parser(name, help=summary, description=summary)
        p.add_argument("--out", default=os.path.join("bench_results", f"{name}.json"), help="where the JSON goes")
        if train_flags:  # train.py's settings: preset, model shape, batch, device, dtype, threads, ...
            p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: as train.py; "
                                                          f"small for generate)")
            add_config_flags(p, GPTConfig)
            add_config_flags(p, TrainConfig)
        return p

    p = mode("train", "training throughput: ms/step and tokens/s, variants interleaved")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (default: %(default)s)")
    p.add_argument("--untimed", type=int, default=5, help="steps before the timed ones, which pay for compilation "
                                                          "and allocation (default: %(default)s)")
    p.add_argument("--compare", default=None, help="FIELD=A,B,...: variants of one setting, the first the baseline")
    p = mode("generate", "generation speed with the KV cache against full recomputation")
    p.add_argument("--new_tokens", type=int, default=1000)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs of each path, interleaved; the median counts")
    p = mode("sample", "python generate.py end to end, start-up included", False)
    p.add_argument("--checkpoint", default=os.path.join("checkpoints", "best.pt"))
    p.add_argument("--new_tokens", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_cache", action="store_true", help="time generate.py --no_cache instead")
    p = mode("time_to_target", "seconds from process start until train.py's val loss reaches a target", False)
    p.add_argument("--target", type=float, default=1.886)
    p.add_argument("--preset", default=None)
    p.add_argument("--baseline", default=None, help="also time this preset, for a ratio")
    p = mode("ablation", "every modern switch alone and together, at equal steps: a table and a plot")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--out_md", default=os.path.join("bench_results", "ablation.md"))
    p = mode("decoding", "greedy, beam search and sampling from one checkpoint: log-probability and repetition", False)
    p.add_argument("--checkpoint", default=os.path.join("checkpoints", "best.pt"))
    p.add_argument("--prompt", default="To be or not")
    p.add_argument("--new_tokens", type=int, default=300)
    p.add_argument("--beams", type=lambda s: [int(w) for w in s.split(",")], default=[4, 8], help="beam widths")
    p.add_argument("--temperatures", type=lambda s: [float(t) for t in s.split(",")], default=[0.5, 0.8, 1.0, 1.2])
    p.add_argument("--seeds", type=int, default=3, help="samples per temperature")
    p.add_argument("--out_md", default=os.path.join("bench_results", "decoding.md"))
    p = mode("scaling", "scaling laws: sizes x compute budgets, the fitted law, less data; about 30 minutes", False)
    p.add_argument("--minutes", type=float, default=23.0, help="what the runs may take on this machine (default: "
                                                               "%(default)s; the probes and plots add about a minute)")
    p.add_argument("--budgets", type=int, default=4, help="compute budgets, 2x apart (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="3 sizes, 3 budgets, about 3 minutes: a first look")
    p.add_argument("--reuse", action="store_true", help="keep the plan and the runs --out already holds (an "
                                                         "interrupted study, or new plots and fit from a finished one)")
    p.add_argument("--out_png", default=os.path.join("bench_results", "scaling.png"))
    p.add_argument("--data", default=TrainConfig.data, help="the text (default: %(default)s)")
    p = mode("gpu_check", "the GPU report, once on a GPU (10 to 15 minutes): tests, start-up, training runs, "
                          "decoding, generate.py, the KV cache in every precision", False)
    p.add_argument("--quick", action="store_true", help="all of it at a toy size, without the GPU tests (a smoke test "
                                                        "on any device)")
    p.add_argument("--out_md", default=os.path.join("bench_results", "gpu_report.md"), help="the Markdown report")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # after --: flags for train.py (time_to_target)
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    if extra and args.mode != "time_to_target":
        raise TinyLLMError(f"flags after -- go to train.py, which only time_to_target runs, not {args.mode}")
    for name in ("steps", "new_tokens", "num_samples", "repeats", "seeds"):
        if getattr(args, name, 1) < 1:
            raise TinyLLMError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if getattr(args, "untimed", 0) < 0:
        raise TinyLLMError(f"--untimed must be 0 or more, got {args.untimed}")
    for flag, path in (("--out", args.out), ("--out_md", getattr(args, "out_md", None)),
                       ("--out_png", getattr(args, "out_png", None))):
        if path:  # checked now, not after an hour of benchmarks
            check_writable(path, flag, make_folder=True)
    if args.mode == "time_to_target":
        result = bench_time_to_target(args, extra)
    else:
        modes = {"train": bench_train, "generate": bench_generate, "sample": bench_sample, "ablation": bench_ablation,
                 "gpu_check": bench_gpu_check, "decoding": bench_decoding, "scaling": bench_scaling}
        result = modes[args.mode](args)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"mode": args.mode, "machine": machine_info(), **result}, f, indent=1)
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    run_cli(main)
