"""The GPT: a decoder-only Transformer. Nothing here knows about files or training.

Read it top to bottom. First GPT-2 itself: causal self-attention (the mask, the module and its
formula, the fused kernel), the MLP, the block, and the GPT with its forward pass (token ids ->
logits -> loss), which is all training uses. Then the modern parts that three switches of config.GPTConfig put in
GPT-2's place: norm "rmsnorm" (RMSNorm for LayerNorm), mlp "swiglu" (SwiGLU for the GELU MLP)
and pos "rope" or "sinusoidal" (rotary or fixed positions for the learned table). GPTConfig's
defaults are GPT-2's; the preset a CPU trains by default, tiny, turns on RoPE and SwiGLU. The KV
cache that forward takes is generation's (sampling.py, the chapter after train.py).

The layer names are OpenAI's GPT-2 names, kept so its published weights load by name
(machinery/hf_gpt2.py): wte / wpe are the token / position embeddings, c_attn / c_proj / c_fc the
attention's and MLP's linear layers, ln_1 / ln_2 / ln_f the norms.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import GPTConfig


# ----------------------------------------------------------------------------- attention

def causal_mask(T, S, device, start=None):
    """(T, S), added to the attention scores: 0 where a query may look at a key, -inf where it
    may not (the softmax turns -inf into weight 0). Query i is at position start + i and sees
    the keys at positions 0 to start + i. Training: S = T, start 0, the lower triangle.
    Generation keeps the keys of the tokens so far in S = block_size slots (the KV cache): with
    5 cached and 1 new token, start = 5 and the query sees slots 0-5, not the empty ones after."""
    start = S - T if start is None else start  # an int, or a tensor (sampling.KVCache.pos)
    query_pos = start + torch.arange(T, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    return torch.zeros(T, S, device=device).masked_fill(key_pos > query_pos, float("-inf"))  # (T, S)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: every position makes a query, a key and a value;
    each head scores its query against the keys of the positions up to its own, and takes
    the softmax-weighted mean of their values. The heads' results, side by side, are
    projected back into the residual stream."""

    def __init__(self, config, layer):
        super().__init__()
        self.n_head = config.n_head
        self.layer = layer  # this block's index: where its keys and values sit in the KV cache
        self.dropout = config.dropout
        self.fused = True  # False: attention as the formula reads (slower, the same numbers)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)  # of the weights, where the formula computes them
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, rope=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.queries_keys_values(x, rope)  # each (B, nh, T, hs)
        if cache is not None:  # generation: the keys and values of the earlier positions come from the cache
            k, v = cache.update(self.layer, k, v)  # each (B, nh, S, hs): the cache's S = block_size slots
        y = self.attention(q, k, v, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side (view needs contiguous memory)
        return self.resid_dropout(self.c_proj(y))

    def queries_keys_values(self, x, rope=None):
        """q, k, v of x (B, T, C), each (B, nh, T, hs); with RoPE (below), q and k turned by position."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # each head takes its own hs = C / nh of the C channels: (B, T, nh, hs) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def attention(self, q, k, v, mask):
        """Scaled dot-product attention, as the formula reads: softmax(q k^T / sqrt(hs) + mask) v.
        Each query scores every key; the mask's -inf sends the future's scores to weight 0; each
        row of weights sums to 1, so a query's output is a weighted mean of the values.
        q: (B, nh, T, hs); k, v: (B, nh, S, hs); mask: (T, S), None for the causal triangle.
        Returns (B, nh, T, hs). With self.fused (the default), fused_attention computes the same
        (the tests check it to float precision); a variant that changes the scores beyond an
        additive mask (a cap, say) changes attention_weights, and takes this formula when it is on;
        one that changes the keys or values both paths see (heads sharing them, say) does it here."""
        if self.fused:
            return fused_attention(q, k, v, mask, self.dropout if self.training else 0.0)
        weights = self.attn_dropout(self.attention_weights(q, k, mask))  # (B, nh, T, S)
        return weights @ v  # (B, nh, T, hs)

    def attention_weights(self, q, k, mask):
        """softmax(q k^T / sqrt(hs) + mask): (B, nh, T, S), row t saying how much query t takes from
        each key. Dividing by sqrt(hs) keeps the scores' spread independent of the head size."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S)
        if mask is None:  # training's plain causal triangle
            mask = causal_mask(q.size(-2), k.size(-2), q.device)
        return torch.softmax(scores + mask, dim=-1)


def fused_attention(q, k, v, mask, dropout=0.0):
    """CausalSelfAttention.attention, the same function, by PyTorch's fused kernel: faster, and
    without building the (T, S) weights in memory. A mask of None is the causal triangle, which
    the kernel makes itself (is_causal)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # in float32: on CPUs a bfloat16 attention (its backward above all) ran several times
        # slower than float32's, while the matmuls around it keep bfloat16's speed
        with torch.autocast("cpu", enabled=False):
            return fused_attention(q.float(), k.float(), v.float(), mask, dropout)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)  # the kernel adds a float mask in q's dtype
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout)


# ----------------------------------------------------------------------------- the MLP and the block

class MLP(nn.Module):
    """The position-wise feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C); GPT-2's GELU
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = make_norm(config)  # nn.LayerNorm; RMSNorm with norm "rmsnorm" (below)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(self, x, mask, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, rope, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# ----------------------------------------------------------------------------- the GPT

def lm_loss(logits, targets, reduction="mean"):
    """Next-token cross-entropy: every (b, t) position is one classification over the
    vocabulary, so logits (B, T, V) flatten to (B*T, V) and targets (B, T) to (B*T,).
    Computed in float32 even under autocast."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


class GPT(nn.Module):
    """Token ids in, next-token logits out: embed the tokens and their positions, pass them
    through n_layer blocks, normalise, and read the logits off with the token embedding
    itself (weight tying)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # position information: GPT-2's learned table, or fixed tables derived from the config
        # (buffers, not saved in checkpoints; below)
        if config.pos == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        elif config.pos == "rope":
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            raise ValueError(f"pos {config.pos!r} has no position code in model.py")
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix reads and writes tokens

        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream (two per block: attention
        # and MLP) by 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """The parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None):
        """logits (B, T, vocab_size) for idx (B, T), and the loss when targets (B, T) are given
        (else None): target [b, t] is the token that follows idx[b, t] in the text (utils.get_batch).
        cache: generation only (sampling.KVCache); training never passes one."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"{T} positions exceed block_size {self.config.block_size}")
        start = 0 if cache is None else cache.pos  # generation: idx continues the cache's tokens (sampling.KVCache)
        x, rope = self.embed(idx, start)  # (B, T, C)
        # the mask added to every layer's attention scores: in training None, the causal triangle the fused kernel makes
        # itself (a variant that adds to it passes causal_mask's (T, T)); generation's (sampling.py explains the cache):
        # the T queries against the keys of its block_size slots, those after each query's position hidden
        mask = None if cache is None else causal_mask(T, self.config.block_size, idx.device, start)  # (T, S)
        for block in self.blocks:
            x = block(x, mask, rope, cache)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = lm_loss(logits, targets)
        return logits, loss

    def embed(self, idx, start=0):
        """Token embeddings (B, T, C) with position information for positions start..start+T-1:
        added to them (learned, sinusoidal), or returned as RoPE's cos and sin for those
        positions, each (T, hs/2), for the attention to turn q and k by."""
        positions = start + torch.arange(idx.size(1), device=idx.device)  # (T,)
        x, rope = self.wte(idx), None
        if self.config.pos == "learned":
            x = x + self.wpe(positions)
        elif self.config.pos == "sinusoidal":
            x = x + self.pos_table[positions]
        elif self.config.pos == "rope":
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        return self.drop(x), rope


# ----------------------------------------------------------------------------- the modern parts

def make_norm(config):
    """GPT-2's LayerNorm, or RMSNorm with norm "rmsnorm"."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class RMSNorm(nn.Module):
    """LayerNorm without the mean subtraction and bias: x / rms(x) * weight."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """The MLP with a gate (mlp "swiglu"): silu(x W_gate) * (x W_value), projected back. Three
    matrices instead of two, 8/3 * n_embd wide, keep the 4x GELU MLP's parameter count."""

    def __init__(self, config):
        super().__init__()
        hidden = 8 * round((8 * config.n_embd / 3) / 8)  # 8/3 of n_embd, to a multiple of 8 (kernels like it)
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # gate and value in one matmul
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, value = self.c_fc(x).chunk(2, dim=-1)  # each (B, T, hidden)
        return self.dropout(self.c_proj(F.silu(gate) * value))  # (B, T, C)


def rope_tables(n_positions, head_size, base=10000.0):
    """RoPE's cos and sin, each (n_positions, head_size/2): position p turns pair i of a head's
    query and key by the angle p * base^(-2i/head_size), fast for the first pairs, slow for the last."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))  # (hs/2,)
    angles = torch.arange(n_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (n_positions, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Turn each pair (x[2i], x[2i+1]) of every head by its position's angle. Then q.k depends
    on the two positions only through the distance between them, so the model learns relative
    offsets and has no position embedding to learn. Computed in float32, as the cos and sin
    tables are, and returned in x's dtype (bfloat16 under a bfloat16 autocast).
    x: (..., T, hs), queries and keys; cos, sin: (T, hs/2), the rows of rope_tables for x's
    positions, broadcast over the leading dimensions. Returns x's shape."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()  # each pair's two numbers: (..., T, hs/2) each
    turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # (..., T, hs/2, 2)
    return turned.flatten(-2).type_as(x)  # (..., T, hs): each pair back in its place


def sinusoidal_table(n_positions, dim):
    """The fixed position encoding of "Attention Is All You Need": sines and cosines of
    position * 10000^(-2i/dim), added to the token embeddings as the learned table is."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # 10000^(-2i/dim)
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])  # (an odd dim has one cosine column fewer)
    return table  # (n_positions, dim)
