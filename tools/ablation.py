"""What each modern part of the model buys: train.py runs at equal settings that differ only in the
model's switches, and a table and a plot of their validation losses:
python -m tools.ablation --max_steps 600, and any train.py flag (--preset, --n_layer, ...)."""

import os
import tempfile

from config import GPTConfig, TrainConfig, add_flags, require
from machinery import cli
from machinery.plots import new_plot, save_plot
from tools import experiment
from utils import bits_per_char

# every run sets all three switches, so that a preset's choice cannot leak into "vanilla"
VARIANTS = {
    "vanilla": dict(norm="layernorm", mlp="gelu", pos="learned"),
    "rmsnorm": dict(norm="rmsnorm", mlp="gelu", pos="learned"),
    "swiglu": dict(norm="layernorm", mlp="swiglu", pos="learned"),
    "sinusoidal": dict(norm="layernorm", mlp="gelu", pos="sinusoidal"),
    "rope": dict(norm="layernorm", mlp="gelu", pos="rope"),
    "all": dict(norm="rmsnorm", mlp="swiglu", pos="rope"),
    "all+muon": dict(norm="rmsnorm", mlp="swiglu", pos="rope", optimizer="muon"),
}


def main(argv=None):
    parser = cli.ArgumentParser(description="Train each variant of the model alike; compare.")
    choices = ", ".join(VARIANTS)
    parser.add_argument("--only", default=",".join(VARIANTS), help=f"some of: {choices}")
    parser.add_argument("--out", default="ablation.png", help="the plot (default: %(default)s)")
    parser.add_argument("--preset", default="tiny", help="every run's settings (default: tiny)")
    add_flags(parser, GPTConfig)
    add_flags(parser, TrainConfig)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    require(not unknown, f"unknown variant(s) {', '.join(unknown)}; choose from {choices}")
    cli.check_writable(args.out, "--out", make_folder=True)
    rows = []
    fig, ax = new_plot(height=4)  # each variant's val loss at its evaluations
    with tempfile.TemporaryDirectory(prefix="tinyllm-ablation-") as tmp:
        for name in names:
            cli.log(f"--- {name}: {VARIANTS[name]}")
            given = vars(args) | VARIANTS[name] | {"out_dir": os.path.join(tmp, name)}
            given.setdefault("max_steps", 600)  # equal steps, not a time budget
            summary = experiment(given)  # with its --preset
            best = summary["best_val_loss"]
            bpc = bits_per_char(best, summary["corpus"].chars_per_token)
            rows.append((name, summary["model"].num_params(), best, bpc, summary["seconds"]))
            curve = [h for h in summary["history"] if h["kind"] == "eval"]
            ax.plot([h["step"] for h in curve], [h["val_loss"] for h in curve], ".-", label=name)
    cli.log(f"| variant | params | best val loss | vs {names[0]} | val bits/char | seconds |")
    cli.log("|---|---|---|---|---|---|")
    for name, params, best, bpc, seconds in rows:
        vs = best - rows[0][2]
        cli.log(f"| {name} | {params:,} | {best:.4f} | {vs:+.4f} | {bpc:.3f} | {seconds:.0f} |")
    ax.set(xlabel="step", ylabel="val loss (nats/token)", title="val loss by variant")
    save_plot(fig, args.out, ax)
    cli.log(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run_cli(main)
