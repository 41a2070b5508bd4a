"""Score a checkpoint: its loss, perplexity and bits per character on every position of its
validation split, each once (train.py's estimate_loss draws random batches instead).

    python -m tools.score checkpoints/best.pt
    python -m tools.score checkpoints/chat/last.pt --data data/input.txt   # another text
"""

import math

import numpy as np
import torch

from config import TrainConfig, add_flags, make_config
from machinery import checkpoint, cli, devices, sources
from model import lm_loss
from utils import bits_per_char


@torch.no_grad()
def token_losses(model, ids, batch_size=1):
    """The loss (nats) of every token of ids (n,) but the first, (n - 1,), each once, in windows
    of block_size."""
    model.eval()
    T = model.config.block_size
    device = model.wte.weight.device
    n = (len(ids) - 1) // T  # whole windows, then the tail
    windows = ids[: n * T + 1].unfold(0, T + 1, T) if n else ids[:0].view(0, T + 1)  # (n, T + 1)
    chunks = [windows[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(ids) - 1 > n * T:  # the tail: fewer than T inputs
        chunks.append(ids[n * T :][None])
    losses = []
    for rows in chunks:  # (b, t + 1): t inputs, each with its next token
        logits, _ = model(rows[:, :-1].to(device))  # (b, t, V)
        losses.append(lm_loss(logits, rows[:, 1:].to(device), reduction="none").cpu())  # (b * t,)
    return torch.cat(losses)


def evaluate_checkpoint(path, data, device, batch_size):
    """Loss, perplexity and bits per character on every position of a checkpoint's val split (or
    data's): a conversation's answers alone, as its run was trained."""
    trained = checkpoint.load_model(path, device)
    corpus, data = sources.validation_split(trained.checkpoint, trained.tokenizer, data or None)
    val = torch.as_tensor(np.asarray(corpus.val, dtype=np.int64))
    losses = token_losses(trained.model, val, batch_size)  # of tokens 1..n-1
    if corpus.val_targets is not None:
        losses = losses[corpus.val_targets[1:]]
    loss = losses.mean().item()
    cli.log(
        f"{path} on the val split of {data} ({len(val):,} tokens, every position once):\n"
        f"loss {loss:.4f} nats/token | perplexity {math.exp(loss):.3f} | "
        f"{bits_per_char(loss, corpus.chars_per_token):.4f} bits per character"
    )


def main(argv=None):
    parser = cli.ArgumentParser(description="Score a checkpoint on its whole val split.")
    parser.add_argument("checkpoint", nargs="?", default="checkpoints/best.pt", help="%(default)s")
    parser.add_argument("--data", default="", help="score this text's val split instead")
    scored_at_once = {"batch_size": (32, "here: windows scored at once")}
    add_flags(parser, TrainConfig, scored_at_once, names=("batch_size", "device", "threads"))
    args = vars(parser.parse_args(argv))
    cfg = make_config(TrainConfig, {"batch_size": 32} | args)  # each flag checked as train.py's
    device = devices.use(cfg.device, cfg.threads)
    evaluate_checkpoint(args["checkpoint"], args["data"], device, cfg.batch_size)


if __name__ == "__main__":
    cli.run_cli(main)  # bad input: one error: line and exit status 2
