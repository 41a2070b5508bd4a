"""Scaling laws on this machine: every model size at every compute budget (IsoFLOP curves), the
compute-optimal frontier fitted with L(C) = L_inf + a C^-alpha, and one size on less of the text.
About 30 minutes; python -m tools.scaling --quick takes about 3."""

import json
import math
import os
import statistics
import tempfile
import time

import torch

from config import TinyLLMError, TrainConfig
from machinery import cli, sources
from machinery.plots import new_plot, save_plot
from tools import experiment

# about 30 thousand to 1.3 million parameters, the tiny preset's 2 x 160 among them
SHAPES = [(1, 48, 2), (2, 64, 2), (2, 96, 3), (2, 160, 5), (3, 192, 6)]  # (n_layer, n_embd, n_head)
DATA_FRACTIONS = [1 / 8, 1 / 4, 1 / 2, 1]


def run(shape, steps, out_dir, data, evals=1, **given):
    """A tiny-preset run of shape for steps: its parameters, FLOPs, losses and ms/step."""
    settings = dict(zip(("n_layer", "n_embd", "n_head"), shape)) | {
        "max_steps": steps,
        "data": data,
        "warmup_steps": max(1, min(100, steps // 10)),
        "eval_iters": 30,
        "eval_interval": max(1, steps // evals),
        "log_interval": min(steps, 5),
        "out_dir": out_dir,
    }
    summary = experiment(settings | given)
    params = summary["model"].num_params()
    last = [h for h in summary["history"] if h["kind"] == "eval"][-1]
    flops = 6 * params * summary["tokens_per_step"]  # a step's, forward and backward
    return {
        "params": params,
        "steps": steps,
        "flops_per_step": flops,
        "flops": flops * steps,
        "ms": [h["ms_per_step"] for h in summary["history"] if h["kind"] == "train"][-1],
        "val": last["val_loss"],
        "train": last["train_loss"],
        "dtype": summary["dtype"],
    }


def fit_power_law(C, L):
    """{l_inf, a, alpha, rms} of L(C) = l_inf + a C^-alpha, l_inf >= 0: a linear least-squares
    fit for each alpha on a grid, the best with a > 0; None if no falling curve fits."""
    C = torch.tensor(C, dtype=torch.float64)
    L = torch.tensor(L, dtype=torch.float64)
    alphas = torch.linspace(0.01, 1.5, 1491, dtype=torch.float64)
    x = (C / C.min())[None, :] ** -alphas[:, None]  # (alphas, points)
    X = torch.stack([torch.ones_like(x), x], dim=2)  # (alphas, points, 2)
    Y = L.expand(len(alphas), -1)[..., None]  # (alphas, points, 1)
    coef = torch.linalg.lstsq(X, Y).solution[..., 0]  # (alphas, 2): L_inf and a scaled
    floorless = torch.stack([torch.zeros_like(alphas), (x @ L) / (x * x).sum(1)], dim=1)  # L_inf 0
    coef = torch.where(coef[:, :1] < 0, floorless, coef)
    err = ((X @ coef[..., None])[..., 0] - L).pow(2).mean(1).sqrt()
    err = err.masked_fill(coef[:, 1] <= 0, math.inf)
    k = int(err.argmin())
    if not math.isfinite(err[k]):
        return None
    alpha = alphas[k].item()
    a = coef[k, 1].item() * C.min().item() ** alpha
    return dict(l_inf=coef[k, 0].item(), a=a, alpha=alpha, rms=err[k].item())


def isoflop_minimum(rows):
    """One budget's compute-optimal (params, loss): the vertex of a parabola in log(params) through
    the three runs around the lowest, if it lies among them; else the lowest run."""
    rows = sorted(rows, key=lambda r: r["params"])
    i = min(range(len(rows)), key=lambda j: rows[j]["val"])
    around = rows[max(0, min(i - 1, len(rows) - 3)) :][:3]
    x = torch.tensor([math.log(r["params"]) for r in around], dtype=torch.float64)
    y = torch.tensor([r["val"] for r in around], dtype=torch.float64)
    X = torch.stack([x**2, x, torch.ones_like(x)], 1)
    a, b, c = torch.linalg.lstsq(X, y[:, None]).solution[:, 0].tolist()
    if len(around) == 3 and a > 0 and x[0] <= -b / (2 * a) <= x[-1]:
        return math.exp(-b / (2 * a)), c - b * b / (4 * a)
    return rows[i]["params"], rows[i]["val"]


def study(args):
    """Time a step of each size, plan budgets 2x apart that fit in --minutes, run the plan (saved
    after each run: --reuse goes on), then fit and draw."""
    shapes = SHAPES[1:4] if args.quick else SHAPES
    n_budgets, minutes = (3, 3.0) if args.quick else (args.budgets, args.minutes)
    reused = args.reuse and os.path.exists(args.out)
    saved = json.loads(sources.read_text(args.out, "--out")) if reused else {}
    done = {r["key"]: r for r in saved.get("runs", [])}
    probe = saved.get("probe")
    mid = shapes.index((2, 160, 5)) if (2, 160, 5) in shapes else len(shapes) // 2
    with tempfile.TemporaryDirectory(prefix="tinyllm-scaling-") as tmp:
        if not probe:  # seconds and FLOPs of a step of each size here
            probes = [run(shapes[0], 10, f"{tmp}/probe", args.data)]
            dtype = probes[0]["dtype"]  # --dtype auto measured once
            for i, shape in enumerate(shapes[1:], 1):
                probes.append(run(shape, 10, f"{tmp}/probe{i}", args.data, dtype=dtype))
            seconds = [p["ms"] / 1000 for p in probes]
            flops = [p["flops_per_step"] for p in probes]
            per_flop = sum(s / f for s, f in zip(seconds, flops))  # a budget's runs
            per_flop += len(DATA_FRACTIONS) / 2 * seconds[mid] / flops[mid]  # the less-text runs
            top = minutes * 60 / per_flop / (2 - 2 ** (1 - n_budgets))  # budgets 2x apart add up
            budgets = [top / 2**k for k in range(n_budgets)][::-1]
            probe = {"seconds": seconds, "flops": flops, "budgets": budgets, "dtype": dtype}
        plan = []
        for budget in probe["budgets"]:
            for shape, flops in zip(shapes, probe["flops"]):
                plan.append(("iso", shape, max(10, round(budget / flops)), budget, 1.0))
        data_steps = max(10, round(probe["budgets"][-1] / probe["flops"][mid] / 2))
        plan += [("data", shapes[mid], data_steps, None, frac) for frac in DATA_FRACTIONS]
        rows = []
        t0 = time.perf_counter()
        expected = [steps * probe["seconds"][shapes.index(s)] for _, s, steps, _, _ in plan]
        for i, (kind, shape, steps, budget, frac) in enumerate(plan):
            key = f"{kind} {shape} {steps} {budget} {frac}"
            row = done.get(key)
            if row is None:
                row = dict(key=key, kind=kind, shape=list(shape), budget=budget, data_fraction=frac)
                evals = 4 if kind == "data" else 1
                fixed = dict(data_fraction=frac, dtype=probe["dtype"])
                row |= run(shape, steps, f"{tmp}/run{i}", args.data, evals, **fixed)
            rows.append(row)
            spent = time.perf_counter() - t0
            eta = sum(expected[i + 1 :]) * spent / max(1e-9, sum(expected[: i + 1]))
            cli.log(
                f"run {i + 1}/{len(plan)} {kind} {shape[0]} x {shape[1]} ({row['params']:,} params)"
                f" | {steps} steps | data {frac:.3g} | val {row['val']:.4f} | elapsed "
                f"{cli.format_seconds(spent)}, ETA {cli.format_seconds(eta)}"
            )
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump({"probe": probe, "runs": rows}, f, indent=1)
    five_minutes = 0.9 * 300 / probe["seconds"][mid] * probe["flops"][mid]  # 90% of them training
    summarize(rows, probe["budgets"], five_minutes, args.out_png)


def summarize(rows, budgets, five_minutes, path):
    iso = [r for r in rows if r["kind"] == "iso"]
    data = [r for r in rows if r["kind"] == "data"]
    fig, axes = new_plot(4.2, 15, grid=(1, 3))
    by_size, by_compute, by_data = axes[0]
    frontier = []  # the compute-optimal points: (FLOPs, parameters, loss)
    for b in budgets:
        at = [r for r in iso if r["budget"] == b]  # by size, as SHAPES are
        frontier.append((statistics.mean(r["flops"] for r in at), *isoflop_minimum(at)))
        label = f"{b:.1e} FLOPs"
        by_size.plot([r["params"] for r in at], [r["val"] for r in at], "o-", label=label)
    C, sizes, L = zip(*frontier)
    fit = fit_power_law(C, L) if len(set(C)) > 1 else None
    if fit is None:  # the budgets too close, or the loss not falling with compute: nothing to fit
        why = "the loss does not fall with compute (give more --minutes)"
        cli.log(f"no power law fits these runs: {why}")
        fit = dict(l_inf=min(L), a=0.0, alpha=0.0)
    else:
        log_c = [math.log(c) for c in C]
        log_n = [math.log(n) for n in sizes]
        slope, icpt = statistics.linear_regression(log_c, log_n)
        best_size = math.exp(slope * math.log(five_minutes) + icpt)
        cli.log(
            f"fit: L(C) = {fit['l_inf']:.3f} + {fit['a']:.3g} C^-{fit['alpha']:.3f} "
            f"(rms {fit['rms']:.4f}); compute-optimal params ~ C^{slope:.2f}; five minutes here: "
            f"{five_minutes:.2e} FLOPs, about {best_size:,.0f} parameters"
        )
    less = [f"{r['data_fraction']:.3g}: val {r['val']:.4f} train {r['train']:.4f}" for r in data]
    cli.log("less text, one size: " + ", ".join(less))
    by_size.plot(sizes, L, "k*", ms=10, label="compute-optimal")
    by_size.set(xscale="log", xlabel="parameters", ylabel="val loss", title="IsoFLOP: loss by size")
    by_compute.plot([r["flops"] for r in iso], [r["val"] for r in iso], "o", label="runs")
    c = torch.logspace(math.log10(min(C) / 2), math.log10(five_minutes * 2), 100).tolist()
    law = f"L = {fit['l_inf']:.2f} + {fit['a']:.3g} C^-{fit['alpha']:.3f}"
    by_compute.plot(c, [fit["l_inf"] + fit["a"] * x ** -fit["alpha"] for x in c], "k-", label=law)
    by_compute.axvline(five_minutes, color="grey", linestyle="--", label="five minutes here")
    by_compute.set(xscale="log", xlabel="training FLOPs", ylabel="val loss")
    by_compute.set_title("loss against compute")
    fracs = [r["data_fraction"] for r in data]
    by_data.plot(fracs, [r["val"] for r in data], "o-", label="val at the end")
    by_data.plot(fracs, [r["train"] for r in data], ".:", label="train at the end")
    by_data.set(xscale="log", xlabel="share of the training text", ylabel="loss")
    by_data.set_title("one size, less text")
    by_data.set_xticks(fracs, [f"1/{round(1 / f)}" if f < 1 else "all" for f in fracs])
    by_data.minorticks_off()
    save_plot(fig, path, *axes[0])
    cli.log(f"wrote {path}")


def main(argv=None):
    parser = cli.ArgumentParser(description="Scaling laws here: sizes x compute, and less text.")
    parser.add_argument("--minutes", type=float, default=23.0, help="what the runs may take (23)")
    parser.add_argument("--budgets", type=int, default=4, help="compute budgets, 2x apart (4)")
    parser.add_argument("--quick", action="store_true", help="3 sizes, 3 budgets, about 3 minutes")
    parser.add_argument("--reuse", action="store_true", help="go on with the runs in --out")
    parser.add_argument("--data", default=TrainConfig.data, help="the text (%(default)s)")
    parser.add_argument("--out", default="scaling.json", help="the runs so far (%(default)s)")
    parser.add_argument("--out_png", default="scaling.png", help="the picture (%(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.minutes < math.inf or args.budgets < 2:  # the fit needs two points
        raise TinyLLMError(
            f"--minutes must be above 0 and --budgets 2 or more, got {args.minutes}, {args.budgets}"
        )
    if not args.out_png.lower().endswith(".png"):
        raise TinyLLMError(f"--out_png must name a .png file, got {args.out_png}")
    cli.check_writable(args.out, "--out", make_folder=True)
    cli.check_writable(args.out_png, "--out_png", make_folder=True)
    study(args)


if __name__ == "__main__":
    cli.run_cli(main)
