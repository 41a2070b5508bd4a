"""Speed (bench.py train, generate, sample, time_to_target): steps, decoding, generate.py, the time to a val loss."""

import argparse
import dataclasses
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import sampling
from config import GREEDY, GPTConfig, TinyLLMError, TrainConfig, build_configs
from model import GPT
from deep_dives import graphs
from experiments.runs import ROOT, new_run, peak_memory_mib, step_times, sync
from machinery import plots, records
from machinery.cli import bool_flag, explicit_flags, log
from machinery.device import autocast, choose_device, interleaved, resolve_dtype


def parse_compare(text):
    """--compare dtype=float32,bfloat16 -> [("dtype=float32", {"dtype": "float32"}), ...], the first the baseline."""
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


def bench_train(args):
    variants = parse_compare(args.compare)
    with tempfile.TemporaryDirectory(prefix="tinyllm-bench-") as tmp:
        runs = [new_run(args.preset, {**explicit_flags(args), **overrides}, os.path.join(tmp, str(i)))
                for i, (_, overrides) in enumerate(variants)]
        times = step_times(runs, args.untimed, args.steps)
    rows = []
    for (name, _), run, ms in zip(variants, runs, times):
        median = statistics.median(ms)
        tokens_per_s, mfu = records.speed(median, run.cfg.batch_size, run.model, run.device, run.dtype, run.world)
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


def bench_generate(args):
    """Decoding ms per token: the KV cache (also replayed from a CUDA graph where it can) against full recompute."""
    preset = args.preset or "small"  # the README's KV-cache figure; the default help says so
    given = explicit_flags(args)
    model_cfg, train_cfg = build_configs(given, preset)
    device = choose_device(train_cfg.device)
    torch.manual_seed(train_cfg.seed)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size or 65)
    model = GPT(model_cfg).to(device).eval()  # random weights: the time per token depends on the shapes only
    dtype = resolve_dtype(given["dtype"], device) if "dtype" in given else "float32"  # as generate.py samples
    ctx = autocast(device, dtype)
    prompt = torch.zeros((args.num_samples, 1), dtype=torch.long, device=device)
    paths = {"replayed": (True, True)} if graphs.recorder(device) else {}  # name: (use_cache, replay)
    paths |= {"kv_cache": (True, False), "full_recompute": (False, False)}

    def generate_with(name):  # one generation by a path, the device done with it
        use_cache, replay = paths[name]
        with ctx:
            shapes[name] = sampling.generate(model, prompt, args.new_tokens, GREEDY, use_cache=use_cache,
                                             replay=graphs.replayable if replay else None).shape
        sync(device)

    log(f"bench generate | preset {preset} | {device} {dtype} | {model.num_params():,} parameters, block "
        f"{model_cfg.block_size} | {args.num_samples} x {args.new_tokens} tokens, greedy, {args.repeats} repeats")
    shapes, calls = {}, [functools.partial(generate_with, name) for name in paths]
    sync(device)  # the model's weights are on the device before the first timed call
    first = {name: s[0] for name, s in zip(paths, interleaved(calls, 0, 1))}  # the process's first call of each
    seconds = dict(zip(paths, interleaved(calls, 0, args.repeats)))  # interleaved: drift hits every path alike
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
            "tokens_shape": list(shapes["kv_cache"])}


def bench_sample(args):
    """python generate.py as a user runs it, next to the floor under it: starting Python and importing generate.py."""
    runs = {"generate.py": [sys.executable, os.path.join(ROOT, "generate.py"), os.path.abspath(args.checkpoint),
                            "--max_new_tokens", str(args.new_tokens), "--seed", "42",
                            *(["--no_cache"] if args.no_cache else [])],
            "import only": [sys.executable, "-c", "import generate"]}

    def run(name):
        done = subprocess.run(runs[name], capture_output=True, encoding="utf-8", errors="replace", cwd=ROOT)
        if done.returncode != 0:
            raise TinyLLMError(f"{name} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")

    seconds = dict(zip(runs, interleaved([functools.partial(run, name) for name in runs], 0, args.repeats)))
    wall, floor = (statistics.median(seconds[name]) for name in runs)
    log(f"result: {args.new_tokens} tokens in {wall:.2f} s wall, start-up included (median of {args.repeats}); "
        f"Python + imports alone {floor:.2f} s; sampling {1000 * (wall - floor) / args.new_tokens:.2f} ms per token")
    return {"checkpoint": args.checkpoint, "new_tokens": args.new_tokens, "wall_s": wall, "import_s": floor,
            "runs": seconds}


def time_to_target(preset, target, extra, label):
    """Run train.py in its own process until val <= target: the seconds from just before it starts to its exit."""
    with tempfile.TemporaryDirectory(prefix="tinyllm-ttt-") as out_dir:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *(["--preset", preset] if preset else []), *extra,
               "--target_loss", str(target), "--plots", "false", "--sample_tokens", "0", "--out_dir", out_dir]
        log(f"[{label}] {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace")
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise TinyLLMError(f"train.py failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        _, evals = plots.split_history(plots.read_history(out_dir))
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
