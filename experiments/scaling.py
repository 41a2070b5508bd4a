"""Scaling laws on this machine (bench.py scaling): every shape at every compute budget (IsoFLOP curves),
the compute-optimal frontier fitted with L(C) = L_inf + a C^-alpha, and one shape on less of the text."""

import dataclasses
import functools
import json
import math
import os
import statistics
import tempfile
import time

import torch

import train
from utils import get_batch
from experiments.runs import new_run, step_times
from machinery.cli import format_seconds, log
from machinery.device import flops_per_token
from machinery.plots import new_plot, save_plot, split_history


# from about 30 thousand to 1.3 million parameters (43x), the tiny preset's 2 x 160 among them; the rest is tiny's
SHAPE_FIELDS = ("n_layer", "n_embd", "n_head")
SCALING_SHAPES = [(1, 48, 2), (2, 64, 2), (2, 96, 3), (2, 160, 5), (3, 192, 6)]
DATA_FRACTIONS = [1 / 8, 1 / 4, 1 / 2, 1]
SCALING_EVAL_ITERS = 30  # batches per split at each evaluation: a val loss to about 0.01


def scaling_run(shape, steps, out_dir, dtype, data, data_fraction=1.0, evals=1):
    """A tiny-preset run of shape for steps on the first data_fraction of the train split: {"params", "flops", ...}."""
    given = {**dict(zip(SHAPE_FIELDS, shape)), "max_steps": steps, "warmup_steps": max(1, min(100, steps // 10)),
             "eval_iters": SCALING_EVAL_ITERS, "eval_interval": max(1, steps // evals), "log_interval": steps,
             "sample_tokens": 0, "plots": False, "dtype": dtype, "data": data}
    run = new_run("tiny", given, out_dir)
    part = run.corpus.train[:int(len(run.corpus.train) * data_fraction)]  # the training batches come from part alone
    run = dataclasses.replace(run, next_batch=functools.partial(get_batch, part, run.micro_batch,
                                                                run.model_cfg.block_size, run.device))
    t0 = time.perf_counter()
    _, evals = split_history(train.train_loop(run)["history"])
    vals = [e for e in evals if e["step"] > 0]  # the step-0 evaluation is the untrained model's
    tokens = steps * run.cfg.batch_size * run.model_cfg.block_size
    return {"params": run.model.num_params(), "flops": flops_per_token(run.model) * tokens, "steps": steps,
            "val": vals[-1]["val_loss"], "best_val": min(v["val_loss"] for v in vals), "train": vals[-1]["train_loss"],
            "seconds": time.perf_counter() - t0, "dtype": run.dtype}


def step_seconds(shapes, out_dir, data):
    """(seconds per training step, training FLOPs per step) of each shape here, and the precision --dtype auto takes."""
    runs = []
    for i, shape in enumerate(shapes):
        given = {**dict(zip(SHAPE_FIELDS, shape)), "max_steps": 10, "warmup_steps": 1, "plots": False,
                 "sample_tokens": 0, "data": data, "dtype": runs[0].dtype if runs else "auto"}  # measured by the first
        runs.append(new_run("tiny", given, os.path.join(out_dir, f"probe{i}")))
    times = step_times(runs, 3, 5)
    return ([statistics.mean(t) / 1000 for t in times],
            [flops_per_token(r.model) * r.cfg.batch_size * r.model_cfg.block_size for r in runs], runs[0].dtype)


def plan_scaling(seconds, flops, minutes, budgets, default):
    """Compute budgets (training FLOPs) 2x apart, the largest that let every run of the study end in minutes here."""
    per_flop = sum(s / f for s, f in zip(seconds, flops))  # seconds for a FLOP of every shape
    share = [2.0 ** -k for k in range(budgets - 1, -1, -1)]  # 1/2^(n-1) ... 1/2, 1
    data = len(DATA_FRACTIONS) / 2 * seconds[default] / flops[default]  # the data runs' seconds per top-budget FLOP
    top = minutes * 60 / (per_flop * sum(share) + data)
    return [top * x for x in share]


def fit_power_law(C, L):
    """(L_inf, a, alpha, rms error) of L(C) = L_inf + a * C^(-alpha) by least squares, L_inf >= 0 (a loss has no
    negative floor), from a linear fit per alpha on a grid, the best with a > 0; None if none fits a falling curve."""
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
    """The compute-optimal (params, loss) of one budget: the vertex of a parabola in log(params) through its
    three runs around the lowest, where it lies among them, else the lowest run."""
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
    """The study, with progress and an ETA, saved after every run (--reuse continues it); then its summary."""
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
        seconds, flops, dtype, budgets = (probe[k] for k in ("seconds", "flops", "dtype", "budgets"))
        for (L, C, H), s, f in zip(shapes, seconds, flops):
            log(f"{L} x {C}: {1000 * s:.0f} ms/step in {dtype}, {f:.2e} FLOPs/step")
        data_steps = max(10, round(budgets[-1] / flops[default] / 2))
        plan = [("iso", shape, max(10, round(b / f)), b, 1.0) for b in budgets for shape, f in zip(shapes, flops)]
        plan += [("data", shapes[default], data_steps, None, frac) for frac in DATA_FRACTIONS]
        rows, t0 = [], time.perf_counter()
        expected = [steps * seconds[shapes.index(shape)] for _, shape, steps, _, _ in plan]
        for i, (kind, shape, steps, budget, frac) in enumerate(plan):
            key = f"{kind} {shape} {steps} {budget} {frac}"
            row = done[key] if key in done else {
                "key": key, "kind": kind, "shape": list(shape), "budget": budget, "data_fraction": frac,
                **scaling_run(shape, steps, os.path.join(tmp, f"run{i}"), dtype, args.data, frac,
                              evals=4 if kind == "data" else 1)}
            rows.append(row)
            spent = time.perf_counter() - t0
            left = sum(expected[i + 1:]) * spent / max(1e-9, sum(expected[:i + 1]))
            log(f"run {i + 1}/{len(plan)} {kind:<4} {shape[0]} x {shape[1]:<3} {row['params']:>9,} params | "
                f"{steps:>5} steps | {row['flops']:.2e} FLOPs | data {frac:.3g} | val {row['val']:.4f} "
                f"(best {row['best_val']:.4f}) | {row['seconds']:.0f} s | elapsed {format_seconds(spent)}, "
                f"ETA {format_seconds(left)}")
            with open(args.out, "w", encoding="utf-8") as f:  # after every run: --reuse continues an interrupted study
                json.dump({"probe": probe, "runs": rows}, f, indent=1)
    return {"probe": probe, **summarize_scaling(rows, budgets, probe["five_minutes"], args)}


def summarize_scaling(rows, budgets, five_minutes, args):
    iso = [r for r in rows if r["kind"] == "iso"]
    frontier = []
    for b in budgets:
        at = [r for r in iso if r["budget"] == b]
        n_opt, l_opt = isoflop_minimum(at)
        frontier.append({"flops": statistics.mean(r["flops"] for r in at), "params": n_opt, "val": l_opt})
    C, L = [p["flops"] for p in frontier], [p["val"] for p in frontier]
    l_inf, a, alpha, err = fit_power_law(C, L)
    fits = [fit_power_law(C[:k] + C[k + 1:], L[:k] + L[k + 1:]) for k in range(len(C))]  # each point left out
    alphas = [f[2] for f in fits if f]
    spread = math.sqrt(len(alphas) - 1) * statistics.pstdev(alphas)  # the jackknife's standard error
    slope, icpt = statistics.linear_regression([math.log(c) for c in C], [math.log(p["params"]) for p in frontier])
    n_five = math.exp(slope * math.log(five_minutes) + icpt)
    result = {"runs": rows, "frontier": frontier,
              "fit": {"L_inf": l_inf, "a": a, "alpha": alpha, "alpha_jackknife": spread, "rms": err},
              "params_vs_flops_exponent": slope, "five_minutes_flops": five_minutes,
              "optimal_params_at_five_minutes": n_five,
              "predicted_loss_at_five_minutes": l_inf + a * five_minutes ** -alpha}
    log(f"fit: L(C) = {l_inf:.3f} + {a:.3g} C^-{alpha:.3f} (alpha {alpha:.3f} +- {spread:.3f} by jackknife, rms "
        f"{err:.4f}); compute-optimal params ~ C^{slope:.2f}")
    log(f"five minutes here: {five_minutes:.2e} FLOPs -> compute-optimal size about {n_five:,.0f} parameters, "
        f"predicted val {result['predicted_loss_at_five_minutes']:.3f}")
    draw_scaling(result, budgets, args.out_png)
    return result


def draw_scaling(result, budgets, path):
    """Three panels: the IsoFLOP curves, loss against compute with the fitted law, loss against the share of text."""
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
                   title=f"one model, {data[0]['steps']} steps, less text" if data else "")
    axes[0][2].set_xticks(fracs, [f"1/{round(1 / f)}" if f < 1 else "all" for f in fracs])
    axes[0][2].minorticks_off()
    for ax in axes[0]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_plot(fig, None, path)
    log(f"wrote {path}")
