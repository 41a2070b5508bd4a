"""How the weights move: the learning-rate schedule (linear warmup, then cosine decay) and
AdamW with weight decay on matrices only. --optimizer muon swaps the blocks' matrices to
Muon (a deep dive: machinery/muon.py)."""

import math

import torch

from machinery import muon, precision


def get_lr(step, lr, min_lr, warmup_steps, max_steps):
    """Linear warmup from lr/warmup_steps up to lr, cosine decay to min_lr at max_steps, then
    hold min_lr. (A run whose end moves while it trains asks at which point of this cosine its
    step lies: machinery/schedule.py.)"""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 to 1 through the cosine
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Give every parameter group this step's learning rate (times the group's lr_scale)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(model, cfg, device):
    """AdamW that decays matrices (embeddings, linear weights) but not biases or norm gains.
    With cfg.optimizer == "muon", the blocks' hidden matrices get Muon instead (machinery/muon.py).
    Each group carries lr_scale: its learning rate is the scheduled lr times lr_scale. Either
    way its step() leaves the weights as they were when a gradient is not finite."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "muon":
        return precision.finite_steps_only(muon.Muon.for_model(params, cfg))
    betas = (cfg.beta1, cfg.beta2)
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    # the fused kernel updates each tensor in one pass (measurably faster on CPU too) and can
    # skip a step on the device itself, so the loop never waits to check the gradients
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=device.type in ("cuda", "cpu", "mps"))
    # a step whose gradients are not finite changes nothing (how, without waiting for a GPU:
    # machinery/precision.py, a deep dive a first read can skip)
    return precision.finite_steps_only(optimizer)
