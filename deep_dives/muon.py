"""Muon (--optimizer muon; every preset trains with AdamW): SGD momentum with each update matrix replaced by
its nearest orthogonal matrix, so every direction of a weight moves alike, however small its gradient.
For the blocks' hidden matrices; the other weights keep AdamW, written out here."""

import torch


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
    """Muon for the hidden matrices, AdamW for everything else (embeddings, norms, biases)."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), momentum=0.95, eps=1e-8):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, eps=eps))

    @classmethod
    def for_model(cls, named_params, cfg):
        """Muon on the blocks' 2-D weights (no decay); AdamW on the other matrices (decayed) and vectors
        (not). The schedule sets every group's lr; Muon's steps at lr * lr_scale, so muon_lr is its peak."""
        hidden = [p for n, p in named_params if p.dim() == 2 and n.startswith("blocks.")]
        groups = [{"params": hidden, "use_muon": True, "lr_scale": cfg.muon_lr / cfg.lr, "weight_decay": 0.0},
                  {"params": [p for n, p in named_params if p.dim() >= 2 and not any(p is h for h in hidden)],
                   "use_muon": False, "lr_scale": 1.0, "weight_decay": cfg.weight_decay},
                  {"params": [p for _, p in named_params if p.dim() < 2], "use_muon": False, "lr_scale": 1.0,
                   "weight_decay": 0.0}]
        return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    self.muon_update(p, group)
                else:
                    self.adamw_update(p, group)

    def muon_update(self, p, group):
        buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
        buf.mul_(group["momentum"]).add_(p.grad)
        update = orthogonalize(p.grad.add(buf, alpha=group["momentum"]))  # Nesterov
        p.add_(update, alpha=-group["lr"] * group["lr_scale"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)

    def adamw_update(self, p, group):
        state = self.state[p]
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
