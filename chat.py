"""Chat with a model fine-tuned on conversations: type a message, the answer streams back.

    python chat.py checkpoints/chat/last.pt    # README.md's "Teach it to answer" trains it

Each answer sees the whole conversation. The KV cache carries over from turn to turn: a turn
computes only its new tokens. Past block_size, the context restarts from its newest half.
"""

from machinery import checkpoint, cli, devices, sources
from machinery.annotate import WholeCharacters

import torch

from config import ASSISTANT, GenerateConfig, SamplerConfig, TinyLLMError, make_config
from sampling import Context, generate


def answer(model, tokenizer, conversation, context, sampler, generator, max_new_tokens):
    """The model's turn, printed as it comes: (its ids, EOT last; whether Ctrl-C stopped it)."""
    new, stop = [], tokenizer.eot_id
    pieces = WholeCharacters(tokenizer, stop)

    def show(token, logits, idx):
        new.append(token[0, 0].item())
        pieces.stream(new[-1])

    idx = torch.tensor([conversation], device=next(model.parameters()).device)
    stopped = False
    try:
        generate(
            model,
            idx,
            max_new_tokens,
            sampler,
            stop_token=stop,
            generator=generator,
            on_token=show,
            context=context,
        )
    except KeyboardInterrupt:  # the answer ends here; the chat goes on
        stopped = True
    pieces.end_stream(" [stopped]" if stopped else "")
    return new if stop in new else new + [stop], stopped  # generate stops at the stop token


def main(argv=None):
    parser = cli.ArgumentParser(description="Chat with a checkpoint fine-tuned on conversations.")
    parser.add_argument(
        "checkpoint", nargs="?", default="checkpoints/best.pt", help="default: %(default)s"
    )
    cli.add_config_flags(parser, SamplerConfig, title="how each token is drawn")
    names = ("seed", "max_new_tokens", "device", "threads")
    cli.add_config_flags(parser, GenerateConfig, names=names, title="chat")
    flags = cli.given_flags(parser.parse_args(argv))
    sampler = make_config(SamplerConfig, flags)
    cfg = make_config(GenerateConfig, {"max_new_tokens": 300} | flags)
    device = devices.choose_device(cfg.device)
    devices.set_threads(cfg.threads)
    trained = checkpoint.load_model(flags["checkpoint"], device)
    model, tokenizer = trained.model, trained.tokenizer
    if ASSISTANT not in tokenizer.special_tokens:
        raise TinyLLMError(
            "this model has not learned the chat template: fine-tune it first "
            "(train.py --init_from CHECKPOINT --data data/chat_example.jsonl)"
        )
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
            conversation += sources.encode_prompt(tokenizer, sources.question(message))
            print("model> ", end="", flush=True)
            reply, stopped = answer(
                model, tokenizer, conversation, context, sampler, generator, cfg.max_new_tokens
            )
            conversation += reply
            context = Context(model) if stopped else context  # the cache may be half-written
    print()


if __name__ == "__main__":
    cli.run_cli(main)
