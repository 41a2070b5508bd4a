"""How the weights move: the learning-rate schedule (linear warmup, then cosine decay),
AdamW with weight decay on matrices only, Muon as an option, and a step that is skipped
when the gradients are not finite."""

import math

import torch


def get_lr(step, lr, min_lr, warmup_steps, max_steps, decay_from=None):
    """Linear warmup from lr/warmup_steps up to lr, cosine decay to min_lr at max_steps, then
    hold min_lr. decay_from=(s0, lr0) re-plans the decay of a run whose max_steps changed on
    resume at step s0: from the LR lr0 it had reached there, a cosine down to min_lr at the
    new max_steps, so the LR never jumps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    start, peak = warmup_steps, lr
    if decay_from is not None and step >= decay_from[0]:
        start, peak = decay_from
    progress = (step - start) / max(1, max_steps - start)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, cfg, device):
    """AdamW that decays matrices (embeddings, linear weights) but not biases or norm gains.
    With cfg.optimizer == "muon", the blocks' hidden matrices get Muon instead (see below).
    Each group carries lr_scale: its learning rate is the scheduled lr times lr_scale."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        groups = [
            {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
            {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
        ]
        # the fused kernel updates each tensor in one pass (measurably faster on CPU too) and can
        # skip a step on the device itself, so the loop never waits to check the gradients
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=device.type in ("cuda", "cpu", "mps"))
    hidden = [p for n, p in params if p.dim() == 2 and n.startswith("blocks.")]
    groups = [
        {"params": hidden, "use_muon": True, "lr_scale": cfg.muon_lr / cfg.lr, "weight_decay": 0.0},
        {"params": [p for n, p in params if p.dim() >= 2 and not any(p is h for h in hidden)],
         "use_muon": False, "lr_scale": 1.0, "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "use_muon": False, "lr_scale": 1.0, "weight_decay": 0.0},
    ]
    return Muon(groups, lr=cfg.lr, betas=betas)


def step_if_finite(optimizer, finite):
    """optimizer.step(), unless finite (a bool tensor) is False: then the weights and the
    optimizer's state stay exactly as they were. Fused AdamW takes the skip flag on the
    device (found_inf, the protocol torch's gradient scaler uses), so nothing waits for a
    GPU; other optimizers read the flag on the host."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif finite.item():
        optimizer.step()


def orthogonalize(g, steps=5):
    """Approximate U V^T of g = U S V^T (all singular values pushed towards 1) with a
    quintic Newton-Schulz iteration; its coefficients trade exactness for speed."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.size(0) > g.size(1)
    x = g.T if tall else g
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1, where the iteration converges
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for the hidden matrices, AdamW for everything else (embeddings, norms, biases).
    Muon takes SGD momentum and replaces the update by its nearest orthogonal matrix, so
    every direction of the weight moves by the same amount, however small its gradient."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), momentum=0.95, eps=1e-8):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["use_muon"]:
                    buf = state.setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = orthogonalize(p.grad.add(buf, alpha=group["momentum"]))  # Nesterov
                    p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)
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
