"""Pictures: a run's loss.png, --plot_lr's schedule, and the figure helpers that tools/ use too."""

import math
import os

from optim import get_lr, progress

from machinery.cli import log, warn


def new_plot(height=3, width=7, grid=None):
    """A figure and its axes (a 2-D array for grid=(rows, cols)), drawn to files only."""
    import matplotlib  # imported here: scripts that never draw skip its slow start
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*(grid or (1, 1)), figsize=(width, height), dpi=90, squeeze=not grid)


def save_plot(fig, ax, path):
    import matplotlib.pyplot as plt
    if ax is not None:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_loss(history, path, vocab_size):
    """Train and val loss by step, the uniform ln(V) baseline, the best val marked."""
    rows, evals = [h for h in history if h["kind"] == "train"], [h for h in history if h["kind"] == "eval"]
    fig, ax = new_plot(height=4)
    ax.plot([h["step"] for h in rows], [h["loss"] for h in rows], color="C0", alpha=0.5, label="train (steps)")
    ax.plot([h["step"] for h in evals], [h["train_loss"] for h in evals], "o-", color="C0", ms=3, label="train")
    ax.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", color="C1", ms=3, label="val")
    ax.axhline(math.log(vocab_size), color="gray", linestyle="--", label=f"uniform ln(V) = {math.log(vocab_size):.2f}")
    best = min(evals, key=lambda h: h["val_loss"])
    ax.plot([best["step"]], [best["val_loss"]], "r*", ms=12, label=f"best val {best['val_loss']:.3f}")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    save_plot(fig, ax, path)


def draw_lr_schedule(cfg):
    """--plot_lr: the LR at every step of max_steps, drawn, and printed at every tenth."""
    if cfg.time_budget:
        warn(f"--time_budget {cfg.time_budget}: its end depends on its pace; drawn for --max_steps {cfg.max_steps}")
    lrs = [get_lr(s, progress(s, cfg), cfg) for s in range(cfg.max_steps + 1)]
    fig, ax = new_plot()
    ax.plot(lrs)
    ax.set(xlabel="step", ylabel="learning rate", title=f"{cfg.lr_schedule}: warmup {cfg.warmup_steps} steps, "
                                                        f"peak {cfg.lr:g}, floor {cfg.min_lr:g}")
    path = os.path.join(cfg.out_dir, "lr_schedule.png")
    save_plot(fig, ax, path)
    steps = sorted({s for s in [cfg.warmup_steps] + [round(cfg.max_steps * i / 10) for i in range(11)]
                    if s <= cfg.max_steps})  # the peak and the tenths
    log("lr at step " + ", ".join(f"{s}: {lrs[s]:.3g}" for s in steps))
    log(f"wrote {path}")
