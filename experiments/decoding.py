"""The decoding lesson measured (bench.py decoding): greedy, beam search and sampling from one
checkpoint and prompt, each text scored by the model's log-probability and its repetition."""

import math
import statistics
import time

import torch

import sampling
from config import Sampler
from deep_dives import beam
from experiments.runs import markdown_table
from machinery.annotate import model_odds
from machinery.checkpoint import load_model
from machinery.cli import log
from machinery.sources import encode_prompt


def repeated_ngrams(text, n=3):
    """The share of the text's word n-grams that repeat an earlier one: 0 all new, near 1 when it loops."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def bench_decoding(args):
    """Each method's texts, all scored by log-probability per token at temperature 1 and repeated word 3-grams."""
    model, tokenizer, _ = load_model(args.checkpoint)
    idx = torch.tensor([encode_prompt(tokenizer, args.prompt)])  # (1, T), as generate.py encodes it
    methods = [("greedy", 0, None)] + [(f"beam {w}", None, w) for w in args.beams]
    methods += [(f"sampling, T = {t:g}", t, None) for t in args.temperatures]
    rows = []
    for name, temperature, width in methods:
        for seed in range(args.seeds) if temperature else [None]:
            t0 = time.perf_counter()
            if width:
                new, _ = beam.beam_search(model, idx, args.new_tokens, width)
            else:
                new = sampling.generate(model, idx, args.new_tokens, Sampler(temperature=temperature),
                                        generator=torch.Generator().manual_seed(seed or 0))[:, idx.size(1):]
            seconds = time.perf_counter() - t0
            logp = sum(math.log(p[0, t[0, 0]].item()) for t, p in model_odds(model, idx, new)) / new.size(1)
            text = tokenizer.decode(new[0].tolist())
            rows.append({"method": name, "seed": seed, "logp_per_token": logp, "repeated_3grams": repeated_ngrams(text),
                         "seconds": seconds, "text": text})
            log(f"{name:<18} seed {seed if seed is not None else '-':>2} | log p per token {logp:7.3f} | repeated "
                f"word 3-grams {100 * rows[-1]['repeated_3grams']:5.1f}% | {seconds:5.2f} s")
    if args.out_md:
        write_decoding_md(rows, args)
    return {"checkpoint": args.checkpoint, "prompt": args.prompt, "new_tokens": args.new_tokens, "rows": rows}


def write_decoding_md(rows, args):
    """A table (sampling: the mean over seeds and their range) and each method's first text."""
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def cell(method, key, scale=1.0, fmt="{:.3f}"):
        values = [scale * r[key] for r in rows if r["method"] == method]
        mean = fmt.format(statistics.mean(values))
        return mean if len(values) == 1 else f"{mean} ({fmt.format(min(values))} to {fmt.format(max(values))})"
    table = markdown_table(
        ["method", "log-probability per token", "repeated word 3-grams", f"seconds for {args.new_tokens} tokens"],
        [[m, cell(m, "logp_per_token"), cell(m, "repeated_3grams", 100, "{:.0f}%"), cell(m, "seconds", fmt="{:.2f}")]
         for m in methods])
    texts = [f"**{m}**\n\n```\n{args.prompt}{next(r for r in rows if r['method'] == m)['text']}\n```" for m in methods]
    with open(args.out_md, "w", encoding="utf-8") as f:
        f.write(table + "\n" + "\n\n".join(texts) + "\n")
    log(f"wrote {args.out_md}")
