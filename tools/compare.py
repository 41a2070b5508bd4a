"""Several runs' loss curves in one picture: python -m tools.compare checkpoints/a checkpoints/b"""

import csv
import os

from config import TinyLLMError, require
from machinery import cli
from machinery.plots import draw_losses, new_plot, save_plot


def read_history(run_dir):
    path = os.path.join(run_dir, "history.csv")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        return [{k: float(v) if k != "kind" and v else v for k, v in row.items()} for row in rows]
    except FileNotFoundError:
        raise TinyLLMError(f"{path} not found: give run folders of train.py") from None
    except ValueError as e:
        raise TinyLLMError(f"{path} is not a train.py history ({e})") from None


def main(argv=None):
    parser = cli.ArgumentParser(description="Overlay train.py runs' train and val loss in one PNG.")
    parser.add_argument("runs", nargs="+", help="run folders, each with its history.csv")
    parser.add_argument("--out", default="compare.png", help="the PNG (default: %(default)s)")
    parser.add_argument("--labels", help="comma-separated labels (default: the folder names)")
    args = parser.parse_args(argv)
    folders = [os.path.basename(os.path.normpath(d)) for d in args.runs]
    labels = args.labels.split(",") if args.labels else folders
    require(args.out.lower().endswith(".png"), f"--out must name a .png file, got {args.out}")
    if len(labels) != len(args.runs):
        raise TinyLLMError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    histories = [read_history(run_dir) for run_dir in args.runs]  # each checked before drawing
    fig, ax = new_plot(height=4.5)
    for i, (history, label) in enumerate(zip(histories, labels)):
        draw_losses(ax, history, f"C{i % 10}", f"{label} ")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="runs compared")
    save_plot(fig, args.out, ax)
    cli.log(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run_cli(main)
