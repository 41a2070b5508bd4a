"""Fine-tune a trained GPT on your own text or on conversations, in full or with LoRA.

    python finetune.py --init_from checkpoints/best.pt --data mine.txt --tag mine
    python finetune.py --init_from checkpoints/best.pt --data data/chat_example.jsonl --tag chat \
        --max_steps 300
    python finetune.py --init_from checkpoints/best.pt --data data/chat_example.jsonl --tag lora \
        --max_steps 300 --lora_rank 8 --lr 1e-2
    python chat.py checkpoints/chat/last.pt

The run starts from the weights of --init_from, with a fresh optimizer. A conversation is text in
the chat template (utils.turn): <|user|>question\n<|assistant|>answer<|endoftext|>. The model
learns from the answers only (utils.answer_targets, --loss_on answers); the questions are only
context. The vocabulary grows by one token for each template token or character the model does
not know yet. Each new embedding row starts from the mean of the old rows. With --lora_rank R, the
model stays frozen and the small LoRA matrices (lora.py) learn beside it. The checkpoints then
hold only the adapter: a few kilobytes that name the base model. Everything else works as in
train.py: the same loop (fit), the same checkpoints and the same exact --resume.
"""

import torch

import train
from lora import adapted
from machinery import checkpoint, cli, devices, plots, sources
from machinery.settings import read_settings


def finetune(settings):
    """Fine-tunes the model of --init_from (or of the resumed run) with train.fit.

    Before training, the vocabulary grows by the new tokens of the corpus, and --lora_rank adds
    LoRA adapters."""
    process = devices.start_process(settings)
    corpus = grown_corpus(settings)
    model, rows = trained_model(settings, corpus)
    model = adapted(settings.cfg, model, settings.saved, settings.path, rows)
    batches = train.corpus_batches(settings, corpus, model, process)
    return train.fit(settings, process, corpus, train.Stage(model, batches))


def grown_corpus(settings):
    """Returns the text as train and val token ids, encoded by the tokenizer of the trained model.

    The tokenizer grows by one token for each character it lacks. A resumed run does not grow it:
    its vocabulary already grew when the run began."""
    tokenizer = checkpoint.tokenizer_of(settings.saved, settings.path)
    corpus = sources.read_corpus(settings.cfg, tokenizer, grow=not settings.resumed)
    if corpus.old_ids:
        new = [i for i, old in enumerate(corpus.old_ids) if old is None]
        added = corpus.tokenizer.decode(new)[:60]
        cli.log(f"added {len(new)} token(s) {added!r} to the vocabulary of {settings.path}")
    return corpus


def trained_model(settings, corpus):
    """Returns (model, rows): the model the run starts from, and where its embedding rows came from.

    If the corpus added tokens, the model gets a new embedding row for each. Then `rows` says, for
    each row, which row of the saved model it came from, or None for a new row. Otherwise `rows`
    is None."""
    model = checkpoint.model_of(settings.saved, settings.path)
    if not corpus.old_ids:
        return model, None
    return model, grow_vocabulary(model, corpus.old_ids)


def grow_vocabulary(model, old_ids):
    """Adds an embedding row for each new token and returns, for every row, its old row.

    `old_ids` gives, for each token, its row in the old model, or None for a new token. Each new
    row is the mean of the old rows plus a little noise, so that no two new rows are alike (this
    matters under LoRA)."""
    old = model.wte.weight.detach()
    old_size = sum(i is not None for i in old_ids)
    rows = old_ids + list(range(old_size, len(old)))  # old rows beyond the tokens stay
    mean = old.mean(0)
    checkpoint.with_embedding(model, rows, (mean + 0.02 * torch.randn_like(mean) for _ in rows))
    return rows


def main(argv=None):
    settings = read_settings(argv, "finetune", __doc__, train.STARTED, needs="init_from")
    if settings.options.plot_lr:  # only draw the LR schedule of this stage
        return plots.draw_lr_schedule(settings.cfg, train.get_lr)
    finetune(settings)


if __name__ == "__main__":
    cli.run_cli(main)
