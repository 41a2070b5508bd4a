"""What each modern part of the model buys: train.py runs at equal settings that differ only in the
model's switches, and a table and a plot of their validation losses.

    python -m tools.ablation --max_steps 600     # then any train.py flag: --preset, --n_layer, ...
"""

import machinery  # noqa: F401 (first, before torch loads)

import os
import tempfile

import train
from config import GPTConfig, TrainConfig, TinyLLMError, build_configs
from utils import bits_per_char

from machinery import cli
from machinery.plots import new_plot, save_plot

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
    parser = cli.ArgumentParser(description="Train each variant of the model at equal settings; compare.")
    parser.add_argument("--only", default=",".join(VARIANTS), help=f"some of: {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="ablation.png", help="the plot (default: %(default)s)")
    parser.add_argument("--preset", default="tiny", help="the settings every run starts from (default: tiny)")
    cli.add_config_flags(parser, GPTConfig)
    cli.add_config_flags(parser, TrainConfig)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")]
    if unknown := [n for n in names if n not in VARIANTS]:
        raise TinyLLMError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    cli.check_writable(args.out, "--out", make_folder=True)
    rows, fig_ax = [], new_plot(height=4)
    with tempfile.TemporaryDirectory(prefix="tinyllm-ablation-") as tmp:
        for name in names:
            cli.log(f"--- {name}: {VARIANTS[name]}")
            given = {**cli.given_flags(args), "sample_tokens": 0, "plots": False, **VARIANTS[name],
                     "out_dir": os.path.join(tmp, name)}
            given.setdefault("max_steps", 600)  # equal steps, not a time budget
            summary = train.train(*build_configs(given, args.preset), preset=args.preset, given=given)
            best = summary["best_val_loss"]
            rows.append((name, summary["model"].num_params(), best,
                         bits_per_char(best, summary["corpus"].chars_per_token), summary["seconds"]))
            evals = [h for h in summary["history"] if h["kind"] == "eval"]
            fig_ax[1].plot([h["step"] for h in evals], [h["val_loss"] for h in evals], marker=".", label=name)
    cli.log("| variant | params | best val loss | vs " + names[0] + " | val bits/char | seconds |\n|---|---|---|---|---|---|")
    for name, params, best, bpc, seconds in rows:
        cli.log(f"| {name} | {params:,} | {best:.4f} | {best - rows[0][2]:+.4f} | {bpc:.3f} | {seconds:.0f} |")
    fig_ax[1].set(xlabel="step", ylabel="val loss (nats/token)", title="val loss by variant")
    save_plot(*fig_ax, args.out)
    cli.log(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run_cli(main)
