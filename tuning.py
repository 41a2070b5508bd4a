"""Training against a second model that stays frozen, the course's last chapter. Each is a module
that train.py's step calls as it calls a GPT: model(x, y) -> (out, loss), and plugs into the run
as a Variant (machinery/runs.py): what the step trains, its batches, its checkpoint, its figures.

Distillation (Hinton et al., 2015): a student learns a teacher's next-token distribution, softened
by a temperature, beside the usual targets.

    python train.py --preset tiny --distill_from checkpoints/big/best.pt --tag student

Preference tuning (DPO: Rafailov et al., 2023): a policy learns to prefer each pair's chosen answer
to its rejected one by more than a frozen copy of itself, its reference, does.

    python train.py --init_from checkpoints/chat/best.pt --data data/preferences.jsonl --tag dpo
"""

import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ASSISTANT, NO_TARGET, TRAIN_FRACTION, SamplerConfig, TinyLLMError
from lora import merge
from machinery import checkpoint
from machinery.cli import log
from machinery.runs import Variant
from model import lm_loss
from sampling import generate, until_stop
from tokenizer import lacking
from utils import answer_targets

# ----------------------------------------------------------------------------- distillation


def distill_loss(logits, teacher_logits, targets, temperature, alpha):
    """alpha times the KL divergence of the student's next-token distribution from the teacher's,
    both logits divided by the temperature T, times T^2 (softening scales the gradients by 1/T^2);
    plus 1 - alpha times the usual loss. logits (B, T, V); the positions with a target count."""
    keep = targets.flatten() != NO_TARGET  # (B*T,)
    student = F.log_softmax(logits.flatten(0, 1)[keep].float() / temperature, dim=-1)  # (N, V)
    teacher = F.log_softmax(teacher_logits.flatten(0, 1)[keep].float() / temperature, dim=-1)
    soft = F.kl_div(student, teacher, log_target=True, reduction="batchmean")  # per position
    return alpha * soft * temperature**2 + (1 - alpha) * lm_loss(logits, targets)


class Distilled(nn.Module):
    """A student and its frozen teacher: the student's logits and, training, distill_loss; in eval
    mode the student's own loss, comparable with any run's."""

    def __init__(self, student, teacher, temperature, alpha):
        super().__init__()
        self.student, self.teacher = student, teacher.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def train(self, mode=True):  # the teacher stays in eval mode: no dropout
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def gpt(self):  # the model trained (machinery/runs.py gpt_of)
        return self.student

    def forward(self, idx, targets=None):
        logits, loss = self.student(idx, targets)
        if targets is None or not self.training:
            return logits, loss
        with torch.no_grad():  # the teacher's distribution, no graph
            teacher_logits, _ = self.teacher(idx)
        return logits, distill_loss(logits, teacher_logits, targets, self.temperature, self.alpha)


def distilling(cfg, model, tokenizer):
    """A run of --distill_from: the student learns beside a teacher of its tokenizer."""
    teacher = checkpoint.load_model(cfg.distill_from)
    big_enough = teacher.model.config.block_size >= model.config.block_size
    ours = (tokenizer.to_dict(), model.config.vocab_size)
    if (teacher.tokenizer.to_dict(), teacher.model.config.vocab_size) != ours or not big_enough:
        raise TinyLLMError(
            f"--distill_from {cfg.distill_from} has another tokenizer, vocabulary or a smaller "
            f"block_size: train the student on its teacher's --data and --tokenizer"
        )
    softened = f"temperature {cfg.distill_temperature:g}, alpha {cfg.distill_alpha:g}"
    log(f"distilling {cfg.distill_from} into this model: {softened}")
    return Variant(Distilled(model, teacher.model, cfg.distill_temperature, cfg.distill_alpha))


# ----------------------------------------------------------------------------- preference pairs


def pair_split(pairs, tokenizer):
    """Preference pairs [(chosen text, rejected text)] tokenized, each text an (x, y) whose
    targets are its answer's tokens; {"train": the first 90%, "val": the rest, one at least}."""
    rows = []
    for texts in pairs:
        ids = [torch.tensor(tokenizer.encode(text)) for text in texts]
        targets = [answer_targets(i, tokenizer)[1:] for i in ids]
        rows.append([(i[:-1], i[1:].masked_fill(~t, NO_TARGET)) for i, t in zip(ids, targets)])
    n = min(len(rows) - 1, max(1, int(len(rows) * TRAIN_FRACTION)))
    return {"train": rows[:n], "val": rows[n:]}


def pair_batch(pairs, device):
    """x, y (2B, T) of preference pairs [(chosen, rejected)], each an (x, y): the chosen rows, then
    the rejected, each padded at its end with no target."""
    rows = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    T = max(len(x) for x, _ in rows)
    x, y = torch.zeros(len(rows), T, dtype=torch.long), torch.full((len(rows), T), NO_TARGET)
    for r, (ids, targets) in enumerate(rows):
        x[r, : len(ids)], y[r, : len(ids)] = ids, targets
    return x.to(device), y.to(device)


def pair_batches(pairs, micro_batch, device):
    """{split: () -> (x, y)}: micro_batch random pairs of the split (pair_batch)."""

    def batch(split):
        picks = torch.randint(len(pairs[split]), (micro_batch,)).tolist()
        return pair_batch([pairs[split][i] for i in picks], device)

    return {"train": lambda: batch("train"), "val": lambda: batch("val")}


def answer_logps(logits, targets):
    """Each row's log-probability of its target tokens, (B,) of logits (B, T, V): an answer's,
    given the prompt before it."""
    return -lm_loss(logits, targets, reduction="none").view(targets.shape).sum(dim=1)


class Preferring(nn.Module):
    """A policy and its frozen reference, on rows of pairs (2B, T): the chosen answers, then the
    rejected ones. margin: by how much more than the reference the policy prefers a pair's chosen
    answer, in nats; the loss, -log sigmoid(beta * margin), grows the margins."""

    def __init__(self, policy, reference, beta):
        super().__init__()
        self.policy, self.reference = policy, reference.requires_grad_(False)
        self.beta = beta

    def train(self, mode=True):
        super().train(mode)
        self.reference.eval()
        return self

    @property
    def gpt(self):  # the model trained (machinery/runs.py gpt_of)
        return self.policy

    def margins(self, idx, targets):
        """(B,): each pair's margin."""
        logits, _ = self.policy(idx)  # (2B, T, V)
        with torch.no_grad():
            reference_logits, _ = self.reference(idx)
        gain = answer_logps(logits, targets) - answer_logps(reference_logits, targets)  # (2B,)
        chosen, rejected = gain.chunk(2)
        return chosen - rejected

    def forward(self, idx, targets):
        margins = self.margins(idx, targets)
        return margins, -F.logsigmoid(self.beta * margins).mean()


@torch.no_grad()
def held_out(model, pairs, device):
    """{margin, held_out_acc} of held-out pairs: the mean margin, the share above 0."""
    model.eval()
    margins = model(*pair_batch(pairs, device))[0].float()  # (B,)
    model.train()
    margin, share = torch.stack([margins.mean(), (margins > 0).float().mean()]).tolist()
    return {"margin": margin, "held_out_acc": share}


# a line as the plays print one: words (a capital first letter at most), each followed by a space
# or by punctuation and a space, the last by a full stop, a question or an exclamation mark
LINE = re.compile(r"[A-Z][a-z']*(?:[,;:!?.]? [A-Za-z][a-z']*)*[.!?]")
PLAY_WORDS = {"thee", "thou", "thy", "thine", "art", "hath", "doth", "lord", "lady", "sir", "aye"}
CHAT_WORDS = {"lol", "idk", "tbh", "ok", "okay", "nah", "yeah", "dude", "kinda", "whatever", "im"}


def in_character(answer):
    """Whether an answer is in the voice of the plays, as the bundled pairs' chosen answers are: a
    LINE with a word of PLAY_WORDS and none of CHAT_WORDS. Their rejected answers, chat messages
    of today, are none of these; the bundled conversations about language models are no LINE of
    the plays either, for want of their words."""
    words = set(re.findall(r"[a-z]+", answer.lower()))
    return bool(LINE.fullmatch(answer)) and bool(words & PLAY_WORDS) and not words & CHAT_WORDS


@torch.no_grad()
def registers(model, prompts, tokenizer, device):
    """{in_character, in_character_sampled}: the share of prompts (each ending in <|assistant|>)
    the model answers in character, greedily and sampled at temperature 0.8 with seed 0, in 80
    tokens at most (the bundled answers are shorter)."""
    shares, stop = {}, tokenizer.eot_id
    for name, temperature in (("in_character", 0.0), ("in_character_sampled", 0.8)):
        sampler, answered = SamplerConfig(temperature=temperature), 0
        for ids in prompts:
            generator = torch.Generator(device).manual_seed(0)
            idx = torch.tensor([ids], device=device)
            out = generate(model.eval(), idx, 80, sampler, stop, generator)[0, len(ids) :]
            answered += in_character(tokenizer.decode(until_stop(out.tolist(), stop)))
        shares[name] = answered / len(prompts)
    model.train()
    return shares


def preferring(settings, model, tokenizer, texts):
    """A run on preference pairs texts [(chosen, rejected)] (sources.preference_pairs): the policy
    against its reference, the model it starts from, frozen (a resume's checkpoint names it);
    batches of pairs; held-out figures."""
    cfg = settings.cfg
    chars, special = lacking(tokenizer, "".join(a + b for a, b in texts))
    if chars or special:
        missing = "".join(chars + special)[:40]
        raise TinyLLMError(f"{cfg.data} has tokens the model lacks: {missing!r}")
    if len(texts) < 2:
        raise TinyLLMError(f"{cfg.data}: one pair to train and one held out, at least")
    pairs = pair_split(texts, tokenizer)
    longest = max(len(x) for split in pairs.values() for pair in split for x, _ in pair)
    if longest > model.config.block_size:  # each text fits in the context: no window is needed
        too_long = f"a pair's text is {longest} tokens, more than block_size"
        raise TinyLLMError(f"{cfg.data}: {too_long} {model.config.block_size}")
    path = settings.saved["reference"] if settings.resumed else os.path.abspath(settings.path)
    saved = checkpoint.load(path) if settings.resumed else settings.saved  # loaded once
    reference = merge(checkpoint.model_of(saved, path))
    held = f"{len(pairs['train'])} pairs to train, {len(pairs['val'])} held out"
    log(f"preference tuning against {path}: {held}, beta {cfg.dpo_beta:g}")
    # the held-out prompts, to answer: in character before (the reference), on each line after
    questions = [a[: a.index(ASSISTANT) + len(ASSISTANT)] for a, _ in texts[len(pairs["train"]) :]]
    prompts = [tokenizer.encode(question) for question in questions]
    if not settings.resumed:  # the reference's answers: the run's first lines said them
        before = registers(reference, prompts, tokenizer, "cpu")
        log(" | ".join(f"{name} {share:.3g} before" for name, share in before.items()))

    def figures(stepped, device):  # the held-out pairs, then the policy's answers
        margins = held_out(stepped, pairs["val"], device)
        return margins | registers(model, prompts, tokenizer, device)

    return Variant(
        Preferring(model, reference, cfg.dpo_beta),
        batches=lambda micro_batch, device: pair_batches(pairs, micro_batch, device),
        saved=lambda: {"reference": path},
        figures=figures,
    )
