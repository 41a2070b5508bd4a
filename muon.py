"""Muon (--optimizer muon): an alternative to AdamW for the matrices of the blocks.

Muon makes its update of each hidden matrix orthogonal, so every direction of a weight moves
alike, however small its gradient. make_optimizer in train.py builds it over the same parameter
groups as AdamW."""

import torch


def orthogonalize(g, dtype=torch.float32, steps=5):
    """Returns roughly U V^T for g = U S V^T, which pushes every singular value towards 1.

    It runs a quintic Newton-Schulz iteration in `dtype`. Its coefficients trade exactness for
    speed."""
    a = 3.4445
    b = -4.7750
    c = 2.0315
    tall = g.size(0) > g.size(1)
    x = g.T if tall else g
    # scale to spectral norm <= 1, where the iteration converges
    x = (x / (x.norm() + 1e-7)).to(dtype)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with momentum whose update of each hidden matrix is made orthogonal; AdamW for the rest.

    An orthogonal update moves every direction of a weight alike, however small its gradient. The
    AdamW part is written out here. A parameter group with muon=True uses Muon, and its lr_scale
    makes muon_lr its peak learning rate."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), dtype=torch.float32, momentum=0.95):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, eps=1e-8))
        self.dtype = dtype  # the dtype in which orthogonalize runs

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if group.get("muon"):
                    buf = state.setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    nesterov = p.grad.add(buf, alpha=group["momentum"])
                    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.add_(orthogonalize(nesterov, self.dtype), alpha=-group["lr"] * scale)
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
