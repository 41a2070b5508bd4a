"""Sample text from trained checkpoints; several are sampled with the same prompt and seed, to compare them.
The same seed on the same machine gives the same text; beam search (--beam N) draws nothing, so it needs no seed.
Examples: README.md and docs/generation.md; every flag: python generate.py --help."""

import machinery  # noqa: F401 (first, before torch loads: the start time, and OpenMP's idle threads soon sleep)

import dataclasses
import os
import sys

import torch

from config import Sampler, SampleConfig, TinyLLMError, check_beam, make_config
import sampling

from machinery.annotate import Annotator, WholeCharacters, model_odds
from deep_dives import graphs
from deep_dives.beam import beam_search
from machinery.checkpoint import describe_checkpoint, load_model
from machinery.cli import ArgumentParser, add_config_flags, check_writable, explicit_flags, log, run_cli
from machinery.device import auto_meanings, choose_device, describe, out_of_memory_as_error, set_threads
from machinery.sources import encode_prompt, read_prompt


def sample(model, tokenizer, prompt_ids, cfg, sampler, device, stream=False, annotator=None):
    """[(text, new tokens, whether it stopped)] of num_samples continuations of the prompt, sampled as one batch."""
    stop, shown = stop_and_shown(tokenizer, prompt_ids, cfg)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    idx = torch.tensor([prompt_ids] * cfg.num_samples, dtype=torch.long, device=device)  # (B, T)
    pieces = WholeCharacters(tokenizer)  # (a byte-level token can end mid-character: pieces waits for the rest)

    def show(token, logits, idx):  # token (B, 1): the first sample's new token, printed as it comes
        if token[0, 0] != stop and (piece := pieces.add(token[0, 0].item(), 1.0)):
            print(piece[0], end="", flush=True)

    def odds(token, logits, idx):  # each step's tokens (B, 1) to the annotator, with the distribution drawn from
        annotator.add(token, sampling.next_token_probs(logits, sampler, idx))

    if annotator:
        annotator.begin(shown, cfg.num_samples, stop, live=stream)
    elif stream:
        sys.stdout.write(tokenizer.decode(shown))
    on_token = odds if annotator else show if stream else None
    # on a GPU the cache's one-token step is replayed from a CUDA graph: one launch, not hundreds (deep_dives/graphs.py)
    out = sampling.generate(model, idx, cfg.max_new_tokens, sampler, use_cache=not cfg.no_cache, stop_token=stop,
                            generator=generator, on_token=on_token, replay=graphs.replayable)
    if annotator:
        annotator.end()
    elif stream:  # the last tokens, whole characters or not: the text as decoded (an output file has it too)
        sys.stdout.write((pieces.flush() or ("",))[0] + "\n")
    return [cut_at_stop(tokenizer, shown, row, stop) for row in out[:, idx.size(1):].tolist()]


def stop_and_shown(tokenizer, prompt_ids, cfg):
    """The token a sample ends at (None with --no_stop), and the prompt as shown: without that token (--qa's)."""
    stop = None if cfg.no_stop else tokenizer.eot_id
    return stop, [t for t in prompt_ids if t != stop]


def cut_at_stop(tokenizer, shown, row, stop):
    """(text, new tokens, whether it stopped) of a row of new tokens, cut at the stop token."""
    stopped = stop in row
    row = row[:row.index(stop)] if stopped else row
    return tokenizer.decode(shown + row), len(row), stopped


def beam(model, tokenizer, prompt_ids, cfg, device, annotator=None):
    """[(text, new tokens, whether it stopped)] of the one continuation beam search of width --beam finds."""
    stop, shown = stop_and_shown(tokenizer, prompt_ids, cfg)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    new, _ = beam_search(model, idx, cfg.max_new_tokens, cfg.beam, use_cache=not cfg.no_cache,
                        stop_token=stop, length_penalty=cfg.length_penalty)  # (1, n)
    if annotator:
        annotator.begin(shown, 1, stop)
        for token, probs in model_odds(model, idx, new, use_cache=not cfg.no_cache):
            annotator.add(token, probs)
    return [cut_at_stop(tokenizer, shown, new[0].tolist(), stop)]


def sample_label(i, cfg, n_new, stopped):
    label = f"--- sample {i + 1}/{cfg.num_samples}"
    return label + (f" (stopped at <|endoftext|> after {n_new} tokens) ---" if stopped else " ---")


def header(cfg, sampler, path, checkpoint, prompt):
    """The output file's header: everything that shaped the text below it."""
    settings = f"beam={cfg.beam} length_penalty={cfg.length_penalty} " if cfg.beam else (
        f"seed={cfg.seed} " + "".join(f"{k}={v} " for k, v in dataclasses.asdict(sampler).items()))
    settings += (f"max_new_tokens={cfg.max_new_tokens} num_samples={cfg.num_samples} qa={cfg.qa} "
                 f"no_stop={cfg.no_stop} kv_cache={not cfg.no_cache}")
    if cfg.show_probs:  # only then: a header names only the settings that shaped the file
        settings += f" show_probs=True show_top={cfg.show_top}"
    source = f" (from {cfg.prompt_file})" if cfg.prompt_file else ""
    return f"# checkpoint: {path} ({describe_checkpoint(checkpoint)})\n# {settings}\n# prompt{source}: {prompt!r}"


def build_parser(device):
    parser = ArgumentParser(description="Sample text from trained tinyllm checkpoints.")
    parser.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT.pt",
                        help="one or more checkpoints; several are sampled with the same prompt and seed "
                             "(default: checkpoints/best.pt)")
    parser.add_argument("--checkpoint", nargs="+", default=[], metavar="PATH.pt", help="the same, as a flag")
    add_config_flags(parser, Sampler, title="how each token is drawn")
    add_config_flags(parser, SampleConfig, auto_meanings(device), title="sampling")
    return parser


def main(argv=None):
    args = build_parser(choose_device("auto")).parse_args(argv)
    paths = args.checkpoints + args.checkpoint or ["checkpoints/best.pt"]
    flags = explicit_flags(args)
    cfg, sampler = make_config(SampleConfig, flags), make_config(Sampler, flags)
    check_beam(cfg, flags)
    device = choose_device(cfg.device)
    set_threads(cfg.threads)
    prompt = read_prompt(cfg)
    if cfg.output_file:
        if cfg.output_file.lower().endswith(".pt") or os.path.realpath(cfg.output_file) in map(os.path.realpath, paths):
            raise TinyLLMError(f"--output_file {cfg.output_file} would replace a checkpoint: name a .txt file")
        check_writable(cfg.output_file, "--output_file")
    for path in paths[1:]:  # the others read (one at a time), and the prompt encoded for each, before the first
        encode_prompt(load_model(path)[1], prompt, cfg.qa, say=lambda _: None)  # is sampled (warned of then)
    blocks = [sample_checkpoint(path, cfg, sampler, prompt, device, several=len(paths) > 1) for path in paths]
    if cfg.output_file:
        with open(cfg.output_file, "w", encoding="utf-8", newline="") as f:  # the text exactly, on every platform
            f.write("\n\n".join(blocks) + "\n")
        log(f"wrote {cfg.output_file}")


def sample_checkpoint(path, cfg, sampler, prompt, device, several=False):
    """Sample one checkpoint and print its samples (streamed when alone); returns its block of the output file."""
    model, tokenizer, checkpoint = load_model(path, device)  # read on the CPU; only the model moves
    prompt_ids = encode_prompt(tokenizer, prompt, cfg.qa)
    stream = not several and cfg.num_samples == 1 and not cfg.output_file and not cfg.beam
    annotator = None
    if cfg.show_probs:  # colours only for a person at a terminal; a file or a pipe gets plain rows
        annotator = Annotator(tokenizer, cfg.show_top, colour=sys.stdout.isatty() and not cfg.output_file)
    if several:
        log(f"\n{'=' * 20} {path} ({describe_checkpoint(checkpoint)}) {'=' * 20}")
    with out_of_memory_as_error(f"out of memory on {describe(device)}: try a smaller --num_samples, or --device cpu"):
        if cfg.beam:
            samples = beam(model, tokenizer, prompt_ids, cfg, device, annotator)
        else:
            samples = sample(model, tokenizer, prompt_ids, cfg, sampler, device, stream=stream, annotator=annotator)
    if stream:  # printed as it was sampled (and there is no output file)
        _, n_new, stopped = samples[0]
        if stopped:
            print(f"(stopped at <|endoftext|> after {n_new} tokens)", file=sys.stderr, flush=True)
        return None
    texts = [annotator.report(i) if annotator else text for i, (text, _, _) in enumerate(samples)]
    for i, ((_, n_new, stopped), text) in enumerate(zip(samples, texts)):
        if cfg.num_samples > 1 or stopped:
            log(sample_label(i, cfg, n_new, stopped))
        log(text)
    return header(cfg, sampler, path, checkpoint, prompt) + "\n\n" + "\n\n".join(
        f"{sample_label(i, cfg, n, s)}\n{text}" for i, ((_, n, s), text) in enumerate(zip(samples, texts)))


if __name__ == "__main__":
    run_cli(main)
