"""Several training runs' curves overlaid in one picture, to compare them."""

import os

from config import TinyLLMError

from machinery.cli import ArgumentParser, log, run_cli
from machinery.plots import new_plot, read_history, save_plot, split_history, step_loss


def compare_runs(run_dirs, out, labels=None):
    """One PNG with every run's val loss (solid) and train loss (dashed), a colour per run."""
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    fig, ax = new_plot(height=4.5)
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        progress, evals = split_history(read_history(run_dir))
        color = f"C{i % 10}"
        ax.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", color=color, markersize=3,
                label=f"{label} val (best {min(h['val_loss'] for h in evals):.3f})" if evals else f"{label} val")
        ax.plot([h["step"] for h in progress], [step_loss(h) for h in progress], "--", color=color, alpha=0.6,
                label=f"{label} train")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="runs compared")
    save_plot(fig, ax, out)
    return out


def main(argv=None):
    parser = ArgumentParser(description="Overlay several train.py runs' train and val loss in one PNG.")
    parser.add_argument("runs", nargs="+", help="run folders (each with the history.json train.py writes)")
    parser.add_argument("--out", default="compare.png", help="the PNG to write (default: %(default)s)")
    parser.add_argument("--labels", default=None, help="comma-separated labels (default: the folder names)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if not args.out.lower().endswith(".png"):
        raise TinyLLMError(f"--out must name a .png file, got {args.out}")
    if labels and len(labels) != len(args.runs):
        raise TinyLLMError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    log(f"wrote {compare_runs(args.runs, args.out, labels)}")


if __name__ == "__main__":
    run_cli(main)
