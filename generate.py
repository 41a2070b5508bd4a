"""Sample text from trained checkpoints; to compare several, each gets the same prompt and seed.

python generate.py checkpoints/best.pt --prompt "ROMEO:" --seed 42
"""

import dataclasses
import os
import sys

import torch

from config import EOT, GenerateConfig, SamplerConfig, TinyLLMError, add_flags, make_config, require
from machinery import checkpoint, cli, devices, sources
from machinery.annotate import Annotator, Printer, model_odds
from sampling import Context, beam_search, token_stream, until_stop


def sample(model, prompt_ids, cfg, sampler, stop, shown):
    """Returns the new tokens (B, n) of num_samples continuations of prompt_ids, drawn as one batch.

    If `shown` (an Annotator or a Printer) is given, it shows each step as it is drawn."""
    idx = torch.tensor([prompt_ids] * cfg.num_samples, device=model.wte.weight.device)  # (B, T)
    context = Context(model, use_cache=not cfg.no_cache)
    if cfg.beam:  # find the likeliest continuation, then the odds of its tokens
        new, _ = beam_search(context, idx, cfg.max_new_tokens, cfg.beam, stop, cfg.length_penalty)
        steps = model_odds(Context(model, not cfg.no_cache), idx, new) if shown else []
    else:
        generator = torch.Generator(idx.device).manual_seed(cfg.seed)
        steps = token_stream(context, idx, cfg.max_new_tokens, sampler, stop, generator)
    drawn = []
    for token, probs in steps:
        drawn.append(token)
        if shown:
            shown.add(token, probs)
    return new if cfg.beam else torch.cat(drawn, dim=1)


def header(cfg, sampler, path, saved, prompt):
    """Returns the header of the output file: the checkpoint and every setting behind the text."""
    drawn = {} if cfg.beam else dataclasses.asdict(sampler)  # beam search samples nothing
    settings = dataclasses.asdict(cfg) | drawn | {"prompt": prompt}
    shown = " ".join(f"{k}={v!r}" for k, v in settings.items() if k != "output_file")
    return f"# checkpoint: {path} ({checkpoint.summary(saved)})\n# {shown}"


def sample_checkpoint(path, loaded, cfg, sampler, prompt, several):
    """Samples from one checkpoint and prints the text; a single sample streams as it is drawn.

    Returns the block of the output file for this checkpoint, or None when the text streamed."""
    model, tokenizer, saved = loaded
    stop = None if cfg.no_stop else tokenizer.eot_id
    prompt_ids = sources.encode_prompt(tokenizer, prompt, cfg.qa)
    # print the prompt without the stop token that starts a --qa prompt
    shown_ids = [t for t in prompt_ids if t != stop]
    stream = not several and cfg.num_samples == 1 and not cfg.output_file and not cfg.beam
    shown = Printer(tokenizer, stop) if stream else None
    annotator = None
    if cfg.show_probs or cfg.show_top:  # show every token with its odds
        shown = annotator = Annotator(tokenizer, cfg.show_top, cfg.output_file, stop, stream)
    if several:
        cli.log(f"\n{'=' * 20} {path} ({checkpoint.summary(saved)}) {'=' * 20}")
    if shown:
        shown.begin(shown_ids, cfg.num_samples)
    hint = f"out of memory on {devices.name(model.wte.weight.device)}: try fewer --num_samples"
    with devices.out_of_memory_as_error(hint):
        new = sample(model, prompt_ids, cfg, sampler, stop, shown)
    if shown:
        shown.end()
    blocks = []
    for i, row in enumerate(new.tolist()):
        cut = until_stop(row, stop)
        ended = f" (stopped at {EOT} after {len(cut)} tokens)" if cut != row else ""
        if stream:  # the text is already printed; only say how it ended
            if ended:
                print(ended.strip(), file=sys.stderr, flush=True)
            return None
        label = f"--- sample {i + 1}/{cfg.num_samples}{ended} ---"
        text = annotator.report(i) if annotator else tokenizer.decode(shown_ids + cut)
        if cfg.num_samples > 1 or ended:
            cli.log(label)
        cli.log(text)
        blocks.append(f"{label}\n{text}")
    return header(cfg, sampler, path, saved, prompt) + "\n\n" + "\n\n".join(blocks)


def main(argv=None):
    here = devices.choose_device("auto")
    parser = cli.ArgumentParser(description="Sample text from trained tinyllm checkpoints.")
    parser.add_argument(
        "checkpoints", nargs="*", metavar="PATH.pt", help="default: checkpoints/best.pt"
    )
    add_flags(parser, SamplerConfig, title="how each token is drawn")
    add_flags(parser, GenerateConfig, devices.auto_meanings(here), title="sampling")
    flags = vars(parser.parse_args(argv))
    paths = flags["checkpoints"] or ["checkpoints/best.pt"]
    cfg = make_config(GenerateConfig, flags)
    sampler = make_config(SamplerConfig, flags)
    drawn = [f"--{f.name}" for f in dataclasses.fields(SamplerConfig) if f.name in flags]
    require(not (cfg.beam and drawn), f"beam search draws nothing: drop {', '.join(drawn)}")
    device = devices.use(cfg.device, cfg.threads)
    prompt = sources.read_text(cfg.prompt_file, "--prompt_file") if cfg.prompt_file else cfg.prompt
    out = cfg.output_file
    if out:
        if out.lower().endswith(".pt") or os.path.realpath(out) in map(os.path.realpath, paths):
            raise TinyLLMError(f"--output_file {out} would replace a checkpoint: name a .txt file")
        cli.check_writable(out, "--output_file")
    # load all checkpoints and encode the prompt for each before sampling, so a typo fails at once
    loaded = [checkpoint.load_model(path) for path in paths]  # loaded on the CPU
    for trained in loaded[1:]:
        sources.encode_prompt(trained.tokenizer, prompt, cfg.qa, say=lambda _: None)
    blocks = []
    for path in paths:  # pop each model so only one at a time is on the device
        trained = loaded.pop(0)
        trained.model.to(device)
        blocks.append(sample_checkpoint(path, trained, cfg, sampler, prompt, len(paths) > 1))
    if out:
        with open(out, "w", encoding="utf-8", newline="") as f:  # write the text exactly as is
            f.write("\n\n".join(blocks) + "\n")
        cli.log(f"wrote {out}")


if __name__ == "__main__":
    cli.run_cli(main)
