"""How the weights move: the learning-rate schedule (linear warmup, then cosine decay) and
AdamW with weight decay on matrices only. (--optimizer muon swaps the blocks' matrices to Muon,
a deep dive: machinery/muon.py.)"""

import math

import torch

from machinery import muon, precision


def get_lr(step, lr, min_lr, warmup_steps, max_steps, decay_from=None):
    """Linear warmup from lr/warmup_steps up to lr, cosine decay to min_lr at max_steps, then
    hold min_lr. decay_from is None unless max_steps moved while the run trained: a time budget
    (a CPU's default run has one) re-plans it as the machine's pace changes, and a resume may
    give a new --max_steps. The machinery that moves it then sets decay_from = [step0, peak,
    done]: the step where it last moved, the cosine's peak, and the share of the cosine already
    behind at step0; the rest of the cosine is stretched from there to the new max_steps, so the
    LR never jumps. A first read can take decay_from as None."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 to 1 through the cosine
    if decay_from is not None and step >= decay_from[0]:  # the end moved at step0: the rest of the way, stretched
        step0, lr, done = decay_from  # lr: the peak of the cosine that moved
        progress = done + (1 - done) * (step - step0) / (max_steps - step0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Give every parameter group this step's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(model, cfg, device):
    """AdamW that decays matrices (embeddings, linear weights) but not biases or norm gains."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "muon":  # a deep dive (machinery/muon.py)
        return precision.finite_steps_only(muon.Muon.for_model(params, cfg))
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: the whole update in one kernel per tensor (faster on CPUs too)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type in ("cuda", "cpu", "mps"))
    # the same AdamW, with a hook that makes step() skip a step whose gradients are not finite
    return precision.finite_steps_only(optimizer)
