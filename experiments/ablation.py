"""What each modern part buys (bench.py ablation): train.py runs at equal settings that differ
only in the model's switches, a table and a plot of their validation losses."""

import os
import tempfile

import train
from config import TinyLLMError
from utils import bits_per_char
from experiments.runs import machine_info, markdown_table, new_run
from machinery.cli import explicit_flags, log
from machinery.plots import new_plot, save_plot, split_history


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
                         "bpc": bits_per_char(best["val_loss"], run.corpus.chars_per_token),
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
    m = machine_info()
    with open(args.out_md, "w", encoding="utf-8") as f:
        f.write(f"# Ablation\n\nEach row is a train.py run with the same settings but the switches shown. "
                f"Machine: {m['cpu']}{', ' + m['gpu'] if m['gpu'] else ''}; torch {m['torch']}; {m['date']}.\n\n"
                f"{table}\n![val loss by variant]({os.path.basename(png)})\n")
    log(f"wrote {args.out_md} and {png}")
    return {"variants": rows, "markdown": args.out_md, "plot": png}
