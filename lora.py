"""LoRA (Hu et al., 2021): fine-tune a model by training only two small matrices per linear layer.

The weight W (out x in) of each linear layer stays frozen. Beside it, two matrices of a small rank
r, B (out x r) and A (r x in), make the update: y = x W^T + (x A^T B^T) * alpha / r. B starts at 0,
so the adapted model starts out equal to the base model. A fine-tune then trains r * (in + out)
numbers per layer instead of out * in. It saves only those numbers, the adapter, which takes a few
kilobytes. The adapter file names the model it adapts.

    python finetune.py --init_from checkpoints/best.pt --lora_rank 8 --tag lora \
        --data data/chat_example.jsonl
    python -m tools.merge checkpoints/lora/last.pt --out checkpoints/merged.pt  # merge it in

`adapted` puts the adapters on the model that a fine-tune trains (finetune.py, dpo.py). The
checkpoints of that run hold the adapter and the path of the base model (machinery/checkpoint.py
writes them).
"""

import math
import os

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update beside it."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # the same init as nn.Linear

    def forward(self, x):  # (B, T, in) -> (B, T, out)
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self):
        """Returns the base nn.Linear with the update folded in: W + B A * alpha / r."""
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
    """Replaces each LoRALinear by its merged nn.Linear and returns the model, a plain GPT again."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model.requires_grad_(True)


def adapted(cfg, model, saved, path, rows):
    """Returns the model that a fine-tune (finetune.py, dpo.py) trains.

    `model` was loaded from the checkpoint `saved`, read from `path`. With --lora_rank, the model
    is frozen and gets LoRA adapters; a LoRA checkpoint keeps training its own adapters. Then
    model.lora holds what the checkpoints save instead of the weights: the adapter settings and
    the path of the base model. Without --lora_rank, a LoRA model is merged, so that the whole
    model trains. `rows` comes from finetune.trained_model."""
    if not cfg.lora_rank:
        return merge(model) if saved.get("lora") else model
    adapter = saved.get("lora")
    if adapter is None:
        add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_mlp)  # freezes the model
        base = os.path.abspath(path)  # checkpoints store it relative to themselves
        adapter = dict(base=base, rows=rows, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        adapter["mlp"] = cfg.lora_mlp
    elif rows:  # new tokens for a saved adapter: map its rows to base rows
        old = adapter["rows"] or range(len(rows))  # None: the rows of the base, unchanged
        adapter = adapter | {"rows": [None if i is None else old[i] for i in rows]}
    model.lora = adapter
    return model
