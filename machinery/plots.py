"""The pictures of a run, drawn after every evaluation and by --plot_lr (loss.png, lr.png, grad_norm.png), the run's
history read back, and the figure helpers every picture of tinyllm (tools/, experiments/) uses."""

import json
import math
import os

from config import TinyLLMError
from optim import get_lr, progress

from machinery.cli import log, warn


DPI = 90  # pixels per inch: a 7-inch-wide figure is 630 pixels


def new_plot(height=3, width=7, grid=None):
    """A figure and its axes (a 2-D array for grid=(rows, cols)) from matplotlib's file-only backend."""
    import matplotlib  # imported here: generate.py and the tests that never plot skip its start-up
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*(grid or (1, 1)), figsize=(width, height), dpi=DPI, squeeze=not grid)


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


def split_history(history):
    """(progress rows, evaluation rows): written every log_interval steps, and at each evaluation."""
    return [h for h in history if h["kind"] == "train"], [h for h in history if h["kind"] == "eval"]


def step_loss(row):
    """A progress row's training loss ("loss"; "train_loss" in a history.json written by an older tinyllm)."""
    return row["loss"] if "loss" in row else row["train_loss"]


def read_history(run_dir):
    path = os.path.join(run_dir, "history.json") if os.path.isdir(run_dir) else run_dir
    try:
        with open(path, encoding="utf-8") as f:
            history = json.load(f)
        split_history(history)  # checks every row has a kind
        return history
    except FileNotFoundError:
        raise TinyLLMError(f"{path} not found: give run folders written by train.py") from None
    except (ValueError, TypeError, KeyError) as e:
        raise TinyLLMError(f"{path} is not a train.py history ({type(e).__name__}: {e})") from None


def plot_history(history, out_dir, vocab_size, train_cfg, state=None):
    """loss.png (train and val, the ln(V) baseline, the best point), lr.png, grad_norm.png."""
    rows, evals = split_history(history)
    fig, ax = new_plot(height=4)
    if rows:
        ax.plot([h["step"] for h in rows], [step_loss(h) for h in rows], color="C0", alpha=0.5,
                linewidth=1, label=f"train (mean of every {train_cfg.log_interval} steps)")
    ax.plot([h["step"] for h in evals], [h["train_loss"] for h in evals], "o-", color="C0", markersize=3,
            label="train (evaluation)")
    ax.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", color="C1", markersize=3, label="val")
    ax.axhline(math.log(vocab_size), color="gray", linestyle="--", label=f"uniform ln(V) = {math.log(vocab_size):.2f}")
    best = min(evals, key=lambda h: h["val_loss"])
    ax.plot([best["step"]], [best["val_loss"]], "r*", markersize=12, label=f"best val {best['val_loss']:.3f}")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    save_plot(fig, ax, os.path.join(out_dir, "loss.png"))

    plot_lr_schedule(train_cfg, os.path.join(out_dir, "lr.png"), upto=history[-1]["step"], state=state)

    fig, ax = new_plot()
    norms = [h for h in rows if h["grad_norm"] is not None]  # no norm before the first step
    ax.plot([h["step"] for h in norms], [h["grad_norm"] for h in norms], label="grad norm (before clipping)")
    if train_cfg.grad_clip > 0:
        ax.axhline(train_cfg.grad_clip, color="gray", linestyle="--", label=f"clip at {train_cfg.grad_clip}")
    ax.set(xlabel="step", ylabel="global L2 norm", title="gradient norm")
    save_plot(fig, ax, os.path.join(out_dir, "grad_norm.png"))


def plot_lr_schedule(train_cfg, path, upto=None, state=None):
    """Draws the logged LRs, then the rest as planned (not under a time budget); returns the planned [(step, lr)]."""
    taken = [(h["step"], h["lr"]) for h in split_history(state.history if state else [])[0] if h["lr"]]
    # the steps to come, each at the progress the loop gives it by steps (a time budget's follow its pace: none)
    steps = [] if state and train_cfg.time_budget else range(state.step if state else 0, train_cfg.max_steps + 1)
    planned = [(s, get_lr(s, progress(s, train_cfg), train_cfg)) for s in steps]
    fig, ax = new_plot()
    ax.plot([s for s, _ in taken + planned], [lr for _, lr in taken + planned])
    if upto is not None:
        ax.axvline(upto, color="gray", linestyle=":", label=f"step {upto}")
    ax.set(xlabel="step", ylabel="learning rate",
           title=f"get_lr: warmup {train_cfg.warmup_steps} steps, peak {train_cfg.lr:g}, floor {train_cfg.min_lr:g}")
    save_plot(fig, ax, path)
    return planned


def draw_lr_schedule(train_cfg):
    if train_cfg.time_budget:
        warn(f"--time_budget {train_cfg.time_budget}: a run's end follows its pace; this draws the schedule "
             f"of --max_steps {train_cfg.max_steps} (give --max_steps to choose)")
    path = os.path.join(train_cfg.out_dir, "lr_schedule.png")
    planned = dict(plot_lr_schedule(train_cfg, path))
    steps = {train_cfg.warmup_steps} | {round(train_cfg.max_steps * i / 10) for i in range(11)}  # tenths, the peak
    steps = {s for s in steps if s <= train_cfg.max_steps}  # (a run that ends within its warmup has no peak)
    log("lr at step " + ", ".join(f"{s}: {planned[s]:.3g}" for s in sorted(steps)))
    log(f"wrote {path}")
