"""The GPT: a decoder-only Transformer. Nothing in this file knows about files or training.

Read it from top to bottom. It starts with causal self-attention (the mask, the formula, the fused
kernel), then the MLP, the block, and the forward pass of the GPT (token ids -> logits -> loss).
Last come the modern parts that three settings can use in place of GPT-2's parts: RMSNorm (norm),
SwiGLU (mlp), and RoPE or sinusoids (pos).

The layer names are the same as in GPT-2, so the published GPT-2 weights load by name. wte and wpe
are the token and position embeddings, c_attn, c_proj and c_fc are the linear layers, and ln_1,
ln_2 and ln_f are the norms.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import NO_TARGET, GPTConfig

# ----------------------------------------------------------------------------- attention


def causal_mask(T, S, device, start=None):
    """Returns the (T, S) mask that attention adds to its scores.

    The mask is 0 where query i (at position start + i) may see key j, and -inf where key j comes
    later. In training, S = T and the visible part is the lower triangle. In generation, the KV
    cache keeps block_size slots of keys. With 5 cached tokens and 1 new one, start is 5 and the
    new query sees slots 0-5."""
    start = S - T if start is None else start
    query_pos = start + torch.arange(T, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    return torch.zeros(T, S, device=device).masked_fill(key_pos > query_pos, float("-inf"))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    Every position makes a query, a key and a value. Each head takes a softmax-weighted mean of the
    values at the positions up to its own. The outputs of the heads are put side by side and
    projected back. To add a variant of attention, add a field to config.GPTConfig and a branch
    here."""

    def __init__(self, config, layer):
        super().__init__()
        self.n_head = config.n_head
        self.layer = layer  # the index of this block's keys and values in the KV cache
        self.kept = None  # set to a list to keep the weights of each call (tools/pictures.py)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, rope=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.heads(x, rope)  # each (B, nh, T, hs)
        if cache is not None:  # in generation, the keys and values of earlier positions are cached
            k, v = cache.update(self.layer, k, v)  # each (B, nh, S, hs)
        y = self.attention(q, k, v, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side
        return self.resid_dropout(self.c_proj(y))

    def heads(self, x, rope=None):
        """Returns the queries, keys and values of x (B, T, C). Each head gets C / nh channels."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # (B, T, nh, hs) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:  # RoPE rotates q and k by their positions (see apply_rope)
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        return q, k, v

    def attention(self, q, k, v, mask):
        """Returns softmax(q k^T / sqrt(hs) + mask) v, of shape (B, nh, T, hs).

        For each query, the weights over the keys sum to 1, and the weights of future keys are 0.
        q is (B, nh, T, hs), k and v are (B, nh, S, hs), and mask is (T, S), or None for the causal
        triangle. The fused kernel gives the same numbers faster; the formula runs when the weights
        are kept (tools/pictures.py), since the kernel never builds them."""
        if self.kept is None:
            return fused_attention(q, k, v, mask, self.attn_dropout.p if self.training else 0.0)
        weights = self.attention_weights(q, k, mask)  # (B, nh, T, S)
        self.kept.append(weights)
        return self.attn_dropout(weights) @ v  # (B, nh, T, hs)

    def attention_weights(self, q, k, mask):
        """Returns softmax(q k^T / sqrt(hs) + mask), of shape (B, nh, T, S). Dividing by sqrt(hs)
        keeps the spread of the scores independent of the head size."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S)
        if mask is None:
            mask = causal_mask(q.size(-2), k.size(-2), q.device)
        return torch.softmax(scores + mask, dim=-1)


def fused_attention(q, k, v, mask, dropout=0.0):
    """Computes attention with PyTorch's fused kernel, which never builds the (T, S) weights. A
    mask of None means the causal triangle, which the kernel builds itself."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # on CPUs, attention in bfloat16 ran several times slower than in float32
        with torch.autocast("cpu", enabled=False):
            return fused_attention(q.float(), k.float(), v.float(), mask, dropout)
    if mask is not None:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=mask is None)


# ------------------------------------------------------------------------- the MLP and the block


class MLP(nn.Module):
    """The feed-forward layer, applied at each position: widen 4x, apply GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's GELU


class Block(nn.Module):
    """A pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(self, x, mask, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, rope, cache)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- the GPT


def lm_loss(logits, targets, reduction="mean"):
    """Returns the next-token cross-entropy, computed in float32 even under autocast.

    Each (b, t) is one classification over the vocabulary, so logits (B, T, V) flatten to (B*T, V)
    and targets (B, T) flatten to (B*T,). A target of NO_TARGET does not count, because the
    questions of a conversation are only context. If a batch has no targets at all (windows inside
    long questions), the mean loss is 0 with no gradient; a plain mean of nothing would be NaN."""
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=NO_TARGET, reduction=reduction
    )
    if reduction != "mean":
        return loss
    return torch.where((targets != NO_TARGET).any(), loss, torch.zeros_like(loss))


class GPT(nn.Module):
    """The GPT: token ids in, next-token logits out.

    It embeds the tokens and their positions, runs n_layer blocks and a final norm, and reads the
    logits off with the token embedding matrix itself (weight tying)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos == "sinusoidal":  # a fixed table, kept as a buffer that checkpoints skip
            table = sinusoidal_table(config.block_size, config.n_embd)
            self.register_buffer("pos_table", table, persistent=False)
        elif config.pos == "rope":  # tables of angles; attention rotates q and k by them
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix embeds and predicts tokens

        self.apply(self._init_weights)
        # as in GPT-2, the two projections per block that write into the residual stream start
        # smaller, so that the variance of the stream does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx, start=0):
        """Embeds the tokens of idx (B, T) at positions start, start + 1, ... and returns (x, rope).

        x is (B, T, C). A learned table or sinusoids add the positions to x. With RoPE, rope holds
        the angles of the positions instead; otherwise rope is None."""
        positions = start + torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos == "learned":
            x = x + self.wpe(positions)
        elif self.config.pos == "sinusoidal":
            x = x + self.pos_table[positions]
        elif self.config.pos == "rope":  # attention rotates q and k by these angles
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        return self.drop(x), rope

    def mask(self, T, start, cache):
        """Returns the mask that attention adds to its scores, (T, S), or None.

        In training, it returns None, which means the causal triangle; the fused kernel builds
        that itself. In generation, the T new queries sit at positions start onward, and the keys
        fill the block_size slots of the cache (slot j holds position j). The mask hides every slot
        after the position of a query. Past block_size, sampling.Context restarts at position 0."""
        if cache is None:
            return None
        return causal_mask(T, self.config.block_size, self.wte.weight.device, start)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied embedding is counted once

    def forward(self, idx, targets=None, cache=None):
        """Returns (logits, loss) for idx (B, T). logits is (B, T, vocab_size).

        loss is None unless targets (B, T) are given; targets[b, t] is the token after idx[b, t].
        cache is the KV cache that generation passes (sampling.KVCache)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"{T} positions exceed block_size {self.config.block_size}")
        start = 0 if cache is None else cache.pos  # in generation, idx continues the cached tokens
        x, rope = self.embed(idx, start)  # (B, T, C)
        mask = self.mask(T, start, cache)  # (T, S) or None
        for block in self.blocks:
            x = block(x, mask, rope, cache)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        return logits, None if targets is None else lm_loss(logits, targets)


# ----------------------------------------------------------------------------- the modern parts


def make_norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class RMSNorm(nn.Module):
    """LayerNorm without subtracting the mean and without a bias: x / rms(x) * weight."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """The MLP with a gate: silu(x W_gate) * (x W_value), projected back. Its three matrices,
    8/3 * n_embd wide, hold about as many parameters as the two 4x matrices of the GELU MLP."""

    def __init__(self, config):
        super().__init__()
        hidden = 8 * round(8 * config.n_embd / 3 / 8)  # a multiple of 8, which kernels like
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # gate and value
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, value = self.c_fc(x).chunk(2, dim=-1)  # each (B, T, hidden)
        return self.dropout(self.c_proj(F.silu(gate) * value))  # (B, T, C)


def rope_tables(n_positions, head_size, base=10000.0):
    """Returns the cos and sin tables of RoPE, each (n_positions, hs/2).

    At position p, pair i of a query or key in a head is rotated by the angle p * base^(-2i/hs).
    The first pairs turn fast, the last pairs slowly."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.arange(n_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotates each pair (x[2i], x[2i+1]) by the angle of its position, computed in float32.

    After the rotation, q.k depends on two positions only through their distance. x is
    (..., T, hs); cos and sin are (T, hs/2)."""
    even = x[..., 0::2].float()  # (..., T, hs/2)
    odd = x[..., 1::2].float()  # (..., T, hs/2)
    turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # (.., hs/2, 2)
    return turned.flatten(-2).type_as(x)  # (..., T, hs)


def sinusoidal_table(n_positions, dim):
    """Returns the position table of "Attention Is All You Need": the sines and cosines of
    position * 10000^(-2i/dim)."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    pairs = torch.arange(0, dim, 2, dtype=torch.float32)  # 2i, (dim/2,)
    inv_freq = torch.exp(pairs * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])  # an odd dim has one cosine fewer
    return table  # (n_positions, dim)
