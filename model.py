"""The GPT: a decoder-only Transformer, GPT-2 style by default, with switches for the modern
parts (RMSNorm, SwiGLU, RoPE). Nothing here knows about files or training.

Read it top to bottom: the parts (norms, position encodings, attention, MLP), the block, then
the GPT and its forward pass (token ids -> logits -> loss), which is all training uses. The
last part of the file, marked off, is generation: the KV cache and sampling (temperature,
top-k, top-p).

The layer names are OpenAI's GPT-2 names, kept so its published weights load by name
(hf_gpt2.py): wte / wpe are the token / position embeddings, c_attn / c_proj / c_fc the
attention's and MLP's linear layers, ln_1 / ln_2 / ln_f the norms.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import GPTConfig

from machinery import kernels


# ----------------------------------------------------------------------------- the parts

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
    """RoPE's cos and sin, each (n_positions, head_size/2): position p turns pair i of a head's
    query and key by the angle p * base^(-2i/head_size), fast for the first pairs, slow for the last."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))  # (hs/2,)
    angles = torch.arange(n_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (n_positions, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[2i], x[2i+1]) of every head by its position's angle. Because q.k then
    depends only on the distance between the two positions, the model learns relative offsets
    and has no position embedding to learn. Plain real arithmetic (no complex numbers), so it runs the same
    on every device and under torch.compile.
    x: (..., T, hs), queries and keys; cos, sin: (T, hs/2), the rows of rope_tables for x's
    positions, broadcast over the leading dimensions. Returns x's shape."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (..., T, hs/2)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # (..., T, hs/2, 2)
    return rotated.flatten(-2).type_as(x)  # (..., T, hs): each pair back in its place


def causal_mask(T, S, device, start=None):
    """(T, S), added to the attention scores: 0 where a query may look at a key, -inf where it
    may not (the softmax turns -inf into weight 0). Query t sits at position start + t and sees
    the keys at positions 0 to start + t: tril's diagonal is start. In training start is 0 and
    S == T. With generation's KV cache, T new tokens come after start cached ones, and the keys
    are the cache's S = block_size slots, those not filled yet hidden by the mask too; start
    defaults to S - T, queries that are the last T of S positions."""
    allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T if start is None else start)
    return torch.zeros(T, S, device=device).masked_fill(~allowed, float("-inf"))


def attention(q, k, v, mask, dropout=0.0):
    """Scaled dot-product attention, as the formula reads: softmax(q k^T / sqrt(hs) + mask) v.
    Each query scores every key; the mask's -inf sends the future's scores to weight 0; each
    row of weights sums to 1, so a query's output is a weighted mean of the values.
    q: (B, nh, T, hs); k, v: (B, nh, S, hs); mask: (T, S). Returns (B, nh, T, hs)."""
    weights = F.dropout(attention_weights(q, k, mask), dropout)  # (B, nh, T, S)
    return weights @ v  # (B, nh, T, hs)


def attention_weights(q, k, mask):
    """softmax(q k^T / sqrt(hs) + mask): (B, nh, T, S), row t saying how much query t takes from
    each key. Dividing by sqrt(hs) keeps the scores' spread independent of the head size."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S)
    return torch.softmax(scores + mask, dim=-1)


def fused_attention(q, k, v, mask, dropout=0.0):
    """attention(), the same function (the tests check it to float precision), by PyTorch's fused
    kernel: faster, and without building the (T, S) weights in memory. The model calls this;
    CausalSelfAttention.fused = False runs the formula above instead. With S == T (training)
    the mask is the plain causal one, which the kernel makes itself (is_causal) and need not read."""
    if q.size(-2) == k.size(-2):
        return kernels.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    return kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: every position makes a query, a key and a value;
    each head scores its query against the keys of the positions up to its own, and takes
    the softmax-weighted mean of their values. The heads' results, side by side, are
    projected back into the residual stream."""

    def __init__(self, config, layer):
        super().__init__()
        self.n_head = config.n_head
        self.layer = layer  # which cache slot generation uses
        self.dropout = config.dropout
        self.fused = True  # False: attention() as written (slower, the same numbers)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, rope=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.queries_keys_values(x, rope)  # each (B, nh, T, hs)
        if cache is not None:  # generation: the keys and values of the earlier positions come from the cache
            k, v = cache.update(self.layer, k, v)  # each (B, nh, S, hs): the cache's S = block_size slots
        attend = fused_attention if self.fused else attention
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side
        return self.resid_dropout(self.c_proj(y))

    def queries_keys_values(self, x, rope=None):
        """q, k, v of x (B, T, C), each (B, nh, T, hs); with RoPE, q and k rotated by position."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        if rope is None:
            return qkv.unbind(0)
        q, k = apply_rope(qkv[:2], *rope)  # q and k in one go: (2, B, nh, T, hs)
        return q, k, qkv[2]


class MLP(nn.Module):
    """The position-wise feed-forward network: widen, apply a nonlinearity, project back."""

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            # three matrices instead of two: 8/3 * n_embd wide keeps the parameter count of the 4x GELU MLP
            hidden = 8 * round((8 * config.n_embd / 3) / 8)  # 8/3 of n_embd, to a multiple of 8 (kernels like it)
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
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

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
    """Token ids in, next-token logits out: embed the tokens (and their positions), pass them
    through n_layer blocks, normalise, and read the logits off with the token embedding
    itself (weight tying)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # position information: a learned table, or fixed tables derived from the config (buffers
        # that are not saved in checkpoints)
        if config.pos == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        else:
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
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
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None):
        """logits (B, T, vocab_size) for idx (B, T), and the loss when targets (B, T) are given
        (else None). cache: generation only (the end of this file); training never passes one."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos  # with a cache, idx continues the cached tokens
        if start + T > self.config.block_size:
            raise ValueError(f"positions up to {start + T} exceed block_size {self.config.block_size}")
        x, rope = self.embed(idx, start)  # (B, T, C)
        S = T if cache is None else self.config.block_size  # keys: these positions, or every slot of the cache
        mask = causal_mask(T, S, idx.device, start)  # (T, S): each position sees itself and the ones before
        for block in self.blocks:
            x = block(x, mask, rope, cache)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        if cache is not None:
            cache.pos += T
        loss = None
        if targets is not None:
            loss = lm_loss(logits, targets)
        return logits, loss

    def embed(self, idx, start=0):
        """Token embeddings (B, T, C) with position information for positions start..start+T-1:
        added to them (learned, sinusoidal), or returned as RoPE's cos and sin for those
        positions, each (T, hs/2), for the attention to rotate q and k by."""
        T = idx.size(1)
        x, rope = self.wte(idx), None
        if self.config.pos == "learned":
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        elif self.config.pos == "sinusoidal":
            x = x + self.pos_table[start:start + T]
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        return self.drop(x), rope

    # ------------------------------------------------------------------------- generation
    # (read it after train.py: the KV cache, the context rule and the sampler are the end of this file)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
                 stop_token=None, generator=None, on_token=None):
        """Continue each row of idx (B, T) by max_new_tokens tokens, or until every row has produced
        stop_token; returns (B, T + new). Each step: the logits of the next token (Context: the
        context rule and the KV cache), one token drawn from them (sample_next), appended.
        on_token(tokens (B, 1)) sees each step's tokens as they come (generate.py streams them)."""
        context = Context(self, use_cache)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        with torch.inference_mode():  # no autograd graph: each step, and the cache, is plain inference
            for _ in range(max_new_tokens):
                logits = context.next_logits(idx)  # (B, V)
                next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
                idx = torch.cat((idx, next_token), dim=1)  # (B, T + 1)
                if on_token is not None:
                    on_token(next_token)
                if stop_token is not None:
                    done |= next_token[:, 0] == stop_token
                    if done.all():
                        break
        return idx.clone()  # outside inference mode: a tensor autograd may use

    def beam_search(self, idx, max_new_tokens, beam_width, use_cache=True, stop_token=None, length_penalty=0.0):
        """The most probable continuation of idx (1, T) that a beam of beam_width finds: (new
        tokens (1, n), their total log-probability). A deep dive: beam_search below."""
        return beam_search(self, idx, max_new_tokens, beam_width, use_cache, stop_token, length_penalty)


# ============================================================================= generation
# What GPT.generate calls (generate.py, and the sample at the end of train.py): the KV cache,
# which keeps each layer's keys and values so a new token costs one position's work instead of
# the whole context's; the context rule; the sampler (temperature, top-k, top-p). And, as a deep
# dive, beam search.

class KVCache:
    """Keys and values of every layer for the tokens seen so far, plus the position of the
    next token. Buffers of block_size positions are allocated once and filled in place, so a
    step writes one new column instead of copying the whole cache. Attention reads the whole
    buffers, the mask hiding the slots not filled yet, so every decoding step computes with the
    same shapes: no new kernel set-up per length, and the first thing capturing a step in a CUDA
    graph needs (the write position and the mask are still made on the host each step)."""

    def __init__(self, n_layer, block_size):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.block_size = block_size
        self.pos = 0  # advanced by GPT.forward once every layer has stored this call's tokens

    def update(self, layer, k, v):
        """Store this step's k, v (B, nh, T, hs) at their positions; return the buffers (B, nh, block_size, hs)."""
        if self.k[layer] is None:  # zeros: a hidden slot gets weight 0, and 0 times 0 stays 0
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.block_size, hs)
            self.v[layer] = v.new_zeros(B, nh, self.block_size, hs)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer], self.v[layer]

    def reorder(self, rows):
        """Row i of the cache becomes a copy of row rows[i] (beam search: each beam follows its parent)."""
        self.k = [k[rows] if k is not None else None for k in self.k]
        self.v = [v[rows] if v is not None else None for v in self.v]


class Context:
    """What the model sees while it generates: the context rule and the KV cache.
    next_logits(idx) gives the logits of the token after each row of idx (B, T), each call's
    idx one token longer than the last call's (the first call's is the prompt)."""

    def __init__(self, model, use_cache=True):
        self.model, self.use_cache = model, use_cache
        self.start, self.cache = None, None  # the context is idx[:, start:]

    def next_logits(self, idx):
        block_size = self.model.config.block_size
        if self.start is None:  # the prompt: its last block_size tokens at most
            self.start = max(0, idx.size(1) - block_size)
        if idx.size(1) - self.start > block_size:
            # The context is full. It does not slide on by one token (idx[:, -block_size:]): it
            # restarts from the newest block_size // 2 tokens, and the cache is filled again.
            # A cached key holds what its layer computed when the key's token was added, from the
            # tokens in view then; after a slide every position moves and some of those tokens
            # are gone, so a sliding cache would no longer compute what the model computes on
            # the context. Restarting costs one refill every block_size // 2 tokens, and keeps
            # generation with the cache identical to recomputing the context each step.
            self.start, self.cache = idx.size(1) - max(1, block_size // 2), None
        if not self.use_cache:  # recompute the whole context
            logits, _ = self.model(idx[:, self.start:])
        elif self.cache is None:  # fill the cache with the whole context
            self.cache = KVCache(self.model.config.n_layer, block_size)
            logits, _ = self.model(idx[:, self.start:], cache=self.cache)
        else:  # only the newest token: the cache holds the rest
            logits, _ = self.model(idx[:, -1:], cache=self.cache)
        return logits[:, -1, :]  # (B, V)

    def follow(self, rows):
        """Row i continues row rows[i] of the last call from now on (beam search)."""
        if self.cache is not None:
            self.cache.reorder(rows)


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


def next_token_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution the next token is drawn from, probs (B, V), for logits (B, V): divide by
    the temperature, keep the top-k / top-p candidates, softmax. Temperature 0 (greedy) draws
    nothing: it takes the most likely token. Its distribution here is the one at temperature 1
    after top-k / top-p, the model's own odds among the candidates, in which greedy's pick is
    the most likely token (the candidates always include it)."""
    logits = filter_logits(logits.float() / (temperature or 1.0), top_k, top_p)
    return F.softmax(logits, dim=-1)  # (B, V)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Pick one token per row from logits (B, V): (B, 1). Temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1); greedy needs no softmax
    probs = next_token_probs(logits, temperature, top_k, top_p)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


# ----------------------------------------------------------------------------- deep dive: beam search

@torch.inference_mode()
def beam_search(model, idx, max_new_tokens, beam_width, use_cache=True, stop_token=None, length_penalty=0.0):
    """The continuation of idx (1, T) with the highest score that a beam of beam_width finds:
    keep the beam_width best partial continuations, extend every one by every token, keep the
    best beam_width of those, repeat. A continuation's score is its total log-probability (the
    sum over its tokens), divided by its length ** length_penalty (0: the plain sum). One that
    ends in stop_token is finished and leaves the beam. Returns (new tokens (1, n), total log-probability)."""
    context, prompt = Context(model, use_cache), idx.size(1)
    beams = idx  # (k, T + t): the live continuations, one row each (k = 1 before the first step)
    totals = torch.zeros(1, dtype=torch.float64, device=idx.device)  # (k,) their total log-probabilities
    finished = []  # (total log-probability, new tokens) of the continuations that stopped
    for _ in range(max_new_tokens):
        logp = F.log_softmax(context.next_logits(beams).double(), dim=-1)  # (k, V)
        V = logp.size(-1)
        # every beam extended by every token, best first; a beam adds at most one stopped
        # candidate, so the best 2 * beam_width hold beam_width live ones
        best, flat = (totals[:, None] + logp).flatten().topk(min(2 * beam_width, logp.numel()))
        rows, tokens = flat // V, flat % V  # which beam each candidate extends, by which token
        stops = tokens == stop_token if stop_token is not None else torch.zeros_like(tokens, dtype=torch.bool)
        finished += [(t, torch.cat((beams[r, prompt:], tok[None]))) for t, r, tok in
                     zip(best[stops].tolist(), rows[stops], tokens[stops])]
        keep = (~stops).nonzero()[:beam_width, 0]
        if len(keep) == 0:
            break
        context.follow(rows[keep])  # each new beam's cache is its parent's
        beams = torch.cat((beams[rows[keep]], tokens[keep, None]), dim=1)
        totals = best[keep]
        if length_penalty == 0 and finished and max(f[0] for f in finished) >= totals[0]:
            break  # the plain sum only falls as a continuation grows: no live beam can win any more
    candidates = finished + [(t, b[prompt:]) for t, b in zip(totals.tolist(), beams)]
    total, new = max(candidates, key=lambda c: c[0] / max(1, len(c[1])) ** length_penalty)
    return new[None], total
