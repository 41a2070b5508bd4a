"""How the weights move: the learning-rate schedule (linear warmup, then a decay over the run's
progress), and AdamW with weight decay on matrices only. train.py's train_step applies them.
At the end, Muon (--optimizer muon): an alternative for the blocks' matrices."""

import math

import torch


def get_lr(step, progress, cfg):
    """The learning rate of a step: a linear warmup up to cfg.lr over warmup_steps steps, then a
    decay from lr to min_lr as the run's progress goes from 0 (the warmup's end) to 1 (its end).
    A new shape is a choice of lr_schedule in config.py and a formula here, of progress or of
    step; where it ends is up to it (the run and its tests read get_lr at progress 1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"get_lr has no formula for lr_schedule {cfg.lr_schedule!r}")


def progress(step, cfg):
    """How far a run of max_steps is at a step: 0 through the warmup, then the share of the steps
    after it taken. (Under a --time_budget, machinery/runs.py counts the share of time spent.)"""
    if step <= cfg.warmup_steps:
        return 0.0
    return min(1.0, (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps))


def param_groups(model, cfg):
    """The trained parameters in groups, each group with its own settings: weight decay on the
    matrices (embeddings, linear weights), not on biases or norm gains; under Muon, its own group
    for the blocks' matrices. A group's lr_scale multiplies the schedule's learning rate for its
    parameters (train_step). names: what a group holds, so that a resume finds it again."""
    muon = dict(lr_scale=cfg.muon_lr / cfg.lr, weight_decay=0.0, muon=True)
    decayed, not_decayed = dict(weight_decay=cfg.weight_decay), dict(weight_decay=0.0)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and p.dim() == 2 and name.startswith("blocks."):
            group = muon
        else:
            group = decayed if p.dim() >= 2 else not_decayed
        group.setdefault("names", []).append(name)
        group.setdefault("params", []).append(p)
    return [group for group in (muon, decayed, not_decayed) if "params" in group]


def make_optimizer(model, cfg, device, dtype="float32"):
    """AdamW (or Muon, for --optimizer muon) over the model's parameter groups. dtype: the run's
    precision, which Muon's orthogonalization takes (bfloat16 halves its cost where native)."""
    groups, betas = param_groups(model, cfg), (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        ns_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        return Muon(groups, lr=cfg.lr, betas=betas, dtype=ns_dtype)
    # fused: one kernel per tensor, faster on CPUs too; not on a Mac, whose fused kernel
    # mishandles float16's skipped steps in torch 2.5-2.7 (docs/platforms.md)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=device.type in ("cuda", "cpu"))


# ----------------------------------------------------------------------------- Muon


def orthogonalize(g, dtype=torch.float32, steps=5):
    """About U V^T of g = U S V^T (every singular value pushed towards 1), by a quintic
    Newton-Schulz iteration in dtype, whose coefficients trade exactness for speed."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.size(0) > g.size(1)
    x = g.T if tall else g
    x = (x / (x.norm() + 1e-7)).to(dtype)  # spectral norm <= 1, where the iteration converges
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD momentum whose update of each hidden matrix is made orthogonal, so every direction of a
    weight moves alike however small its gradient; AdamW, written out, for the other weights.
    A group with muon=True is Muon's; its lr_scale makes muon_lr its peak learning rate."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), dtype=torch.float32, momentum=0.95):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, eps=1e-8))
        self.dtype = dtype  # of the orthogonalization

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if group.get("muon"):
                    buf = state.setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    nesterov = p.grad.add(buf, alpha=group["momentum"])
                    update = orthogonalize(nesterov, self.dtype)
                    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.add_(update, alpha=-group["lr"] * scale)
                    continue
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                beta1, beta2 = group["betas"]
                state["step"] += 1
                state["m"].lerp_(p.grad, 1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = state["m"] / (1 - beta1 ** state["step"])
                v_hat = state["v"] / (1 - beta2 ** state["step"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m_hat, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])
