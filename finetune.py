"""Fine-tune a trained GPT: on your own text, or to answer conversations; in full or through LoRA.

    python finetune.py --init_from checkpoints/best.pt --data mine.txt --tag mine
    python finetune.py --init_from checkpoints/best.pt --data data/chat_example.jsonl --tag chat \
        --max_steps 300
    python finetune.py --init_from checkpoints/best.pt --data data/chat_example.jsonl --tag lora \
        --max_steps 300 --lora_rank 8 --lr 1e-2
    python chat.py checkpoints/chat/last.pt

The run starts from the weights of --init_from, with a fresh optimizer. A conversation is text in
the chat template (utils.turn): <|user|>question\n<|assistant|>answer<|endoftext|>. The model
learns from the answers alone (utils.answer_targets, --loss_on answers): the questions are
context. The template's tokens and any character the model lacks grow its vocabulary, each new
row starting from the mean of the old. With --lora_rank R the model stays frozen and LoRA's small
matrices (lora.py) learn beside it; its checkpoints hold the adapter alone, kilobytes that name
their base. The rest is train.py's run: its loop (fit), its checkpoints, its exact --resume.
"""

import torch

import train
from lora import adapted
from machinery import checkpoint, cli, devices, plots, sources
from machinery.settings import read_settings


def finetune(settings):
    """The model of --init_from (or of a resume), its vocabulary grown by the corpus's new tokens,
    adapted under --lora_rank; then train.py's fit."""
    process = devices.start_process(settings)
    corpus = grown_corpus(settings)
    model, rows = trained_model(settings, corpus)
    model = adapted(settings.cfg, model, settings.saved, settings.path, rows)
    batches = train.corpus_batches(settings, corpus, model, process)
    return train.fit(settings, process, corpus, train.Stage(model, batches))


def grown_corpus(settings):
    """The text as train and val token ids, by the trained model's tokenizer, grown by a token for
    each character it lacks (a resume's vocabulary is fixed: it grew when the run began)."""
    tokenizer = checkpoint.tokenizer_of(settings.saved, settings.path)
    corpus = sources.read_corpus(settings.cfg, tokenizer, grow=not settings.resumed)
    if corpus.old_ids:
        new = [i for i, old in enumerate(corpus.old_ids) if old is None]
        added = corpus.tokenizer.decode(new)[:60]
        cli.log(f"added {len(new)} token(s) {added!r} to the vocabulary of {settings.path}")
    return corpus


def trained_model(settings, corpus):
    """(the model the run starts from, rows). If the corpus added tokens, the model gets an
    embedding row for each, and rows says where each row came from: its row in the saved model,
    or None for a new one. Else rows is None."""
    model = checkpoint.model_of(settings.saved, settings.path)
    if not corpus.old_ids:
        return model, None
    return model, grow_vocabulary(model, corpus.old_ids)


def grow_vocabulary(model, old_ids):
    """New tokens' embedding rows, each the old rows' mean plus a little noise (under LoRA, no two
    new rows alike). old_ids: per token, its old row or None. Returns every row's old row."""
    old = model.wte.weight.detach()
    old_size = sum(i is not None for i in old_ids)
    rows = old_ids + list(range(old_size, len(old)))  # the old model's rows past its tokens stay
    mean = old.mean(0)
    checkpoint.with_embedding(model, rows, (mean + 0.02 * torch.randn_like(mean) for _ in rows))
    return rows


def main(argv=None):
    settings = read_settings(argv, "finetune", __doc__, train.STARTED, needs="init_from")
    if settings.options.plot_lr:  # this stage's schedule, drawn
        return plots.draw_lr_schedule(settings.cfg, train.get_lr)
    finetune(settings)


if __name__ == "__main__":
    cli.run_cli(main)
