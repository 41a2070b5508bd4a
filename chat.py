"""Chat in the terminal with a model fine-tuned on conversations: type a message, the answer streams back.

    python train.py --init_from checkpoints/best.pt --data data/chat_example.jsonl --tag chat --max_steps 300
    python chat.py checkpoints/chat/last.pt

The conversation is kept in the chat template, <|user|>message\\n<|assistant|>answer<|endoftext|>, and each
answer sees all of it. The KV cache carries over from turn to turn: a turn computes only its new tokens.
Past block_size, the context restarts from its newest half, as in generation (sampling.Context).
"""

import machinery  # noqa: F401 (first, before torch loads: OpenMP's idle threads soon sleep)

import torch

from config import ASSISTANT, SamplerConfig, GenerateConfig, TinyLLMError, make_config
from sampling import Context, generate

from machinery import checkpoint, cli, device as devices, sources
from machinery.annotate import WholeCharacters


def answer(model, tokenizer, conversation, context, sampler, generator, max_new_tokens):
    """The model's turn after the conversation (ids), printed as it comes: (its ids, ending with <|endoftext|>,
    and whether Ctrl-C stopped it)."""
    new, pieces, stop = [], WholeCharacters(tokenizer), tokenizer.eot_id

    def show(token, logits, idx):
        new.append(token[0, 0].item())
        if new[-1] != stop and (piece := pieces.add(new[-1], 1.0)):
            print(piece[0], end="", flush=True)

    idx = torch.tensor([conversation], device=next(model.parameters()).device)
    try:
        generate(model, idx, max_new_tokens, sampler, stop_token=stop, generator=generator, on_token=show,
                 context=context)
        stopped = False
    except KeyboardInterrupt:  # the answer ends here; the chat goes on
        stopped = True
    print((pieces.flush() or ("",))[0] + (" [stopped]" if stopped else ""), flush=True)
    return new if stop in new else new + [stop], stopped  # generate stops at the stop token


def main(argv=None):
    parser = cli.ArgumentParser(description="Chat with a checkpoint fine-tuned on conversations.")
    parser.add_argument("checkpoint", nargs="?", default="checkpoints/best.pt", help="default: %(default)s")
    cli.add_config_flags(parser, SamplerConfig, title="how each token is drawn")
    cli.add_config_flags(parser, GenerateConfig, names=("seed", "max_new_tokens", "device", "threads"), title="chat")
    flags = cli.given_flags(parser.parse_args(argv))
    sampler, cfg = make_config(SamplerConfig, flags), make_config(GenerateConfig, {"max_new_tokens": 300} | flags)
    device = devices.choose_device(cfg.device)
    devices.set_threads(cfg.threads)
    model, tokenizer, _ = checkpoint.load_model(flags["checkpoint"], device)
    if ASSISTANT not in tokenizer.special_tokens:
        raise TinyLLMError("this model has not learned the chat template: fine-tune it on conversations first "
                           "(python train.py --init_from CHECKPOINT --data data/chat_example.jsonl)")
    generator = torch.Generator(device).manual_seed(cfg.seed)
    conversation, context = [tokenizer.eot_id], Context(model)
    cli.log("type a message; /reset starts over, /quit or Ctrl-D leaves, Ctrl-C stops an answer")
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            continue
        if message == "/quit":
            break
        if message == "/reset":
            conversation, context = [tokenizer.eot_id], Context(model)
            continue
        if message:
            conversation += sources.encode_prompt(tokenizer, sources.turn("user", message) + ASSISTANT)
            print("model> ", end="", flush=True)
            reply, stopped = answer(model, tokenizer, conversation, context, sampler, generator, cfg.max_new_tokens)
            conversation += reply
            context = Context(model) if stopped else context  # a stopped answer may have left the cache half-written
    print()


if __name__ == "__main__":
    cli.run_cli(main)
