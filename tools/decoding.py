"""The decoding lesson, measured: greedy, beam search and sampling at several temperatures from one
checkpoint and prompt, each text scored by the model's log-probability per token and its repetition.

    python -m tools.decoding checkpoints/best.pt --prompt "To be or not"
"""

import argparse
import math
import statistics

import torch

from config import SamplerConfig, TinyLLMError
from machinery import checkpoint, cli, sources
from machinery.annotate import model_odds
from sampling import Context, beam_search, sample_text


def temperatures(text):
    """--temperatures, comma-separated, each checked as --temperature is (an argparse type)."""
    try:
        return [SamplerConfig(temperature=float(t)).temperature for t in text.split(",")]
    except (ValueError, TinyLLMError):
        raise argparse.ArgumentTypeError(f"0 or numbers from 0.001 to 1000, got {text!r}") from None


def repeated_ngrams(text, n=3):
    """The share of the word n-grams that repeat an earlier one: 0 all new, near 1 in a loop."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def main(argv=None):
    parser = cli.ArgumentParser(description="Greedy, beam search and sampling, scored.")
    parser.add_argument("checkpoint", nargs="?", default="checkpoints/best.pt")
    parser.add_argument("--prompt", default="To be or not")
    parser.add_argument("--new_tokens", type=int, default=300)
    parser.add_argument("--beams", default="4,8", help="beam widths, comma-separated")
    parser.add_argument(
        "--temperatures", type=temperatures, default="0.5,0.8,1.0,1.2", help="comma-separated"
    )
    parser.add_argument("--seeds", type=int, default=3, help="samples per temperature")
    args = parser.parse_args(argv)
    try:
        beams = [int(w) for w in args.beams.split(",")]
    except ValueError:
        raise TinyLLMError("--beams takes whole numbers, comma-separated") from None
    if min(beams + [args.new_tokens, args.seeds]) < 1:
        raise TinyLLMError("--beams, --new_tokens and --seeds must be at least 1")
    model, tokenizer, _ = checkpoint.load_model(args.checkpoint)
    ids = sources.encode_prompt(tokenizer, args.prompt)  # as generate.py's
    idx = torch.tensor([ids])  # (1, T)
    methods = [("greedy", 0, None, [0])] + [(f"beam {w}", None, w, [0]) for w in beams]
    methods += [(f"sampling, T = {t:g}", t, None, range(args.seeds)) for t in args.temperatures]
    cli.log("| method | log-probability per token | repeated word 3-grams |\n|---|---|---|")
    texts = {}
    for name, temperature, width, seeds in methods:
        scores = []
        for seed in seeds:
            if width:
                new = beam_search(Context(model), idx, args.new_tokens, width)[0]
            else:
                sampler = SamplerConfig(temperature)
                new = torch.tensor([sample_text(model, ids, args.new_tokens, sampler, seed=seed)])
            odds = model_odds(Context(model), idx, new)
            logp = sum(math.log(p[0, t[0, 0]].item()) for t, p in odds) / new.size(1)
            text = tokenizer.decode(new[0].tolist())
            texts.setdefault(name, text)
            scores.append((logp, repeated_ngrams(text)))
        logp, repeats = map(statistics.mean, zip(*scores))
        cli.log(f"| {name} | {logp:.3f} | {100 * repeats:.0f}% |")
    for name, text in texts.items():
        cli.log(f"\n{name}:\n{args.prompt}{text}")


if __name__ == "__main__":
    cli.run_cli(main)
