"""The GPT: a decoder-only Transformer, GPT-2 style by default, with switches for
the modern parts (RMSNorm, SwiGLU, RoPE) and a KV cache for fast generation.
Nothing here knows about files or training."""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import GPTConfig


class RMSNorm(nn.Module):
    """LayerNorm without the mean subtraction and bias: x / rms(x) * weight."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def sinusoidal_table(n_positions, dim):
    """The fixed position encoding of "Attention Is All You Need"."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table  # (n_positions, dim)


def rope_tables(n_positions, head_size, base=10000.0):
    """cos and sin of RoPE's angles, each (n_positions, head_size/2): position p turns pair i
    by the angle p * base^(-2i/head_size), fast for the first pairs and slow for the last."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.arange(n_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[2i], x[2i+1]) of every head by its position's angle. Because q.k
    then depends only on the distance between the two positions, RoPE needs no position
    table and the model learns relative offsets. Plain real arithmetic (no complex numbers),
    so it runs the same on every device and under torch.compile.
    x: (B, T, ..., hs); cos, sin: (T, 1, ..., hs/2), broadcast over the middle dims."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, T, ..., hs/2)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # (B, T, ..., hs/2, 2)
    return rotated.flatten(-2).type_as(x)


def attend(q, k, v, mask, causal, dropout):
    """softmax(q k^T / sqrt(hs)) v, masked, by PyTorch's fused kernel. On a CPU under bfloat16
    autocast it runs in float32: there bfloat16 attention (its backward above all) is several
    times slower than float32's, while the matmuls around it keep bfloat16's speed."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return attend(q.float(), k.float(), v.float(), mask, causal, dropout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, plus the position of
    the next token. Buffers of block_size positions are allocated once and filled in
    place, so a step writes one new column instead of copying the whole cache."""

    def __init__(self, n_layer, block_size):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.block_size = block_size
        self.pos = 0

    def update(self, layer, k, v):
        """Store this step's k, v (B, nh, T, hs); return all keys and values so far."""
        if self.k[layer] is None:
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_empty(B, nh, self.block_size, hs)
            self.v[layer] = v.new_empty(B, nh, self.block_size, hs)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.n_head = config.n_head
        self.layer = layer
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        if rope is None:
            q, k, v = qkv.transpose(1, 3).unbind(dim=2)  # each (B, nh, T, hs)
        else:  # rotate q and k together, v stays as it is
            q, k = apply_rope(qkv[:, :, :2], *rope).transpose(1, 3).unbind(dim=2)  # each (B, nh, T, hs)
            v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:  # attend to the keys and values of earlier tokens as well
            k, v = cache.update(self.layer, k, v)
        S = k.size(2)  # keys in view, S >= T
        if S == T:
            mask, causal = None, True
        elif T == 1:  # one new token sees every key: no mask at all
            mask, causal = None, False
        else:  # new queries see every cached key and the new keys up to themselves
            mask, causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T), False
        y = attend(q, k, v, mask, causal, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            # three matrices instead of two: 8/3 * n_embd wide keeps the parameter count of the 4x GELU MLP
            hidden = 8 * round(8 * config.n_embd / 3 / 8)
            self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # gate and value in one matmul
        else:
            hidden = 4 * config.n_embd
            self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden) or (B, T, 2*hidden)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        else:  # derived from the config, so not saved in checkpoints
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix reads and writes tokens

        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth
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
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def resize_vocab(self, old_ids):
        """Give the model a new vocabulary: token i of the new one takes the embedding row
        old_ids[i], or, where old_ids[i] is None (a token the model has never seen), the
        mean of the old rows, a neutral start. The tied output head follows, since it is the
        same matrix; every other weight is kept."""
        old = self.wte.weight
        known = [i for i in old_ids if i is not None]
        rows = [old[i] if i is not None else old[known].mean(dim=0) for i in old_ids]
        self.wte = nn.Embedding(len(old_ids), self.config.n_embd, device=old.device, dtype=old.dtype)
        self.wte.weight.copy_(torch.stack(rows))
        self.lm_head = nn.Linear(self.config.n_embd, len(old_ids), bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = self.wte.weight
        self.config = dataclasses.replace(self.config, vocab_size=len(old_ids))

    def flops_per_token(self):
        """Forward + backward FLOPs per token at full context (the PaLM appendix estimate)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"positions up to {start + T} exceed block_size {self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos == "rope":  # cos and sin of this window's positions, each (T, 1, 1, hs/2)
            rope = (self.rope_cos[start:start + T, None, None], self.rope_sin[start:start + T, None, None])
        elif self.config.pos == "learned":
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            x = x + self.pos_table[start:start + T]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if cache is not None:
            cache.pos += T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def context_start(self, n_tokens, start):
        """First token of the context used to predict token n_tokens, given the current
        start. While the context fits in block_size it grows; when it would overflow, it
        jumps forward to keep the last block_size // 2 tokens. With a KV cache that costs one
        re-prefill every block_size // 2 tokens, and the cached run computes exactly what a
        full recompute on the same context computes. (A sliding window would not: a cached
        key in layer 2 was computed while tokens now out of the window were still in view.)"""
        if n_tokens - start > self.config.block_size:
            return n_tokens - max(1, self.config.block_size // 2)
        return start

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                        use_cache=True, stop_token=None, generator=None):
        """Yield the next token of each row, shape (B, 1), one step at a time.
        Stops early once every row has produced stop_token."""
        start = max(0, idx.size(1) - self.config.block_size)
        cache = None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            new_start = self.context_start(idx.size(1), start)
            if not use_cache:
                logits, _ = self(idx[:, new_start:])
            elif cache is None or new_start != start:
                cache = KVCache(self.config.n_layer, self.config.block_size)  # (re)prefill the whole context
                logits, _ = self(idx[:, new_start:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            start = new_start
            next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token
            if stop_token is not None:
                done |= next_token[:, 0] == stop_token
                if done.all():
                    return

    def generate(self, idx, max_new_tokens, **kwargs):
        """Continue each row of idx (B, T); returns (B, T + new tokens)."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + new, dim=1)


def filter_logits(logits, top_k=0, top_p=1.0):
    """Set to -inf every logit outside the candidates: top_k > 0 keeps the k most likely
    (and any tied with the k-th, as Hugging Face and nanoGPT do); top_p < 1 keeps the
    smallest set whose probability reaches top_p."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly ahead of each token
        sorted_logits[before >= top_p] = float("-inf")  # the most likely token always survives
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Pick one token per row from logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
