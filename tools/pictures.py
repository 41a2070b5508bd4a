"""See inside a trained model, each picture a PNG announced by a line saying what to look for: attention
(each layer's and head's weights over the prompt), surprise (the val split coloured by the model's loss),
temperature (the next-token distribution at several temperatures), embeddings (a char model's, by PCA)."""

import machinery  # noqa: F401 (first, before torch loads: the start time, and OpenMP's idle threads soon sleep)

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from config import (DEVICE_HELP, DEVICES, TEMPERATURES, THREADS_HELP, Sampler, TinyLLMError, check_settings,
                    make_config, require, setting)
from sampling import next_token_probs
from utils import CharTokenizer, bits_per_char, chars_per_token

from machinery.annotate import WholeCharacters, entropy_bits, token_piece
from machinery.checkpoint import load_model
from machinery.cli import ArgumentParser, add_config_flags, check_writable, explicit_flags, log, run_cli
from machinery.device import choose_device, set_threads
from machinery.plots import DPI, new_plot, save_plot
from machinery.records import token_losses
from machinery.sources import encode_prompt, validation_split


PICTURES = ("attention", "surprise", "temperature", "embeddings")


@dataclass
class PictureConfig:
    """What tools/pictures.py draws from a checkpoint, and where."""
    out_dir: str = setting("pictures", "folder the PNGs are written to (attention.png, surprise.png, ...)")
    only: str = setting(",".join(PICTURES), "which pictures, comma-separated: " + ", ".join(PICTURES))
    prompt: str = setting("O Romeo, I will th", "text whose attention is drawn, and after which the next-token "
                                               "distribution is drawn at each temperature")
    layer: int = setting(-1, "attention: draw only this layer (0 = the first); -1 = every layer")
    head: int = setting(-1, "attention: draw only this head (0 = the first); -1 = every head")
    temperatures: str = setting("0.5,0.8,1.0,1.5", "temperature: the temperatures to compare, comma-separated")
    data: str = setting("", "surprise: score the val split of this text instead of the checkpoint's own "
                            "(as train.py --eval_only does)")
    passage_chars: int = setting(600, "surprise: colour the first N characters of the val split; the bits per "
                                      "character printed are over the same passage")
    device: str = setting("auto", DEVICE_HELP, DEVICES)
    threads: int = setting(0, THREADS_HELP)

    def __post_init__(self):
        names = [n.strip() for n in self.only.split(",") if n.strip()]
        require(names and set(names) <= set(PICTURES), f"--only takes {', '.join(PICTURES)}, got {self.only!r}")
        require(self.layer >= -1, f"--layer must be -1 (every layer) or a layer number, got {self.layer}")
        require(self.head >= -1, f"--head must be -1 (every head) or a head number, got {self.head}")
        try:
            temps = self.temperature_list()
        except ValueError:
            temps = []
        require(temps and all(TEMPERATURES[0] <= t <= TEMPERATURES[1] for t in temps), "--temperatures must be numbers "
                f"between {TEMPERATURES[0]:g} and {TEMPERATURES[1]:g}, comma-separated, got {self.temperatures!r}")
        require(1 <= self.passage_chars <= 5000, f"--passage_chars must be in 1..5000, got {self.passage_chars}")
        check_settings(self, "--")

    def temperature_list(self):
        return [float(t) for t in self.temperatures.split(",")]


def short_label(tokenizer, token):
    """A token as an axis label: spaces and line ends made visible, part of a character as its bytes in hex."""
    piece = token_piece(tokenizer, token)
    text = piece if isinstance(piece, str) else piece.decode("utf-8", errors="backslashreplace")
    return text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"


@torch.no_grad()
def attention_maps(model, idx):
    """(logits (1, T, V), [attention weights (nh, T, T) per layer]) for idx (1, T): the weights each layer's formula
    computes in the forward itself (CausalSelfAttention.attention_weights, for this pass in place of the fused kernel),
    seen as they go into its attn_dropout."""
    maps, layers = [], [block.attn for block in model.blocks]
    fused = [attn.fused for attn in layers]
    hooks = [attn.attn_dropout.register_forward_pre_hook(lambda module, args: maps.append(args[0][0]))
             for attn in layers]  # args: (weights (1, nh, T, T),)
    for attn in layers:
        attn.fused = False
    try:
        logits, _ = model(idx)  # (1, T, V)
    finally:
        for attn, was, hook in zip(layers, fused, hooks):
            attn.fused = was
            hook.remove()
    return logits, maps


def draw_attention(model, tokenizer, ids, cfg, path):
    """A grid of heatmaps, layers down and heads across (or the one --layer / --head asks for)."""
    _, maps = attention_maps(model, torch.tensor([ids], device=model.wte.weight.device))
    layers = [cfg.layer] if cfg.layer >= 0 else list(range(model.config.n_layer))
    heads = [cfg.head] if cfg.head >= 0 else list(range(model.config.n_head))
    panel = 6.0 if len(layers) == len(heads) == 1 else min(2.2, 8.4 / len(heads))  # inches per heatmap
    fig, axes = new_plot(len(layers) * panel + 0.8, len(heads) * panel + 0.6, grid=(len(layers), len(heads)))
    T = len(ids)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    labels = [short_label(tokenizer, t) for t in ids]
    label_size = min(9.0, panel * DPI / T * 0.7)  # points: about a cell's height
    rotation = 90 if max(len(label) for label in labels) > 1 else 0  # single characters read upright
    ticks, tick_labels = (range(T), labels) if label_size >= 4.5 else ([], [])  # tokens shown where they can be read
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            weights = np.ma.masked_array(maps[layer][head].float().cpu().numpy(), mask=future)
            ax.imshow(weights, cmap="Blues", vmin=0.0, vmax=1.0)
            ax.set_facecolor("#dddddd")  # grey shows through where the masked future leaves the heatmap clear
            ax.set_xticks(ticks, tick_labels, fontsize=label_size, rotation=rotation)
            ax.set_yticks(ticks, tick_labels, fontsize=label_size)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
    fig.suptitle("attention: row = the token looking, column = the token looked at; darker = more "
                 "(each row sums to 1), grey = the masked future", fontsize=8)
    save_plot(fig, None, path)
    return (f"one heatmap per layer (rows) and head (columns) over the prompt's {T} tokens. Look for heads "
            f"that attend to the token just before (a dark line below the diagonal), heads that stay on the "
            f"token itself, and heads that reach back to the start of a word or line")


def val_passage(cfg, tokenizer, checkpoint):
    """Token ids (n,) from the start of the val split --eval_only scores, up to passage_chars characters."""
    corpus, _ = validation_split(checkpoint, tokenizer, cfg.data)
    ids = np.asarray(corpus.val[:4 * cfg.passage_chars + 1], dtype=np.int64).tolist()  # a byte token may be 1/4 char
    pieces, chars = WholeCharacters(tokenizer), 0
    for n, token in enumerate(ids, 1):
        if piece := pieces.add(token, 1.0):
            chars += len(piece[0])
        if chars >= cfg.passage_chars:
            ids = ids[:max(n, 2)]  # at least one token to predict
            break
    return torch.tensor(ids)


def char_surprise(tokenizer, ids, losses):
    """[(character, bits)]: each piece's tokens' loss shared by its characters; the first token (no context) NaN."""
    out, pieces, bits = [], WholeCharacters(tokenizer), 0.0
    for i, token in enumerate(ids.tolist()):
        bits += losses[i - 1].item() / math.log(2) if i else math.nan
        if piece := pieces.add(token, 1.0):
            out += [(ch, bits / len(piece[0])) for ch in piece[0]]
            bits = 0.0
    return out


def draw_surprise(model, tokenizer, ids, path, width=72):
    """The passage in a grid of width characters, each cell coloured by its bits; returns the look-for line."""
    losses = token_losses(model, ids)
    chars = char_surprise(tokenizer, ids, losses)
    rows = [[]]
    for ch, bits in chars:
        rows[-1].append(("\u21b5" if ch == "\n" else ch, bits))
        if ch == "\n" or len(rows[-1]) == width:
            rows.append([])
    grid = np.full((len(rows), width), np.nan)
    fig, ax = new_plot(0.2 * len(rows) + 1.0, 9.0)
    for r, row in enumerate(rows):
        for c, (ch, bits) in enumerate(row):
            grid[r, c] = bits
            ax.text(c, r, ch, ha="center", va="center", fontsize=7, family="monospace")
    image = ax.imshow(grid, cmap="YlOrRd", vmin=0.0, vmax=8.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="bits")
    ax.set_axis_off()
    bpc = bits_per_char(losses.mean().item(), chars_per_token(tokenizer, ids.tolist()))
    ax.set_title(f"surprise: the model's loss on each character ({bpc:.4f} bits per character)", fontsize=9)
    save_plot(fig, None, path)
    return (f"{len(chars)} characters of the val split coloured by the model's loss on each, pale = "
            f"expected, dark red = surprising; {bpc:.4f} bits per character over {len(ids)} tokens. Look "
            f"for the first letters of words and names (surprising) against the ends of words (predictable)")


@torch.no_grad()
def draw_temperature(model, tokenizer, ids, cfg, path, shown=12):
    idx = torch.tensor([ids], device=model.wte.weight.device)  # (1, T)
    logits = model(idx)[0][:, -1]  # (1, V): the next token's
    by_t = {t: next_token_probs(logits, Sampler(temperature=t), idx)[0].cpu() for t in cfg.temperature_list()}  # (V,)
    order = next_token_probs(logits, Sampler(temperature=1.0), idx)[0].cpu().argsort(descending=True)[:shown].tolist()
    fig, ax = new_plot(height=4)
    width = 0.8 / len(by_t)
    for k, (t, probs) in enumerate(by_t.items()):
        heights = probs[order].tolist() + [1.0 - probs[order].sum().item()]  # the shown tokens, then the rest
        ax.bar(np.arange(len(order) + 1) + (k - (len(by_t) - 1) / 2) * width, heights, width,
               label=f"T = {t:g}: entropy {entropy_bits(probs[None])[0].item():.2f} bits")
    ax.set_xticks(range(len(order) + 1), [short_label(tokenizer, t) for t in order] + ["rest"])
    end = tokenizer.decode(ids)[-24:]
    ax.set(ylabel="probability", title=f"the next token after {end!r} at each temperature")
    save_plot(fig, ax, path)
    return (f"the next-token distribution after the prompt at temperatures {cfg.temperatures}. Look at how a "
            f"low temperature piles the probability onto the favourite (low entropy) and a high one spreads it "
            f"over the rest (high entropy)")


@torch.no_grad()
def draw_embeddings(model, tokenizer, path):
    """Each token's embedding row, centred, projected onto its two main directions (PCA by SVD)."""
    weights = model.wte.weight.float().cpu()[:tokenizer.vocab_size]  # (V, C)
    centred = weights - weights.mean(dim=0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()  # (V, 2)
    share = (s[:2] ** 2).sum().item() / (s ** 2).sum().item()
    fig, ax = new_plot(height=5)
    ax.scatter(xy[:, 0], xy[:, 1], s=4, color="lightgray")
    for token, (x, y) in enumerate(xy):
        label = short_label(tokenizer, token) if token != tokenizer.eot_id else "EOT"
        kind = "C3" if label in "aeiouAEIOU" else "C0" if label.isupper() else "C2" if label.isalpha() else "black"
        ax.annotate(label, (x, y), ha="center", va="center", fontsize=8, color=kind)  # clusters of a kind stand out
    ax.set(xlabel="first principal direction", ylabel="second principal direction",
           title=f"token embeddings in 2-D (PCA: {share:.0%} of their variance)")
    save_plot(fig, ax, path)
    return (f"every character's embedding projected onto its two main directions ({share:.0%} of the variance). "
            f"Look for the vowels near one another, capitals apart from lower case, and punctuation in its own corner")


def check_request(cfg, model, tokenizer, ids, only_given):
    """Refuse, before drawing anything, what cannot be drawn; returns the pictures to draw (cfg.only's, in order)."""
    c, names = model.config, [name for name in PICTURES if name in {n.strip() for n in cfg.only.split(",")}]
    if {"attention", "temperature"} & set(names) and len(ids) > c.block_size:
        raise TinyLLMError(f"--prompt is {len(ids)} tokens but the model sees at most {c.block_size} (its block_size)")
    if "attention" in names and cfg.layer >= c.n_layer:
        raise TinyLLMError(f"--layer {cfg.layer}: the model has {c.n_layer} layers (0 to {c.n_layer - 1})")
    if "attention" in names and cfg.head >= c.n_head:
        raise TinyLLMError(f"--head {cfg.head}: the model has {c.n_head} heads per layer (0 to {c.n_head - 1})")
    if "embeddings" in names and not isinstance(tokenizer, CharTokenizer):
        kind = type(tokenizer).__name__.removesuffix("Tokenizer").lower()
        why = f"the embeddings picture labels each point with its character, so it needs a char model (this is {kind})"
        if only_given:
            raise TinyLLMError(why)
        log(f"skipped embeddings.png: {why}")
        names = [n for n in names if n != "embeddings"]
    return names


def main(argv=None):
    parser = ArgumentParser(description="Draw what a trained tinyllm checkpoint has learned: attention, "
                                        "surprise, temperature and embeddings, as PNGs.")
    parser.add_argument("checkpoint", nargs="?", default="checkpoints/best.pt", metavar="CHECKPOINT.pt",
                        help="the checkpoint to look inside (default: %(default)s)")
    add_config_flags(parser, PictureConfig, {"device": ("auto", f"{choose_device('auto').type} here")},
                     title="pictures")
    args = parser.parse_args(argv)
    given = explicit_flags(args)
    cfg = make_config(PictureConfig, given)
    device = choose_device(cfg.device)
    set_threads(cfg.threads)
    model, tokenizer, checkpoint = load_model(args.checkpoint, device)
    ids = encode_prompt(tokenizer, cfg.prompt)
    names = check_request(cfg, model, tokenizer, ids, "only" in given)
    paths = {name: os.path.join(cfg.out_dir, f"{name}.png") for name in names}
    for path in paths.values():
        check_writable(path, "--out_dir", make_folder=True)
    passage = val_passage(cfg, tokenizer, checkpoint) if "surprise" in names else None
    for name, path in paths.items():
        with warnings.catch_warnings():  # a character the font lacks is drawn as a box; no need to say so
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            said = {"attention": lambda: draw_attention(model, tokenizer, ids, cfg, path),
                    "surprise": lambda: draw_surprise(model, tokenizer, passage, path),
                    "temperature": lambda: draw_temperature(model, tokenizer, ids, cfg, path),
                    "embeddings": lambda: draw_embeddings(model, tokenizer, path)}[name]()
        log(f"wrote {path}: {said}")


if __name__ == "__main__":
    run_cli(main)
