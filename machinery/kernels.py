"""Speed-only variants of the PyTorch kernels the model calls: the same function, faster on some machines."""

import torch
import torch.nn.functional as F

fused_kernel = F.scaled_dot_product_attention  # by a name of ours, so a test can watch what it is given


def scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):
    """F.scaled_dot_product_attention, in float32 under bfloat16 autocast on a CPU: there bfloat16 attention
    (its backward above all) ran several times slower than float32, while the matmuls around it keep
    bfloat16's speed. A float mask is given in q's dtype, as the kernel requires."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False):
            return fused_kernel(q, k, v, attn_mask=in_dtype(attn_mask, q), is_causal=is_causal, dropout_p=dropout_p)
    return fused_kernel(q, k, v, attn_mask=in_dtype(attn_mask, q), is_causal=is_causal, dropout_p=dropout_p)


def in_dtype(mask, q):
    return mask.to(q.dtype) if mask is not None and mask.is_floating_point() else mask
