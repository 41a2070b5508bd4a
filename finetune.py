"""Fine-tune a trained GPT to answer: on conversations, in full or through LoRA adapters.

    python finetune.py --init_from checkpoints/best.pt --data data/chat_example.jsonl --tag chat \
        --max_steps 300
    python finetune.py --init_from checkpoints/best.pt --data data/chat_example.jsonl --tag lora \
        --max_steps 300 --lora_rank 8 --lr 1e-2
    python chat.py checkpoints/chat/last.pt

A conversation is text in the chat template (utils.turn):
<|user|>question\n<|assistant|>answer<|endoftext|>. The model learns from the answers alone
(utils.answer_targets, --loss_on answers): the questions are context. The template's tokens and
any character the model lacks grow its vocabulary, each new row starting from the mean of the old.
With --lora_rank R the model stays frozen and LoRA's small matrices (lora.py) learn beside it;
its checkpoints hold the adapter alone, kilobytes that name their base. Plain text fine-tunes
too. The rest is train.py's run: its loop (fit), its checkpoints, its exact --resume.
"""

import train
from lora import adapted
from machinery import cli, harness


def finetune(settings):
    """The model of --init_from (or of a resume), its vocabulary grown by the corpus's new tokens,
    adapted under --lora_rank; then train.py's fit."""
    process = harness.start_process(settings)
    corpus = train.load_corpus(settings)
    model, rows = train.saved_model(settings, corpus)
    model = adapted(settings.cfg, model, settings.saved, settings.path, rows)
    batches = train.corpus_batches(settings, corpus, model, process)
    return train.fit(settings, process, corpus, train.Stage(model, batches))


def main(argv=None):
    train.main(argv, finetune, needs="init_from")


if __name__ == "__main__":
    cli.run_cli(main)
