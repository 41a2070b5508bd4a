"""Sample text from trained checkpoints; several are sampled with the same prompt and seed, to compare.
The same seed on the same machine gives the same text.

    python generate.py checkpoints/best.pt --prompt "ROMEO:" --seed 42
"""

import machinery  # noqa: F401 (first, before torch loads: OpenMP's idle threads soon sleep)

import dataclasses
import os
import sys

import torch

from config import SamplerConfig, GenerateConfig, TinyLLMError, make_config
from sampling import beam_search, generate, next_token_probs

from machinery import checkpoint, cli, device as devices, sources
from machinery.annotate import Annotator, WholeCharacters, model_odds


def sample(model, tokenizer, prompt_ids, cfg, sampler, device, stream, annotator):
    """[(text, new tokens, whether it stopped)] of num_samples continuations of the prompt, drawn as one batch."""
    stop = None if cfg.no_stop else tokenizer.eot_id
    shown = [t for t in prompt_ids if t != stop]  # the prompt as printed (--qa's starts with the stop token)
    idx = torch.tensor([prompt_ids] * cfg.num_samples, dtype=torch.long, device=device)  # (B, T)
    pieces = WholeCharacters(tokenizer)  # a byte-level token can end mid-character: it waits for the rest

    def show(token, logits, idx):  # the first sample's new token, printed as it comes
        if token[0, 0] != stop and (piece := pieces.add(token[0, 0].item(), 1.0)):
            print(piece[0], end="", flush=True)

    def odds(token, logits, idx):  # every sample's token, with the distribution it was drawn from
        annotator.add(token, next_token_probs(logits, sampler))

    if annotator:
        annotator.begin(shown, cfg.num_samples, stop, live=stream)
    elif stream:
        print(tokenizer.decode(shown), end="", flush=True)
    if cfg.beam:
        new, _ = beam_search(model, idx, cfg.max_new_tokens, cfg.beam, not cfg.no_cache, stop, cfg.length_penalty)
        for token, probs in model_odds(model, idx, new, not cfg.no_cache) if annotator else ():
            annotator.add(token, probs)
    else:
        out = generate(model, idx, cfg.max_new_tokens, sampler, use_cache=not cfg.no_cache, stop_token=stop,
                       generator=torch.Generator(device).manual_seed(cfg.seed),
                       on_token=odds if annotator else show if stream else None)
        new = out[:, idx.size(1):]
    if annotator:
        annotator.end()
    elif stream:  # the last tokens, whole characters or not
        print((pieces.flush() or ("",))[0], flush=True)
    results = []
    for row in new.tolist():
        stopped = stop in row
        row = row[:row.index(stop)] if stopped else row
        results.append((tokenizer.decode(shown + row), len(row), stopped))
    return results


def header(cfg, sampler, path, saved, prompt):
    """The output file's header: everything that shaped the text below it."""
    settings = f"beam={cfg.beam} length_penalty={cfg.length_penalty}" if cfg.beam else f"seed={cfg.seed} " + " ".join(
        f"{k}={v}" for k, v in dataclasses.asdict(sampler).items())
    settings += (f" max_new_tokens={cfg.max_new_tokens} num_samples={cfg.num_samples} qa={cfg.qa} "
                 f"no_stop={cfg.no_stop} kv_cache={not cfg.no_cache}")
    if cfg.show_probs:
        settings += f" show_top={cfg.show_top}"
    source = f" (from {cfg.prompt_file})" if cfg.prompt_file else ""
    return f"# checkpoint: {path} ({checkpoint.where(saved)})\n# {settings}\n# prompt{source}: {prompt!r}"


def sample_checkpoint(path, model, tokenizer, saved, cfg, sampler, prompt, device, several):
    """Sample one checkpoint and print its samples (streamed when alone); returns its block of the output file."""
    model.to(device)  # read on the CPU; only the model moves
    prompt_ids = sources.encode_prompt(tokenizer, prompt, cfg.qa)
    stream = not several and cfg.num_samples == 1 and not cfg.output_file and not cfg.beam
    annotator = cfg.show_probs and Annotator(tokenizer, cfg.show_top, colour=sys.stdout.isatty() and not cfg.output_file)
    if several:
        cli.log(f"\n{'=' * 20} {path} ({checkpoint.where(saved)}) {'=' * 20}")
    with devices.out_of_memory_as_error(f"out of memory on {devices.describe(device)}: try fewer --num_samples"):
        samples = sample(model, tokenizer, prompt_ids, cfg, sampler, device, stream, annotator)
    labels = [f"--- sample {i + 1}/{cfg.num_samples}" + (f" (stopped at <|endoftext|> after {n} tokens)" if s else "")
              + " ---" for i, (_, n, s) in enumerate(samples)]
    if stream:  # printed as it was sampled
        if samples[0][2]:
            print(f"(stopped at <|endoftext|> after {samples[0][1]} tokens)", file=sys.stderr, flush=True)
        return None
    texts = [annotator.report(i) if annotator else text for i, (text, _, _) in enumerate(samples)]
    for label, text, (_, _, stopped) in zip(labels, texts, samples):
        if cfg.num_samples > 1 or stopped:
            cli.log(label)
        cli.log(text)
    return header(cfg, sampler, path, saved, prompt) + "\n\n" + "\n\n".join(f"{l}\n{t}" for l, t in zip(labels, texts))


def main(argv=None):
    here = devices.choose_device("auto")
    parser = cli.ArgumentParser(description="Sample text from trained tinyllm checkpoints.")
    parser.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT.pt",
                        help="one or more checkpoints, sampled alike (default: checkpoints/best.pt)")
    parser.add_argument("--checkpoint", nargs="+", default=[], metavar="PATH.pt", help="the same, as a flag")
    cli.add_config_flags(parser, SamplerConfig, title="how each token is drawn")
    cli.add_config_flags(parser, GenerateConfig, devices.auto_meanings(here), title="sampling")
    args = parser.parse_args(argv)
    paths, flags = args.checkpoints + args.checkpoint or ["checkpoints/best.pt"], cli.given_flags(args)
    cfg, sampler = make_config(GenerateConfig, flags), make_config(SamplerConfig, flags)
    if cfg.beam and (drawn := [f"--{f.name}" for f in dataclasses.fields(SamplerConfig) if f.name in flags]):
        raise TinyLLMError(f"beam search draws nothing, so {', '.join(drawn)} cannot apply: drop it")
    device = devices.choose_device(cfg.device)
    devices.set_threads(cfg.threads)
    prompt = sources.read_prompt(cfg)
    if cfg.output_file:
        if cfg.output_file.lower().endswith(".pt") or os.path.realpath(cfg.output_file) in map(os.path.realpath, paths):
            raise TinyLLMError(f"--output_file {cfg.output_file} would replace a checkpoint: name a .txt file")
        cli.check_writable(cfg.output_file, "--output_file")
    # each read once, before the first is sampled; popped, so that one model at a time is on the device
    loaded = [checkpoint.load_model(path) for path in paths]
    for _, tokenizer, _ in loaded[1:]:  # and the prompt encoded for each
        sources.encode_prompt(tokenizer, prompt, cfg.qa, say=lambda _: None)
    several = len(paths) > 1
    blocks = [sample_checkpoint(path, *loaded.pop(0), cfg, sampler, prompt, device, several) for path in paths]
    if cfg.output_file:
        with open(cfg.output_file, "w", encoding="utf-8", newline="") as f:  # the text exactly, on every platform
            f.write("\n\n".join(blocks) + "\n")
        cli.log(f"wrote {cfg.output_file}")


if __name__ == "__main__":
    cli.run_cli(main)
