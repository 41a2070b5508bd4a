"""Writes the history.csv and loss.png of a run, and draws the schedule for --plot_lr.

It also holds the figure helpers that tools/ uses."""

import csv
import math
import os

from machinery.cli import log, warn


def new_plot(height=3, width=7, grid=None):
    """Returns a figure and its axes (a 2-D array for grid=(rows, cols)), drawn to files only."""
    import matplotlib  # imported here: scripts that never draw skip its slow start

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*(grid or (1, 1)), figsize=(width, height), dpi=90, squeeze=not grid)


def save_plot(fig, path, *axes):
    """Saves `fig` to `path`.

    Each of `axes` gets a grid and, if its lines have labels, a legend."""
    import matplotlib.pyplot as plt

    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def draw_losses(ax, history, color, label=""):
    """Draws the train loss of a run at each logged step (dashed) and the val loss at each eval."""
    steps = [(h["step"], h["loss"]) for h in history if h["kind"] == "train"]
    evals = [(h["step"], h["val_loss"]) for h in history if h["kind"] == "eval"]
    best = min(loss for _, loss in evals)  # never empty: history.csv is written after an eval
    if steps:  # none before the first progress line
        ax.plot(*zip(*steps), "--", color=color, alpha=0.6, label=f"{label}train")
    ax.plot(*zip(*evals), "o-", color=color, ms=3, label=f"{label}val (best {best:.3f})")


def write_history(out_dir, history, plot, vocab_size):
    """Writes history.csv, a row per progress line and evaluation, and with `plot` loss.png."""
    with open(os.path.join(out_dir, "history.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in history for k in r)))
        writer.writeheader()
        writer.writerows(history)
    if plot:
        fig, ax = new_plot(height=4)
        draw_losses(ax, history, "C0")
        uniform = math.log(vocab_size)
        ax.axhline(uniform, color="gray", linestyle="--", label=f"uniform ln(V) = {uniform:.2f}")
        ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
        save_plot(fig, os.path.join(out_dir, "loss.png"), ax)


def draw_lr_schedule(cfg, get_lr):
    """Draws train.get_lr(step, max_steps, cfg) at every step, for --plot_lr.

    It also prints the learning rate at each tenth of the run."""
    if cfg.time_budget:
        warn(
            f"--time_budget {cfg.time_budget}: its end depends on its pace; "
            f"drawn for --max_steps {cfg.max_steps}"
        )
    lrs = [get_lr(s, cfg.max_steps, cfg) for s in range(cfg.max_steps + 1)]
    fig, ax = new_plot()
    ax.plot(lrs)
    ax.set(xlabel="step", ylabel="learning rate")
    ax.set_title(f"{cfg.lr_schedule}: peak {cfg.lr:g}, ends at {lrs[-1]:.3g}")
    path = os.path.join(cfg.out_dir, "lr_schedule.png")
    save_plot(fig, path, ax)
    tenths = [round(cfg.max_steps * i / 10) for i in range(11)]
    peak = lrs.index(max(lrs))  # where the warmup, if any, ends
    log("lr at step " + ", ".join(f"{s}: {lrs[s]:.3g}" for s in sorted({peak, *tenths})))
    log(f"wrote {path}")
