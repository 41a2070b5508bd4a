"""LoRA (Hu et al., 2021): fine-tune a large model by training two small matrices beside each of its
linear layers, and nothing else. A layer's weight W (out x in) is frozen; beside it, B (out x r) and
A (r x in), of a small rank r, make the update: y = x W^T + (x A^T B^T) * alpha / r. B starts at 0,
so the adapted model starts as the base. A fine-tune then trains r * (in + out) numbers a layer
instead of out * in, and saves only those: the adapter, kilobytes beside the model it adapts.

    python finetune.py --init_from checkpoints/best.pt --lora_rank 8 --tag lora \
        --data data/chat_example.jsonl
    python -m tools.merge checkpoints/lora/last.pt --out checkpoints/merged.pt  # folded in

adapted puts the adapters on the model a fine-tune trains (finetune.py, dpo.py); its
checkpoints hold the adapter and the path of its base (machinery/checkpoint.py writes them).
"""

import math
import os

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear, and the low-rank update beside it."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear draws its weights

    def forward(self, x):  # (B, T, in) -> (B, T, out)
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self):
        """The plain nn.Linear with the update folded into its weight: W + B A * alpha / r."""
        with torch.no_grad():
            self.base.weight += self.lora_b @ self.lora_a * self.scale
        return self.base


def add_adapters(model, rank, alpha, mlp=False):
    model.requires_grad_(False)
    for block in model.blocks:
        block.attn.c_attn = LoRALinear(block.attn.c_attn, rank, alpha)
        block.attn.c_proj = LoRALinear(block.attn.c_proj, rank, alpha)
        if mlp:
            block.mlp.c_fc = LoRALinear(block.mlp.c_fc, rank, alpha)
            block.mlp.c_proj = LoRALinear(block.mlp.c_proj, rank, alpha)
    return model


def adapter_state(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def merge(model):
    """model with every LoRALinear replaced by its merged nn.Linear: a plain GPT again."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model.requires_grad_(True)


def adapted(cfg, model, saved, path, rows):
    """The model a fine-tune (finetune.py, dpo.py) trains from the model saved (path). Under
    --lora_rank: frozen, with adapters beside it (a LoRA checkpoint's own, trained on). Without:
    a LoRA model merged, so that the whole model trains. rows: finetune.trained_model's.
    model.lora: what its checkpoints hold instead of its weights: the adapter's settings and its
    base's path."""
    if not cfg.lora_rank:
        return merge(model) if saved.get("lora") else model
    adapter = saved.get("lora")
    if adapter is None:
        add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_mlp)  # the model frozen
        base = os.path.abspath(path)  # its checkpoints name it, relative to themselves
        adapter = dict(base=base, rows=rows, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        adapter["mlp"] = cfg.lora_mlp
    elif rows:  # an adapter trained on with new tokens: its rows mapped onto the base's
        old = adapter["rows"] or range(len(rows))  # None: the base's rows, as they were
        adapter = adapter | {"rows": [None if i is None else old[i] for i in rows]}
    model.lora = adapter
    return model
