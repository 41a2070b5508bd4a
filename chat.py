"""Chat with a model fine-tuned on conversations: type a message, and the answer streams back.

    python chat.py checkpoints/chat/last.pt    # "Teach it to answer" in README.md trains it

Each answer sees the whole conversation. The KV cache carries over from turn to turn, so a turn
computes only its new tokens. When the conversation grows past block_size, the context restarts
from its newest half.
"""

import torch

from config import ASSISTANT, GenerateConfig, SamplerConfig, add_flags, make_config, require
from machinery import checkpoint, cli, devices, sources
from machinery.annotate import Printer
from sampling import Context, token_stream
from utils import question

ANSWER_TOKENS = 300  # answers are shorter than the text of generate.py


def answer(context, tokenizer, conversation, sampler, generator, max_new_tokens):
    """Generates the model's turn and prints it as it comes.

    Returns (ids, stopped): the ids of the answer, ending in EOT, and whether Ctrl-C stopped it."""
    new = []
    stop = tokenizer.eot_id
    printer = Printer(tokenizer, stop)
    idx = torch.tensor([conversation], device=context.model.wte.weight.device)
    stopped = False
    try:
        for token, probs in token_stream(context, idx, max_new_tokens, sampler, stop, generator):
            new.append(token[0, 0].item())
            printer.add(token, probs)
    except KeyboardInterrupt:  # Ctrl-C ends this answer, not the chat
        stopped = True
    printer.end(" [stopped]" if stopped else "")
    return new if stop in new else new + [stop], stopped  # the answer always ends in the stop token


def main(argv=None):
    parser = cli.ArgumentParser(description="Chat with a checkpoint fine-tuned on conversations.")
    parser.add_argument(
        "checkpoint", nargs="?", default="checkpoints/best.pt", help="default: %(default)s"
    )
    add_flags(parser, SamplerConfig, title="how each token is drawn")
    names = ("seed", "max_new_tokens", "device", "threads")
    answers = {"max_new_tokens": (ANSWER_TOKENS, "an answer's at most")}
    add_flags(parser, GenerateConfig, answers, names=names, title="chat")
    flags = vars(parser.parse_args(argv))
    sampler = make_config(SamplerConfig, flags)
    cfg = make_config(GenerateConfig, {"max_new_tokens": ANSWER_TOKENS} | flags)
    device = devices.use(cfg.device, cfg.threads)
    model, tokenizer, _ = checkpoint.load_model(flags["checkpoint"], device)
    fine_tune = "finetune.py --init_from CHECKPOINT --data data/chat_example.jsonl"
    untaught = f"this model has not learned the chat template: fine-tune it first ({fine_tune})"
    require(ASSISTANT in tokenizer.special_tokens, untaught)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    conversation = [tokenizer.eot_id]
    context = Context(model)
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
            conversation = [tokenizer.eot_id]
            context = Context(model)
            continue
        if message:
            conversation += sources.encode_prompt(tokenizer, question(message))
            print("model> ", end="", flush=True)
            reply, stopped = answer(
                context, tokenizer, conversation, sampler, generator, cfg.max_new_tokens
            )
            conversation += reply
            # a stopped answer may leave the cache half-written
            context = Context(model) if stopped else context
    print()


if __name__ == "__main__":
    cli.run_cli(main)
