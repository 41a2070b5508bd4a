"""See inside a trained model, a PNG each with what to look for: attention (each layer's and head's
weights over the prompt), surprise (the val split coloured by loss), temperature (the next-token
distribution at several temperatures), embeddings (a char model's, by PCA).

    python -m tools.pictures checkpoints/best.pt --only attention,surprise
"""

import math
import os
import warnings

import numpy as np
import torch

from config import DEVICE_HELP, SamplerConfig, TinyLLMError, require
from machinery import checkpoint, cli, devices, sources
from machinery.annotate import WholeCharacters, entropy_bits, token_piece
from machinery.plots import new_plot, save_plot
from sampling import next_token_probs
from tokenizer import CharTokenizer
from tools.decoding import temperatures
from tools.score import token_losses
from utils import bits_per_char, chars_per_token

PICTURES = ("attention", "surprise", "temperature", "embeddings")


def short_label(tokenizer, token):
    """A token as an axis label: spaces and line ends visible, part of a character as bytes."""
    piece = token_piece(tokenizer, token)
    text = piece if isinstance(piece, str) else piece.decode("utf-8", errors="backslashreplace")
    text = text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")
    return text or "\u2205"


@torch.no_grad()
def attention_maps(model, idx):
    """[attention weights (nh, T, T) per layer] of idx (1, T): a forward pass through the model's
    own attention, written out (not fused) so that each block builds its weights, which it keeps."""
    for block in model.blocks:
        block.attn.kept = []
    try:
        model(idx)
        return [block.attn.kept[0][0] for block in model.blocks]
    finally:
        for block in model.blocks:
            block.attn.kept = None  # the fused kernel again


def draw_attention(model, tokenizer, ids, args, path):
    """Heatmaps, layers down and heads across (or the one --layer / --head asks for)."""
    maps = attention_maps(model, torch.tensor([ids], device=model.wte.weight.device))
    layers = [args.layer] if args.layer >= 0 else list(range(model.config.n_layer))
    heads = [args.head] if args.head >= 0 else list(range(model.config.n_head))
    panel = 6.0 if len(layers) == len(heads) == 1 else min(2.2, 8.4 / len(heads))  # inches
    grid = (len(layers), len(heads))
    fig, axes = new_plot(len(layers) * panel + 0.8, len(heads) * panel + 0.6, grid=grid)
    T = len(ids)
    labels = [short_label(tokenizer, t) for t in ids]
    size = min(9.0, panel * 90 / T * 0.7)  # points: about a cell's height
    ticks, tick_labels = (range(T), labels) if size >= 4.5 else ([], [])  # too small: no labels
    rotation = 90 if max(map(len, labels)) > 1 else 0
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    for r, layer in enumerate(layers):
        for ax, head in zip(axes[r], heads):
            weights = np.ma.masked_array(maps[layer][head].float().cpu().numpy(), mask=future)
            ax.imshow(weights, cmap="Blues", vmin=0.0, vmax=1.0)
            ax.set_facecolor("#dddddd")  # grey where the masked future is
            ax.set_xticks(ticks, tick_labels, fontsize=size, rotation=rotation)
            ax.set_yticks(ticks, tick_labels, fontsize=size)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
    title = "attention: row = the token looking, column = the token looked at; darker = more"
    fig.suptitle(f"{title}; grey = the masked future", fontsize=8)
    save_plot(fig, path)
    return (
        f"a heatmap per layer and head over the prompt's {T} tokens. Look for heads on the "
        "token just before (a line below the diagonal) and heads reaching back to words"
    )


def val_passage(args, tokenizer, saved):
    """Token ids (n,): the first passage_chars characters of the val split tools.score scores."""
    corpus, _ = sources.validation_split(saved, tokenizer, args.data)
    # a byte token: a quarter of a character
    ids = np.asarray(corpus.val[: 4 * args.passage_chars + 1], dtype=np.int64).tolist()
    pieces = WholeCharacters(tokenizer)
    chars = 0
    for n, token in enumerate(ids, 1):
        piece = pieces.add(token)
        chars += len(piece[0]) if piece else 0
        if chars >= args.passage_chars:
            return torch.tensor(ids[: max(n, 2)])  # at least one token to predict
    return torch.tensor(ids)


def draw_surprise(model, tokenizer, ids, path, width=72):
    """The passage in a grid, each character coloured by its share of its token's loss in bits."""
    losses = token_losses(model, ids)
    chars = []
    pieces = WholeCharacters(tokenizer)
    bits = 0.0
    for i, token in enumerate(ids.tolist()):
        bits += losses[i - 1].item() / math.log(2) if i else math.nan  # the first has no context
        piece = pieces.add(token)
        if piece:
            chars += [(ch, bits / len(piece[0])) for ch in piece[0]]
            bits = 0.0
    rows = [[]]
    for ch, b in chars:
        rows[-1].append(("\u21b5" if ch == "\n" else ch, b))
        if ch == "\n" or len(rows[-1]) == width:
            rows.append([])
    grid = np.full((len(rows), width), np.nan)
    fig, ax = new_plot(0.2 * len(rows) + 1.0, 9.0)
    for r, row in enumerate(rows):
        for c, (ch, b) in enumerate(row):
            grid[r, c] = b
            ax.text(c, r, ch, ha="center", va="center", fontsize=7, family="monospace")
    image = ax.imshow(
        grid, cmap="YlOrRd", vmin=0.0, vmax=8.0, aspect="auto", interpolation="nearest"
    )
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="bits")
    ax.set_axis_off()
    bpc = bits_per_char(losses.mean().item(), chars_per_token(tokenizer, ids.tolist()))
    title = f"surprise: the model's loss on each character ({bpc:.4f} bits per character)"
    ax.set_title(title, fontsize=9)
    save_plot(fig, path)
    return (
        f"{len(chars)} characters of the val split coloured by loss: pale expected, dark red "
        f"surprising ({bpc:.4f} bits per character). Look at first letters against the rest"
    )


@torch.no_grad()
def draw_temperature(model, tokenizer, ids, args, path, shown=12):
    idx = torch.tensor([ids], device=model.wte.weight.device)  # (1, T)
    logits = model(idx)[0][:, -1]  # (1, V): the next token's
    # the next token's probabilities (V,) at each temperature
    by_t = {t: next_token_probs(logits, SamplerConfig(t), idx)[0].cpu() for t in args.temperatures}
    order = logits[0].cpu().argsort(descending=True)[:shown].tolist()  # at every temperature
    fig, ax = new_plot(height=4)
    width = 0.8 / len(by_t)
    for k, (t, probs) in enumerate(by_t.items()):
        heights = probs[order].tolist() + [1.0 - probs[order].sum().item()]  # then the rest
        x = np.arange(len(order) + 1) + (k - (len(by_t) - 1) / 2) * width
        bits = entropy_bits(probs[None])[0].item()
        ax.bar(x, heights, width, label=f"T = {t:g}: entropy {bits:.2f} bits")
    ax.set_xticks(range(len(order) + 1), [short_label(tokenizer, t) for t in order] + ["rest"])
    title = f"the next token after {tokenizer.decode(ids)[-24:]!r} at each temperature"
    ax.set(ylabel="probability", title=title)
    save_plot(fig, path, ax)
    return (
        "the next-token distribution after the prompt at each temperature. Look at how a low "
        "one piles the probability onto the favourite and a high one spreads it over the rest"
    )


@torch.no_grad()
def draw_embeddings(model, tokenizer, path):
    """Each token's embedding row, centred, projected onto its two main directions (PCA by SVD)."""
    weights = model.wte.weight.float().cpu()[: tokenizer.vocab_size]  # (V, C)
    centred = weights - weights.mean(dim=0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()  # (V, 2)
    share = (s[:2] ** 2).sum().item() / (s**2).sum().item()
    fig, ax = new_plot(height=5)
    ax.scatter(xy[:, 0], xy[:, 1], s=4, color="lightgray")
    for token, (x, y) in enumerate(xy):
        label = short_label(tokenizer, token) if token != tokenizer.eot_id else "EOT"
        colour = "C2" if label.isalpha() else "black"
        colour = "C0" if label.isupper() else colour
        colour = "C3" if label in "aeiouAEIOU" else colour
        ax.annotate(label, (x, y), ha="center", va="center", fontsize=8, color=colour)
    ax.set(xlabel="first principal direction", ylabel="second principal direction")
    ax.set_title(f"token embeddings in 2-D (PCA: {share:.0%} of their variance)")
    save_plot(fig, path, ax)
    return (
        f"each character's embedding on its two main directions ({share:.0%} of the variance). "
        "Look for the vowels together, capitals apart, and punctuation in its own corner"
    )


def main(argv=None):
    parser = cli.ArgumentParser(description="Draw what a trained checkpoint has learned, as PNGs.")
    parser.add_argument("checkpoint", nargs="?", default="checkpoints/best.pt", help="%(default)s")
    parser.add_argument("--out_dir", default="pictures", help="where the PNGs go: %(default)s")
    parser.add_argument("--only", help=f"some of: {', '.join(PICTURES)} (default: all)")
    parser.add_argument("--prompt", default="O Romeo, I will th", help="attention and temperature")
    parser.add_argument("--layer", type=int, default=-1, help="attention: only this layer, from 0")
    parser.add_argument("--head", type=int, default=-1, help="attention: only this head, from 0")
    parser.add_argument("--temperatures", type=temperatures, default="0.5,0.8,1.0,1.5", help="T")
    parser.add_argument("--data", default="", help="surprise: this text's val split instead")
    parser.add_argument("--passage_chars", type=int, default=600, help="surprise: its length")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = parser.parse_args(argv)
    asked = [n.strip() for n in (args.only or ",".join(PICTURES)).split(",")]
    names = [n for n in PICTURES if n in asked]
    if len(names) != len(asked) or not 1 <= args.passage_chars <= 5000:
        raise TinyLLMError(f"--only takes {', '.join(PICTURES)}; --passage_chars 1 to 5000")
    device = devices.choose_device(args.device)
    model, tokenizer, saved = checkpoint.load_model(args.checkpoint, device)
    ids = sources.encode_prompt(tokenizer, args.prompt)
    c = model.config
    if {"attention", "temperature"} & set(names) and len(ids) > c.block_size:
        raise TinyLLMError(f"--prompt is {len(ids)} tokens; the model sees at most {c.block_size}")
    if "attention" in names and not (-1 <= args.layer < c.n_layer and -1 <= args.head < c.n_head):
        raise TinyLLMError(
            f"--layer and --head: the model has {c.n_layer} layers of {c.n_head} heads, from 0"
        )
    if "embeddings" in names and not isinstance(tokenizer, CharTokenizer):
        why = "the embeddings picture labels each point with its character: it needs a char model"
        require(not args.only, why)
        cli.log(f"skipped embeddings.png: {why}")
        names.remove("embeddings")
    paths = {name: os.path.join(args.out_dir, f"{name}.png") for name in names}
    for path in paths.values():
        cli.check_writable(path, "--out_dir", make_folder=True)
    passage = val_passage(args, tokenizer, saved) if "surprise" in names else None
    draw = {
        "attention": lambda path: draw_attention(model, tokenizer, ids, args, path),
        "surprise": lambda path: draw_surprise(model, tokenizer, passage, path),
        "temperature": lambda path: draw_temperature(model, tokenizer, ids, args, path),
        "embeddings": lambda path: draw_embeddings(model, tokenizer, path),
    }
    with warnings.catch_warnings():  # a character the font lacks is drawn as a box
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        for name, path in paths.items():
            cli.log(f"wrote {path}: {draw[name](path)}")


if __name__ == "__main__":
    cli.run_cli(main)
