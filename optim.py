"""How the weights move: the learning-rate schedule (linear warmup, then a decay over the run's
progress: --lr_schedule) and AdamW with weight decay on matrices only; train.py's train_step applies them.
(--optimizer muon swaps the blocks' matrices to Muon, a deep dive: deep_dives/muon.py.)"""

import math

import torch

from deep_dives import muon


def get_lr(step, progress, cfg):
    """The learning rate of a step: linear warmup from lr/warmup_steps up to lr over the first
    warmup_steps steps, then a decay from lr to min_lr as the run's progress (below) goes from 0
    (the end of the warmup) to 1 (the end of the run), then min_lr. The decay's shape is
    cfg.lr_schedule; a new shape is a new choice of it in config.py and a formula of step and
    progress here. The last step of --max_steps is one step's share short of 1, so a shape still
    steep there ends that far above min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if progress >= 1.0:  # the run's end (and any step past it): the floor, whatever the shape before it
        return cfg.min_lr
    if cfg.lr_schedule == "linear":  # a straight line down to the floor
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.get_lr has no formula for lr_schedule {cfg.lr_schedule!r}")


def progress(step, cfg):
    """How far the run is at a step, what get_lr's decay follows: 0 through the warmup, then the share of the steps
    after it taken, (step - warmup_steps) / (max_steps - warmup_steps): with warmup 10 and max_steps 50, 0.5 at step 30.
    (Under a --time_budget the share of its seconds spent takes its place: budget.Clock.progress_by_time.)"""
    if step <= cfg.warmup_steps:
        return 0.0
    return min(1.0, (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps))


def make_optimizer(model, cfg, device):
    """AdamW that decays matrices (embeddings, linear weights) but not biases or norm gains."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "muon":  # a deep dive (deep_dives/muon.py)
        return muon.Muon.for_model(params, cfg)
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: the whole update in one kernel per tensor (faster on CPUs too). Not on a Mac, whose fused
    # kernel refuses float16's skip flag (torch 2.5-2.7: docs/platforms.md)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu"))
