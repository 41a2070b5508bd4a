"""Sample text from a trained checkpoint.

    python generate.py --seed 42
    python generate.py --prompt "ROMEO:" --temperature 0.8 --top_k 40 --num_samples 3
    python generate.py --checkpoint checkpoints/ckpt_0000500.pt checkpoints/best.pt   # compare checkpoints

The same seed on the same machine gives the same text.
"""

import argparse
import math
import sys

import torch

from config import TinyLLMError
from tokenizer import EOT, start_ids, tokenizer_from_dict
from utils import choose_device, load_checkpoint, log, model_from_checkpoint, qa_prompt, run_cli


def check_sampling_args(args):
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise TinyLLMError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_k < 0:
        raise TinyLLMError(f"--top_k must be 0 (off) or positive, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise TinyLLMError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        raise TinyLLMError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise TinyLLMError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")


def read_prompt(args):
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TinyLLMError(f"cannot read --prompt_file {args.prompt_file}: {e.strerror or e}") from None
    return args.prompt


def encode_prompt(tokenizer, prompt, qa=False):
    """Token ids for the prompt. Characters the vocabulary lacks are dropped with a
    warning; an empty prompt starts from a newline (or token 0). With qa, the prompt is
    a question, framed as the Q&A training documents were."""
    if qa:
        if tokenizer.eot_id is None:
            raise TinyLLMError("--qa needs a model trained on Q&A data (its vocabulary has no <|endoftext|>)")
        prompt = EOT + qa_prompt(prompt)
    if hasattr(tokenizer, "unknown_chars"):
        missing = tokenizer.unknown_chars(prompt)
        if missing:
            kept = "".join(ch for ch in prompt if ch not in set(missing))
            if prompt and not kept:
                raise TinyLLMError(f"no character of the prompt is in the model's vocabulary (missing: {''.join(missing)!r})")
            print(f"warning: dropped characters the vocabulary lacks: {''.join(missing)!r}", file=sys.stderr, flush=True)
            prompt = kept
    if not prompt:
        return start_ids(tokenizer)
    return tokenizer.encode(prompt)


def sample(model, tokenizer, prompt_ids, args, device, stream=False):
    """num_samples continuations of the prompt, sampled together as one batch. Each stops
    at the end-of-text token, when the tokenizer has one (unless --no_stop)."""
    stop = None if args.no_stop else tokenizer.eot_id
    generator = torch.Generator(device).manual_seed(args.seed)
    idx = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)  # (B, T)
    steps = model.generate_stream(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, use_cache=not args.no_cache, stop_token=stop, generator=generator)
    shown = [t for t in prompt_ids if t != stop]
    new, printed = [], ""
    if stream:
        sys.stdout.write(tokenizer.decode(shown))
    for token in steps:  # (B, 1)
        new.append(token)
        if stream and token[0, 0] != stop:
            text = tokenizer.decode([t for t in torch.cat(new, dim=1)[0].tolist() if t != stop])
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
    if stream:
        sys.stdout.write("\n")
    rows = torch.cat(new, dim=1).tolist()
    return [tokenizer.decode(shown + (row[:row.index(stop)] if stop in row else row)) for row in rows]


def describe(checkpoint):
    val = checkpoint.get("best_val_loss")
    return f"step {checkpoint.get('step', '?')}" + (f", best val {val:.4f}" if isinstance(val, float) else "")


def header(args, path, checkpoint):
    params = (f"seed={args.seed} temperature={args.temperature} top_k={args.top_k} top_p={args.top_p} "
              f"max_new_tokens={args.max_new_tokens} num_samples={args.num_samples}")
    return f"# checkpoint: {path} ({describe(checkpoint)})\n# {params}\n# prompt: {args.prompt!r}"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Sample text from trained tinyllm checkpoints.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", default=["checkpoints/best.pt"], metavar="PATH.pt",
                        help="one or more checkpoints; several are sampled with the same prompt and seed")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start from a newline)")
    parser.add_argument("--prompt_file", default=None, help="read the prompt from this file instead")
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top_k", type=int, default=0, help="keep only the k most likely tokens; 0 = off")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--num_samples", type=int, default=1, help="samples drawn together as one batch")
    parser.add_argument("--output_file", default=None, help="also write the samples here, under a header")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole context every token (slow)")
    parser.add_argument("--qa", action="store_true", help="the prompt is a question: answer it as in Q&A training")
    parser.add_argument("--no_stop", action="store_true", help="keep going past the end-of-text token")
    args = parser.parse_args(argv)
    check_sampling_args(args)
    device = choose_device(args.device)
    prompt = read_prompt(args)

    blocks = []
    for path in args.checkpoint:
        checkpoint = load_checkpoint(path, device)
        model = model_from_checkpoint(checkpoint, path).to(device).eval()
        tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
        prompt_ids = encode_prompt(tokenizer, prompt, args.qa)
        stream = len(args.checkpoint) == 1 and args.num_samples == 1 and not args.output_file
        head = header(args, path, checkpoint)
        if len(args.checkpoint) > 1:
            log(f"\n{'=' * 20} {path} ({describe(checkpoint)}) {'=' * 20}")
        texts = sample(model, tokenizer, prompt_ids, args, device, stream=stream)
        if not stream:
            for i, text in enumerate(texts):
                if args.num_samples > 1:
                    log(f"--- sample {i + 1}/{args.num_samples} ---")
                log(text)
        blocks.append(head + "\n\n" + "\n\n".join(f"--- sample {i + 1} ---\n{t}" for i, t in enumerate(texts)))
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as f:
            f.write("\n\n".join(blocks) + "\n")
        log(f"wrote {args.output_file}")


if __name__ == "__main__":
    run_cli(main)
