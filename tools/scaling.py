"""Scaling laws on this machine: every model size at every compute budget (IsoFLOP curves), the
compute-optimal frontier fitted with L(C) = L_inf + a C^-alpha, and one size on less of the text.
About 30 minutes; --quick takes about 3.

    python -m tools.scaling --quick
"""

import machinery  # noqa: F401 (first, before torch loads)

import json
import math
import os
import statistics
import tempfile
import time

import torch

import train
from config import TinyLLMError, TrainConfig, build_configs

from machinery import cli
from machinery.plots import new_plot, save_plot

# about 30 thousand to 1.3 million parameters, the tiny preset's 2 x 160 among them
SHAPES = [(1, 48, 2), (2, 64, 2), (2, 96, 3), (2, 160, 5), (3, 192, 6)]  # (n_layer, n_embd, n_head)
DATA_FRACTIONS = [1 / 8, 1 / 4, 1 / 2, 1]


def run(shape, steps, out_dir, data, evals=1, **given):
    """A tiny-preset run of shape for steps: its parameters, FLOPs, losses and ms/step."""
    given = {**dict(zip(("n_layer", "n_embd", "n_head"), shape)), "max_steps": steps, "data": data,
             "warmup_steps": max(1, min(100, steps // 10)), "eval_iters": 30, "eval_interval": max(1, steps // evals),
             "log_interval": min(steps, 5), "sample_tokens": 0, "plots": False, "out_dir": out_dir, **given}
    model_cfg, cfg = build_configs(given, "tiny")
    summary = train.train(model_cfg, cfg, preset="tiny", given=given)
    model = summary["model"]
    vals = [h for h in summary["history"] if h["kind"] == "eval" and h["step"] > 0]  # step 0's is the untrained model's
    flops = 6 * model.num_params() * cfg.batch_size * model.config.block_size  # per step, forward and backward
    return {"params": model.num_params(), "flops": flops * steps, "steps": steps, "val": vals[-1]["val_loss"],
            "best_val": min(v["val_loss"] for v in vals), "train": vals[-1]["train_loss"],
            "ms": [h["ms_per_step"] for h in summary["history"] if h["kind"] == "train"][-1], "flops_per_step": flops,
            "dtype": summary["dtype"]}


def fit_power_law(C, L):
    """(L_inf, a, alpha, rms error) of L(C) = L_inf + a C^-alpha, L_inf >= 0: a linear least-squares fit
    for each alpha on a grid, the best with a > 0; None if no falling curve fits."""
    C, L = torch.tensor(C, dtype=torch.float64), torch.tensor(L, dtype=torch.float64)
    alphas = torch.linspace(0.01, 1.5, 1491, dtype=torch.float64)
    x = (C / C.min())[None, :] ** -alphas[:, None]  # (alphas, points)
    X = torch.stack([torch.ones_like(x), x], dim=2)  # (alphas, points, 2)
    coef = torch.linalg.lstsq(X, L.expand(len(alphas), -1)[..., None]).solution[..., 0]  # (alphas, 2)
    floorless = torch.stack([torch.zeros(len(alphas), dtype=torch.float64), (x @ L) / (x * x).sum(1)], dim=1)
    coef = torch.where(coef[:, :1] < 0, floorless, coef)
    err = ((X @ coef[..., None])[..., 0] - L).pow(2).mean(1).sqrt().masked_fill(coef[:, 1] <= 0, math.inf)
    k = int(err.argmin())
    if not math.isfinite(err[k]):
        return None
    alpha = alphas[k].item()
    return coef[k, 0].item(), coef[k, 1].item() * C.min().item() ** alpha, alpha, err[k].item()


def isoflop_minimum(rows):
    """One budget's compute-optimal (params, loss): the vertex of a parabola in log(params) through the three
    runs around the lowest, if it lies among them; else the lowest run."""
    rows = sorted(rows, key=lambda r: r["params"])
    i = min(range(len(rows)), key=lambda j: rows[j]["val"])
    around = rows[max(0, min(i - 1, len(rows) - 3)):][:3]
    x = torch.tensor([math.log(r["params"]) for r in around], dtype=torch.float64)
    y = torch.tensor([r["val"] for r in around], dtype=torch.float64)
    a, b, c = torch.linalg.lstsq(torch.stack([x ** 2, x, torch.ones_like(x)], 1), y[:, None]).solution[:, 0].tolist()
    if len(around) == 3 and a > 0 and x[0] <= -b / (2 * a) <= x[-1]:
        return math.exp(-b / (2 * a)), c - b * b / (4 * a)
    return rows[i]["params"], rows[i]["val"]


def study(args):
    """Time a step of each size, plan budgets 2x apart that fit in --minutes, run the plan (saved after each run:
    --reuse goes on), then fit and draw."""
    shapes = SHAPES[1:4] if args.quick else SHAPES
    n_budgets, minutes = (3, 3.0) if args.quick else (args.budgets, args.minutes)
    saved = {}
    if args.reuse and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            saved = json.load(f)
    done, probe = {r["key"]: r for r in saved.get("runs", [])}, saved.get("probe")
    mid = shapes.index((2, 160, 5)) if (2, 160, 5) in shapes else len(shapes) // 2
    with tempfile.TemporaryDirectory(prefix="tinyllm-scaling-") as tmp:
        if not probe:  # seconds and FLOPs of a step of each size here
            probes = [run(shapes[0], 10, os.path.join(tmp, "probe"), args.data)]  # --dtype auto measured once
            probes += [run(s, 10, os.path.join(tmp, f"probe{i}"), args.data, dtype=probes[0]["dtype"])
                       for i, s in enumerate(shapes[1:], 1)]
            seconds, flops = [p["ms"] / 1000 for p in probes], [p["flops_per_step"] for p in probes]
            per_flop = sum(s / f for s, f in zip(seconds, flops)) + len(DATA_FRACTIONS) / 2 * seconds[mid] / flops[mid]
            top = minutes * 60 / per_flop / (2 - 2 ** (1 - n_budgets))  # the budgets sum to top * (2 - 2^(1-n))
            probe = {"seconds": seconds, "flops": flops, "budgets": [top / 2 ** k for k in range(n_budgets)][::-1],
                     "dtype": probes[0]["dtype"]}
        plan = [("iso", s, max(10, round(b / f)), b, 1.0) for b in probe["budgets"] for s, f in zip(shapes, probe["flops"])]
        data_steps = max(10, round(probe["budgets"][-1] / probe["flops"][mid] / 2))
        plan += [("data", shapes[mid], data_steps, None, frac) for frac in DATA_FRACTIONS]
        rows, t0 = [], time.perf_counter()
        expected = [steps * probe["seconds"][shapes.index(s)] for _, s, steps, _, _ in plan]
        for i, (kind, shape, steps, budget, frac) in enumerate(plan):
            key = f"{kind} {shape} {steps} {budget} {frac}"
            row = done.get(key) or {"key": key, "kind": kind, "shape": list(shape), "budget": budget,
                                    "data_fraction": frac, **run(shape, steps, os.path.join(tmp, f"run{i}"), args.data,
                                                                 4 if kind == "data" else 1, data_fraction=frac,
                                                                 dtype=probe["dtype"])}
            rows.append(row)
            spent = time.perf_counter() - t0
            eta = sum(expected[i + 1:]) * spent / max(1e-9, sum(expected[:i + 1]))
            cli.log(f"run {i + 1}/{len(plan)} {kind} {shape[0]} x {shape[1]} ({row['params']:,} params) | {steps} steps "
                    f"| data {frac:.3g} | val {row['val']:.4f} | elapsed {cli.format_seconds(spent)}, "
                    f"ETA {cli.format_seconds(eta)}")
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump({"probe": probe, "runs": rows}, f, indent=1)
    summarize(rows, probe["budgets"], 0.9 * 300 / probe["seconds"][mid] * probe["flops"][mid], args.out_png)


def summarize(rows, budgets, five_minutes, path):
    iso, data = [r for r in rows if r["kind"] == "iso"], [r for r in rows if r["kind"] == "data"]
    fig, axes = new_plot(4.2, 15, grid=(1, 3))
    frontier = []
    for b in budgets:
        at = sorted((r for r in iso if r["budget"] == b), key=lambda r: r["params"])
        params, loss = isoflop_minimum(at)
        frontier.append({"flops": statistics.mean(r["flops"] for r in at), "params": params, "val": loss})
        axes[0][0].plot([r["params"] for r in at], [r["val"] for r in at], marker="o", label=f"{b:.1e} FLOPs")
    C, L = [p["flops"] for p in frontier], [p["val"] for p in frontier]
    fit = fit_power_law(C, L) if len(set(C)) > 1 else None
    if fit is None:  # the budgets too close, or the loss not falling with compute: nothing to fit
        cli.log("no power law fits these runs: the loss does not fall with compute (give more --minutes)")
        l_inf, a, alpha = min(L), 0.0, 0.0
    else:
        l_inf, a, alpha, err = fit
        slope, icpt = statistics.linear_regression([math.log(c) for c in C], [math.log(p["params"]) for p in frontier])
        cli.log(f"fit: L(C) = {l_inf:.3f} + {a:.3g} C^-{alpha:.3f} (rms {err:.4f}); compute-optimal params ~ "
                f"C^{slope:.2f}; five minutes here: {five_minutes:.2e} FLOPs, about "
                f"{math.exp(slope * math.log(five_minutes) + icpt):,.0f} parameters")
    cli.log("less text, one size: " + ", ".join(f"{r['data_fraction']:.3g}: val {r['val']:.4f} train {r['train']:.4f}"
                                                for r in data))
    axes[0][0].plot([p["params"] for p in frontier], L, "k*", ms=10, label="compute-optimal")
    axes[0][0].set(xscale="log", xlabel="parameters", ylabel="val loss", title="IsoFLOP: loss by size")
    axes[0][1].plot([r["flops"] for r in iso], [r["val"] for r in iso], "o", label="runs")
    c = torch.logspace(math.log10(min(C) / 2), math.log10(five_minutes * 2), 100).tolist()
    axes[0][1].plot(c, [l_inf + a * x ** -alpha for x in c], "k-", label=f"L = {l_inf:.2f} + {a:.3g} C^-{alpha:.3f}")
    axes[0][1].axvline(five_minutes, color="grey", linestyle="--", label="five minutes here")
    axes[0][1].set(xscale="log", xlabel="training FLOPs", ylabel="val loss", title="loss against compute")
    fracs = [r["data_fraction"] for r in data]
    axes[0][2].plot(fracs, [r["val"] for r in data], marker="o", label="val at the end")
    axes[0][2].plot(fracs, [r["train"] for r in data], marker=".", linestyle=":", label="train at the end")
    axes[0][2].set(xscale="log", xlabel="share of the training text", ylabel="loss", title="one size, less text")
    axes[0][2].set_xticks(fracs, [f"1/{round(1 / f)}" if f < 1 else "all" for f in fracs], minor=False)
    axes[0][2].minorticks_off()
    for ax in axes[0]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_plot(fig, None, path)
    cli.log(f"wrote {path}")


def main(argv=None):
    parser = cli.ArgumentParser(description="Scaling laws on this machine: sizes x compute budgets, and less data.")
    parser.add_argument("--minutes", type=float, default=23.0, help="what the runs may take (default: %(default)s)")
    parser.add_argument("--budgets", type=int, default=4, help="compute budgets, 2x apart (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="3 sizes, 3 budgets, about 3 minutes")
    parser.add_argument("--reuse", action="store_true", help="keep the plan and runs --out holds (go on after a stop)")
    parser.add_argument("--data", default=TrainConfig.data, help="the text (default: %(default)s)")
    parser.add_argument("--out", default="scaling.json", help="the runs, saved after each (default: %(default)s)")
    parser.add_argument("--out_png", default="scaling.png", help="the picture (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.minutes < math.inf or args.budgets < 2:  # the fit needs two points
        raise TinyLLMError(f"--minutes must be above 0 and --budgets 2 or more, got {args.minutes}, {args.budgets}")
    if not args.out_png.lower().endswith(".png"):
        raise TinyLLMError(f"--out_png must name a .png file, got {args.out_png}")
    for path, flag in ((args.out, "--out"), (args.out_png, "--out_png")):
        cli.check_writable(path, flag, make_folder=True)
    study(args)


if __name__ == "__main__":
    cli.run_cli(main)
