"""Tune a chat model on preference pairs with DPO (Rafailov et al., 2023).

    python finetune.py --init_from checkpoints/best.pt --data data/chat_example.jsonl --tag chat \
        --max_steps 300
    python dpo.py --init_from checkpoints/chat/last.pt --data data/preferences.jsonl --tag dpo \
        --max_steps 150 --lr 3e-5 --dpo_beta 0.5

A pair is a prompt, a chosen answer and a rejected answer. Each line of the data file holds one pair
as {"prompt", "chosen", "rejected"}. The policy is the model being tuned. It learns to prefer the
chosen answer of each pair over the rejected one, by more than its reference does. The reference is
a frozen copy of the policy as it started. DPO needs no reward model, and the reference keeps the
policy near what it already knew. The loss counts only the tokens of the answers. Each evaluation
reports the DPO loss, the mean margin of the held-out pairs, and the share of those pairs that the
policy prefers. When the chosen answers are in the voice of the plays, as the bundled ones are, the
run also reports the share of held-out prompts answered in that voice, before and after (see
in_character below). --lora_rank R tunes LoRA adapters instead (lora.py). Everything else works as
in train.py: the same loop (fit), the same checkpoints and the same --resume.
"""

import os
import re

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

import train
from config import ASSISTANT, EOT, NO_TARGET, TRAIN_FRACTION, SamplerConfig, require
from lora import adapted, merge
from machinery import checkpoint, cli, devices, plots, sources
from machinery.settings import read_settings
from model import lm_loss
from sampling import sample_text
from utils import answer_targets, make_corpus


def dpo(settings):
    """Trains on batches of preference pairs with train.fit; each step calls Preferring.

    If the chosen answers are in character (as the bundled ones are), it also prints the share of
    held-out answers in character, before and after training."""
    cfg = settings.cfg
    process = devices.start_process(settings)
    tokenizer = checkpoint.tokenizer_of(settings.saved, settings.path)
    texts = sources.preference_pairs(cfg.data)
    pairs = pair_split(texts, tokenizer, cfg.data)
    # the text of the run is the chosen conversations; the closing sample asks the first question
    corpus = make_corpus("".join(chosen for chosen, _ in texts), tokenizer)
    model = checkpoint.model_of(settings.saved, settings.path)
    model = adapted(cfg, model, settings.saved, settings.path, None)
    longest = max(len(x) for split in pairs.values() for pair in split for x, _ in pair)
    too_long = f"{cfg.data}: a pair's text is {longest} tokens, more than block_size"
    # each text must fit whole in the context, so the batches need no windows
    require(longest <= model.config.block_size, f"{too_long} {model.config.block_size}")
    # the reference is the starting model; a resumed run reads its path from the checkpoint
    path = settings.saved["reference"] if settings.resumed else os.path.abspath(settings.path)
    # a fresh run reuses the checkpoint it already loaded
    saved = checkpoint.load(path) if settings.resumed else settings.saved
    reference = merge(checkpoint.model_of(saved, path)).to(process.device)
    held = f"{len(pairs['train'])} pairs to train, {len(pairs['val'])} held out"
    cli.log(f"preference tuning against {path}: {held}, beta {cfg.dpo_beta:g}")
    voiced = all(in_character(a.split(ASSISTANT)[-1].removesuffix(EOT)) for a, _ in texts)
    # only pairs in the voice of the plays get the in-character measure
    held_out_texts = texts[len(pairs["train"]) :] if voiced else []
    prompts = [tokenizer.encode(a.split(ASSISTANT)[0] + ASSISTANT) for a, _ in held_out_texts]
    if prompts and not settings.resumed:  # a resumed run printed these when it began
        before = in_character_shares(reference, prompts, tokenizer)
        cli.log(" | ".join(f"{name} {share:.3g} before" for name, share in before.items()))
    preferring = Preferring(model, reference, cfg.dpo_beta)
    stage = train.Stage(
        model,
        pair_batches(pairs, train.micro_batch_size(cfg, process), process.device),
        preferring,
        loss=f"DPO's, -log sigmoid({cfg.dpo_beta:g} x margin), of each pair",
        evaluation="DPO's loss of each split; the held-out pairs' mean margin, and the share "
        "the policy prefers (held_out_acc)",
        figures=lambda: held_out(preferring, pairs["val"], process.device),
        batch="pairs, each a chosen and a rejected answer padded to the longest of the batch",
        entries={"reference": path},
    )
    summary = train.fit(settings, process, corpus, stage)
    if not prompts:
        return summary
    after = in_character_shares(model, prompts, tokenizer)
    cli.log(" | ".join(f"{name} {share:.3g} after" for name, share in after.items()))
    return summary | after


def pair_split(pairs, tokenizer, data):
    """Tokenizes preference pairs and splits them into {"train": [...], "val": [...]}.

    `pairs` is a list of (chosen text, rejected text), and `data` names the file they came from.
    Each text becomes an (x, y) whose targets are the tokens of its answer. The first 90% of the
    pairs train; the rest, at least one pair, are held out."""
    # no new tokens: the policy must keep the vocabulary of its reference
    sources.check_known(tokenizer, "".join(a + b for a, b in pairs), data)
    require(len(pairs) >= 2, f"{data}: one pair to train and one held out, at least")
    rows = []
    for texts in pairs:
        ids = [torch.tensor(tokenizer.encode(text)) for text in texts]
        targets = [answer_targets(i, tokenizer)[1:] for i in ids]
        rows.append([(i[:-1], i[1:].masked_fill(~t, NO_TARGET)) for i, t in zip(ids, targets)])
    n = min(len(rows) - 1, max(1, int(len(rows) * TRAIN_FRACTION)))
    return {"train": rows[:n], "val": rows[n:]}


def pair_batch(pairs, device):
    """Returns x and y, each (2B, T), for a list of B preference pairs [(chosen, rejected)].

    Chosen and rejected are each an (x, y). The chosen rows come first, then the rejected rows.
    Each row is padded at its end with positions that have no target."""
    rows = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    x = pad_sequence([ids for ids, _ in rows], batch_first=True)  # padded with 0
    y = pad_sequence([targets for _, targets in rows], batch_first=True, padding_value=NO_TARGET)
    return x.to(device), y.to(device)


def pair_batches(pairs, micro_batch, device):
    """Returns {split: function}; each function returns (x, y) of micro_batch random pairs of that
    split, made by pair_batch."""

    def batch(split):
        picks = torch.randint(len(pairs[split]), (micro_batch,)).tolist()
        return pair_batch([pairs[split][i] for i in picks], device)

    return {"train": lambda: batch("train"), "val": lambda: batch("val")}


def answer_logps(logits, targets):
    """Returns the log-probability of the target tokens of each row, (B,), from logits (B, T, V).

    For a row of a pair, this is the log-probability of the answer, given the prompt before it."""
    return -lm_loss(logits, targets, reduction="none").view(targets.shape).sum(dim=1)


class Preferring(train.WithPartner):
    """Wraps a policy (model) and its frozen reference (partner) for DPO.

    It takes rows of pairs (2B, T): the chosen answers first, then the rejected ones. The margin of
    a pair says how much more than the reference the policy prefers the chosen answer, in nats.
    The loss, -log sigmoid(beta * margin), pushes the margins up."""

    def __init__(self, policy, reference, beta):
        super().__init__(policy, reference)
        self.beta = beta

    def margins(self, logits, idx, targets):
        """Returns the margin of each pair (B,), from the policy's logits (2B, T, V) on rows idx."""
        with torch.no_grad():
            reference_logits, _ = self.partner(idx)
        gain = answer_logps(logits, targets) - answer_logps(reference_logits, targets)  # (2B,)
        chosen, rejected = gain.chunk(2)
        return chosen - rejected

    def forward(self, idx, targets):
        """Returns the policy's logits (2B, T, V), as a GPT does, and the DPO loss of the pairs."""
        logits, _ = self.model(idx)
        margins = self.margins(logits, idx, targets)
        return logits, -F.logsigmoid(self.beta * margins).mean()


@torch.no_grad()
def held_out(model, pairs, device):
    """Returns {margin, held_out_acc} of held-out pairs: the mean margin and the share above 0."""
    model.eval()
    idx, targets = pair_batch(pairs, device)
    margins = model.margins(model.model(idx)[0], idx, targets).float()  # (B,)
    model.train()
    return {"margin": margins.mean().item(), "held_out_acc": (margins > 0).float().mean().item()}


# ------------------------------------------------------------- the in-character measure

# a line as the plays print one: words with at most a capital first letter, separated by a space
# or by punctuation and a space, and a full stop, question mark or exclamation mark at the end
LINE = re.compile(r"[A-Z][a-z']*(?:[,;:!?.]? [A-Za-z][a-z']*)*[.!?]")
PLAY_WORDS = {"thee", "thou", "thy", "thine", "art", "hath", "doth", "lord", "lady", "sir", "aye"}
CHAT_WORDS = {"lol", "idk", "tbh", "ok", "okay", "nah", "yeah", "dude", "kinda", "whatever", "im"}


def in_character(answer):
    """Returns whether an answer is in the voice of the plays, like the chosen bundled answers.

    The rejected bundled answers are modern chat messages, so they fail. The bundled conversations
    about language models fail too, because they lack the words of the plays."""
    words = set(re.findall(r"[a-z]+", answer.lower()))
    return bool(LINE.fullmatch(answer)) and bool(words & PLAY_WORDS) and not words & CHAT_WORDS


@torch.no_grad()
def in_character_shares(model, prompts, tokenizer):
    """Returns {in_character, in_character_sampled}: the share of prompts answered in character.

    Each prompt ends in <|assistant|>. The model answers greedily, and again sampled at temperature
    0.8 with seed 0, in at most 80 tokens (the bundled answers are shorter)."""
    shares = {}
    for name, temperature in (("in_character", 0.0), ("in_character_sampled", 0.8)):
        sampler = SamplerConfig(temperature=temperature)
        drawn = [sample_text(model, ids, 80, sampler, tokenizer.eot_id, seed=0) for ids in prompts]
        shares[name] = sum(in_character(tokenizer.decode(new)) for new in drawn) / len(prompts)
    return shares


def main(argv=None):
    settings = read_settings(argv, "dpo", __doc__, train.STARTED, needs="init_from")
    if settings.options.plot_lr:  # only draw the LR schedule of this stage
        return plots.draw_lr_schedule(settings.cfg, train.get_lr)
    dpo(settings)


if __name__ == "__main__":
    cli.run_cli(main)
