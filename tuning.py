"""Training against a second model that stays frozen, the course's last chapter. Each is a module
that train.py's step calls as it calls a GPT: model(x, y) -> (out, loss).

Distillation (Hinton et al., 2015): a student learns a teacher's next-token distribution, softened
by a temperature, beside the usual targets.

    python train.py --preset tiny --distill_from checkpoints/big/best.pt --tag student

Preference tuning (DPO: Rafailov et al., 2023): a policy learns to prefer each pair's chosen answer
to its rejected one by more than a frozen copy of itself, its reference, does.

    python train.py --init_from checkpoints/chat/best.pt --data data/preferences.jsonl --tag dpo
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import lm_loss
from utils import pair_batch

# ----------------------------------------------------------------------------- distillation


def distill_loss(logits, teacher_logits, targets, temperature, alpha):
    """alpha times the KL divergence of the student's next-token distribution from the teacher's,
    both logits divided by the temperature T, times T^2 (softening scales the gradients by 1/T^2);
    plus 1 - alpha times the usual loss. logits (B, T, V); the positions with a target count."""
    keep = targets.flatten() != -100  # (B*T,)
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

    def forward(self, idx, targets=None):
        logits, loss = self.student(idx, targets)
        if targets is None or not self.training:
            return logits, loss
        with torch.no_grad():  # the teacher's distribution, no graph
            teacher_logits, _ = self.teacher(idx)
        return logits, distill_loss(logits, teacher_logits, targets, self.temperature, self.alpha)


# ----------------------------------------------------------------------------- preference pairs


def answer_logps(logits, targets):
    """Each row's log-probability of its target tokens, (B,) of logits (B, T, V): an answer's,
    given the prompt before it (-100: no target)."""
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
