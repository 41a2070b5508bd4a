"""Distill a trained teacher GPT into a new, smaller GPT (Hinton et al., 2015).

    python train.py --preset small --max_steps 2000 --tag big       # the teacher
    python distill.py --preset tiny --distill_from checkpoints/big/best.pt --tag student

The student learns the next-token distribution of the teacher, softened by a temperature, as well
as the usual targets. The softened odds tell the student which wrong tokens are nearly right; a
target alone cannot tell it that. The teacher stays frozen, in eval mode. The student starts from
fresh weights and trains on the text and tokenizer of the teacher. Everything else works as in
train.py: the same loop (fit), the same checkpoints and the same resume.
"""

import torch
import torch.nn.functional as F

import train
from config import NO_TARGET, require
from machinery import checkpoint, cli, devices, plots
from machinery.settings import read_settings
from model import lm_loss


def distill_loss(logits, teacher_logits, targets, temperature, alpha):
    """Returns alpha * soft loss + (1 - alpha) * the usual loss.

    The soft loss is the KL divergence of the student's next-token distribution from the teacher's,
    with both logits divided by the temperature T. It is multiplied by T^2 because softening scales
    the gradients by 1/T^2. `logits` is (B, T, V). Only positions with a target count."""
    keep = targets.flatten() != NO_TARGET  # (B*T,)
    student = F.log_softmax(logits.flatten(0, 1)[keep].float() / temperature, dim=-1)  # (N, V)
    teacher = F.log_softmax(teacher_logits.flatten(0, 1)[keep].float() / temperature, dim=-1)
    # the KL divergence, its mean per position; no targets give 0, as in lm_loss
    soft = F.kl_div(student, teacher, log_target=True, reduction="sum") / max(1, len(student))
    return alpha * soft * temperature**2 + (1 - alpha) * lm_loss(logits, targets)


class Distilled(train.WithPartner):
    """Wraps a student (model) and its frozen teacher (partner) so that a step calls it like a GPT.

    model(x, y) returns (logits, loss). In training, the loss is distill_loss. In eval mode, it is
    the student's own loss, which compares with the loss of any other run."""

    def __init__(self, student, teacher, temperature, alpha):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, idx, targets=None):
        logits, loss = self.model(idx, targets)
        if targets is None or not self.training:
            return logits, loss
        with torch.no_grad():  # the teacher gives only targets: build no graph
            teacher_logits, _ = self.partner(idx)
        return logits, distill_loss(logits, teacher_logits, targets, self.temperature, self.alpha)


def distill(settings):
    """Trains a fresh student on the text of the teacher with train.fit; steps call Distilled."""
    cfg = settings.cfg
    process = devices.start_process(settings)
    corpus = train.load_corpus(settings)
    model = train.make_model(settings, corpus)  # a fresh student, or the resumed one
    teacher = checkpoint.load_model(cfg.distill_from)
    # the student needs the teacher's tokenizer, vocabulary, and at most the teacher's block_size
    big_enough = teacher.model.config.block_size >= model.config.block_size
    ours = (corpus.tokenizer.to_dict(), model.config.vocab_size)
    alike = (teacher.tokenizer.to_dict(), teacher.model.config.vocab_size) == ours
    unlike = f"--distill_from {cfg.distill_from} has another tokenizer, vocabulary or a smaller"
    fix = "block_size: train the student on its teacher's --data and --tokenizer"
    require(alike and big_enough, f"{unlike} {fix}")
    softened = f"temperature {cfg.distill_temperature:g}, alpha {cfg.distill_alpha:g}"
    cli.log(f"distilling {cfg.distill_from} into this model: {softened}")
    stage = train.Stage(
        model,
        train.corpus_batches(settings, corpus, model, process),
        Distilled(model, teacher.model, cfg.distill_temperature, cfg.distill_alpha),
        loss=f"distillation's: {softened}",
        evaluation="the student's own cross-entropy, comparable with any run's",
    )
    return train.fit(settings, process, corpus, stage)


def main(argv=None):
    settings = read_settings(argv, "distill", __doc__, train.STARTED, needs="distill_from")
    if settings.options.plot_lr:  # only draw the LR schedule of this stage
        return plots.draw_lr_schedule(settings.cfg, train.get_lr)
    distill(settings)


if __name__ == "__main__":
    cli.run_cli(main)
