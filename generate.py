"""Sample text from trained checkpoints; several get the same prompt and seed, to compare.

python generate.py checkpoints/best.pt --prompt "ROMEO:" --seed 42
"""

from machinery import checkpoint, cli, devices, sources
from machinery.annotate import Annotator, WholeCharacters, model_odds

import dataclasses
import os
import sys

import torch

from config import EOT, GenerateConfig, SamplerConfig, TinyLLMError, make_config
from sampling import beam_search, generate, next_token_probs, until_stop


def sample(model, tokenizer, prompt_ids, cfg, sampler, device, stream, annotator):
    """[(text, new tokens, whether it stopped)] of num_samples continuations, drawn as one batch."""
    stop = None if cfg.no_stop else tokenizer.eot_id
    shown = [t for t in prompt_ids if t != stop]  # the prompt as printed (--qa's starts with stop)
    idx = torch.tensor([prompt_ids] * cfg.num_samples, dtype=torch.long, device=device)  # (B, T)
    pieces = WholeCharacters(tokenizer, stop)

    def on_token(token, logits, idx):
        if annotator:  # every sample's token, with the distribution it was drawn from
            annotator.add(token, next_token_probs(logits, idx, sampler))
        elif stream:  # the first sample's, printed as it comes
            pieces.stream(token[0, 0].item())

    if annotator:
        annotator.begin(shown, cfg.num_samples, stop, live=stream)
    elif stream:
        print(tokenizer.decode(shown), end="", flush=True)
    if cfg.beam:
        new, _ = beam_search(
            model, idx, cfg.max_new_tokens, cfg.beam, not cfg.no_cache, stop, cfg.length_penalty
        )
        if annotator:
            for token, probs in model_odds(model, idx, new, not cfg.no_cache):
                annotator.add(token, probs)
    else:
        generator = torch.Generator(device).manual_seed(cfg.seed)
        out = generate(
            model,
            idx,
            cfg.max_new_tokens,
            sampler,
            use_cache=not cfg.no_cache,
            stop_token=stop,
            generator=generator,
            on_token=on_token,
        )
        new = out[:, idx.size(1) :]
    if annotator:
        annotator.end()
    elif stream:
        pieces.end_stream()
    results = []
    for row in new.tolist():
        cut = until_stop(row, stop)
        results.append((tokenizer.decode(shown + cut), len(cut), cut != row))
    return results


def header(cfg, sampler, path, saved, prompt):
    """The output file's header: everything that shaped the text below it."""
    if cfg.beam:
        settings = f"beam={cfg.beam} length_penalty={cfg.length_penalty}"
    else:
        drawn = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(sampler).items())
        settings = f"seed={cfg.seed} {drawn}"
    settings += (
        f" max_new_tokens={cfg.max_new_tokens} num_samples={cfg.num_samples} "
        f"qa={cfg.qa} no_stop={cfg.no_stop} kv_cache={not cfg.no_cache}"
    )
    if cfg.show_probs:
        settings += f" show_top={cfg.show_top}"
    source = f" (from {cfg.prompt_file})" if cfg.prompt_file else ""
    where = f"# checkpoint: {path} ({checkpoint.where(saved)})"
    return f"{where}\n# {settings}\n# prompt{source}: {prompt!r}"


def sample_checkpoint(path, loaded, cfg, sampler, prompt, device, several):
    """One checkpoint's samples, printed (streamed when alone): its block of the output file."""
    model, tokenizer, saved = loaded.model, loaded.tokenizer, loaded.checkpoint
    model.to(device)  # read on the CPU; only the model moves
    prompt_ids = sources.encode_prompt(tokenizer, prompt, cfg.qa)
    stream = not several and cfg.num_samples == 1 and not cfg.output_file and not cfg.beam
    annotator = Annotator(tokenizer, cfg.show_top, cfg.output_file) if cfg.show_probs else None
    if several:
        cli.log(f"\n{'=' * 20} {path} ({checkpoint.where(saved)}) {'=' * 20}")
    hint = f"out of memory on {devices.name(device)}: try fewer --num_samples"
    with devices.out_of_memory_as_error(hint):
        samples = sample(model, tokenizer, prompt_ids, cfg, sampler, device, stream, annotator)
    if stream:  # printed as it was sampled
        if samples[0][2]:
            print(f"(stopped at {EOT} after {samples[0][1]} tokens)", file=sys.stderr, flush=True)
        return None
    blocks = []
    for i, (text, n, stopped) in enumerate(samples):
        ended = f" (stopped at {EOT} after {n} tokens)" if stopped else ""
        label = f"--- sample {i + 1}/{cfg.num_samples}{ended} ---"
        text = annotator.report(i) if annotator else text
        if cfg.num_samples > 1 or stopped:
            cli.log(label)
        cli.log(text)
        blocks.append(f"{label}\n{text}")
    return header(cfg, sampler, path, saved, prompt) + "\n\n" + "\n\n".join(blocks)


def main(argv=None):
    here = devices.choose_device("auto")
    parser = cli.ArgumentParser(description="Sample text from trained tinyllm checkpoints.")
    parser.add_argument(
        "checkpoints",
        nargs="*",
        metavar="CHECKPOINT.pt",
        help="checkpoints, sampled alike (default: checkpoints/best.pt)",
    )
    parser.add_argument(
        "--checkpoint", nargs="+", default=[], metavar="PATH.pt", help="the same, as a flag"
    )
    cli.add_config_flags(parser, SamplerConfig, title="how each token is drawn")
    cli.add_config_flags(parser, GenerateConfig, devices.auto_meanings(here), title="sampling")
    args = parser.parse_args(argv)
    paths = args.checkpoints + args.checkpoint or ["checkpoints/best.pt"]
    flags = cli.given_flags(args)
    cfg, sampler = make_config(GenerateConfig, flags), make_config(SamplerConfig, flags)
    drawn = [f"--{f.name}" for f in dataclasses.fields(SamplerConfig) if f.name in flags]
    if cfg.beam and drawn:
        raise TinyLLMError(f"beam search draws nothing: drop {', '.join(drawn)}")
    device = devices.choose_device(cfg.device)
    devices.set_threads(cfg.threads)
    prompt = cfg.prompt
    if cfg.prompt_file:
        try:
            with open(cfg.prompt_file, encoding="utf-8-sig") as f:
                prompt = f.read()
        except UnicodeDecodeError:
            raise TinyLLMError(f"--prompt_file {cfg.prompt_file} is not UTF-8 text") from None
    out = cfg.output_file
    if out:
        if out.lower().endswith(".pt") or os.path.realpath(out) in map(os.path.realpath, paths):
            raise TinyLLMError(f"--output_file {out} would replace a checkpoint: name a .txt file")
        cli.check_writable(out, "--output_file")
    # all read, and the prompt encoded for each, before the first is sampled: a typo fails at once
    loaded = [checkpoint.load_model(path) for path in paths]
    for trained in loaded[1:]:
        sources.encode_prompt(trained.tokenizer, prompt, cfg.qa, say=lambda _: None)
    several, blocks = len(paths) > 1, []
    for path in paths:  # popped, so that one model at a time is on the device
        blocks.append(sample_checkpoint(path, loaded.pop(0), cfg, sampler, prompt, device, several))
    if out:
        with open(out, "w", encoding="utf-8", newline="") as f:  # the text exactly
            f.write("\n\n".join(blocks) + "\n")
        cli.log(f"wrote {out}")


if __name__ == "__main__":
    cli.run_cli(main)
