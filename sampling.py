"""Generation, the chapter after train.py: how a trained GPT writes text, one token at a time.

Read it top to bottom: generate (the loop: next-token logits, one token drawn, appended); the KV
cache, so that a new token costs one position's work instead of the whole context's; the context
rule (Context: what the model sees once the text outgrows block_size); the sampler (config.Sampler).
generate.py is the command line around it; beam search is a deep dive beside it (deep_dives/beam.py).

In use: idx = torch.tensor([tokenizer.encode(prompt)]); model.eval(); out = generate(model, idx,
100, config.Sampler(temperature=0.8)); tokenizer.decode(out[0].tolist()).
"""

import functools

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- the loop

def generate(model, idx, max_new_tokens, sampler, use_cache=True, stop_token=None, generator=None, on_token=None,
             replay=None):
    """Continue each row of idx (B, T) by max_new_tokens tokens, or until every row has produced
    stop_token; returns (B, T + new), a row that stopped earlier going on past its stop_token (cut
    it there). Each step: the logits of the next token (Context: the context rule and the KV
    cache), one token drawn from them by the sampler's rules (sample_next; config.Sampler's
    settings), appended.
    on_token(tokens (B, 1), logits (B, V), idx (B, T)) sees each step's tokens as they come, with the logits they
    were drawn from and the tokens before them (generate.py streams them; --show_probs shows their odds).
    The model samples as it is: call model.eval() first, or dropout stays on (a checkpoint that
    generate.py loads is in eval mode already). replay: None, or a function that makes the cache's one-token step
    faster and gives what it gives (generate.py passes deep_dives.graphs.replayable: on a GPU, a CUDA graph)."""
    context = Context(model, use_cache, replay)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    with torch.inference_mode():  # no autograd graph: each step, and the cache, is plain inference
        for _ in range(max_new_tokens):
            logits = context.next_logits(idx)  # (B, V)
            next_token = sample_next(logits, sampler, idx, generator)  # (B, 1)
            if on_token is not None:
                on_token(next_token, logits, idx)
            idx = torch.cat((idx, next_token), dim=1)  # (B, T + 1)
            if stop_token is not None:
                done |= next_token[:, 0] == stop_token
                if done.all():
                    break
    return idx.clone()  # outside inference mode: a tensor autograd may use


# ----------------------------------------------------------------------------- the KV cache and the context rule

class KVCache:
    """Keys and values of every layer for the tokens seen so far, and pos, the position of the
    next token. Buffers of block_size positions are allocated once and written in place, so a
    step writes one new column instead of copying the whole cache. Attention reads the whole
    buffers, so every step computes with the same shapes: GPT.forward's mask, causal_mask(T,
    block_size, start=pos), gives -inf to the slots after each new query's position (not filled
    yet, or stale from before the context restarted). pos is a tensor on the model's device
    rather than a Python number, so that a decoding step holds nothing that changes from token
    to token (Context.fill says why)."""

    def __init__(self, n_layer, block_size, device):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.block_size = block_size
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # decode adds each call's T to it

    def update(self, layer, k, v):
        """Store this step's k, v (B, nh, T, hs) at their positions; return the buffers (B, nh, block_size, hs)."""
        if self.k[layer] is None:  # zeros, not empty memory: a hidden slot gets weight 0, and 0 times a NaN is NaN
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.block_size, hs)
            self.v[layer] = v.new_zeros(B, nh, self.block_size, hs)
        slots = self.pos + torch.arange(k.size(2), device=k.device)  # (T,): pos, pos + 1, ...
        self.k[layer].index_copy_(2, slots, k)  # k into slots pos.. of dimension 2, the positions
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]


class Context:
    """What the model sees while it generates: the context rule and the KV cache.
    next_logits(idx) gives the logits of the token after each row of idx (B, T), each call's
    idx one token longer than the last call's (the first call's is the prompt)."""

    def __init__(self, model, use_cache=True, replay=None):
        self.model, self.use_cache, self.replay = model, use_cache, replay
        self.start, self.cache, self.step = None, None, None  # the context is idx[:, start:]

    def next_logits(self, idx):
        block_size = self.model.config.block_size
        if self.start is None:  # the prompt: its last block_size tokens at most
            self.start = max(0, idx.size(1) - block_size)
        full = idx.size(1) - self.start > block_size
        if full:
            # The context is full. Sliding it on by one token (idx[:, -block_size:]) would move
            # every token to a new position, while each cached key was computed at its old one,
            # with older tokens in view: the cache would be stale. So the context restarts from
            # its newest block_size // 2 tokens and the cache is filled again, about once every
            # block_size / 2 new tokens; with or without the cache, the text is the same.
            self.start = idx.size(1) - max(1, block_size // 2)
        if not self.use_cache:  # recompute the whole context
            logits, _ = self.model(idx[:, self.start:])
        elif self.cache is None or full:  # the whole context into the cache, from position 0
            logits = self.fill(idx[:, self.start:])
        else:  # only the newest token: the cache holds the rest
            logits = self.step(idx[:, -1:])
        return logits[:, -1, :]  # (B, V)

    def fill(self, context):
        """The logits (B, T, V) of context (B, T), its keys and values written into the cache."""
        if self.cache is None:  # the first call: the cache, and the step that goes on from it
            self.cache = KVCache(self.model.config.n_layer, self.model.config.block_size, context.device)
            # self.step: decode (below), or what replay makes of it (generate.py's: on a CUDA GPU a
            # recording of its kernels, replayed in one launch; it needs to know what decode changes
            # in place: the cache's position)
            step = functools.partial(decode, self.model, self.cache)  # decode(token), with this model and cache
            self.step = self.replay(step, context[:, -1:], keep=[self.cache.pos]) if self.replay else step
        self.cache.pos.zero_()
        return decode(self.model, self.cache, context)


def decode(model, cache, tokens):
    """The logits (B, T, V) of tokens (B, T) after the cache's: their keys and values join it (each layer's
    attention writes its own), and the cache's position moves on past them."""
    logits, _ = model(tokens, cache=cache)
    cache.pos += tokens.size(1)
    return logits


# ----------------------------------------------------------------------------- the sampler

def filter_logits(logits, sampler, idx):
    """The logits (B, V) the next token is drawn from, given the model's own for the token after idx (B, T): divided by
    the temperature (greedy: by 1), then every logit outside the candidates set to -inf: top_k > 0 keeps the k most
    likely (and any tied with the k-th, as Hugging Face and nanoGPT do); top_p < 1 keeps the smallest set whose
    probability reaches top_p; both always keep the most likely token. A rule on the model's own logits goes before the
    temperature (one on the tokens so far, a repetition penalty, reads idx); one on the candidates, after."""
    logits = logits / (sampler.temperature or 1.0)
    top_k, top_p = sampler.top_k, sampler.top_p
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly ahead of each token
        drop = before >= top_p
        drop[..., 0] = False  # the most likely token always survives (even with top_p 0)
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_token_probs(logits, sampler, idx):
    """The distribution the next token is drawn from, probs (B, V), for logits (B, V) after idx (B, T):
    filter_logits' logits, softmaxed. Temperature 0 (greedy) draws nothing: it takes the
    most likely token. Its distribution here is the one at temperature 1 after top-k / top-p, the
    model's own odds among the candidates, in which greedy's pick is the most likely token."""
    return F.softmax(filter_logits(logits.float(), sampler, idx), dim=-1)  # (B, V)


def sample_next(logits, sampler, idx, generator=None):
    """Pick one token per row (B, 1) from logits (B, V), those of the token after idx (B, T). Temperature 0: greedy."""
    if sampler.temperature == 0:  # the most likely candidate; greedy needs no softmax
        return filter_logits(logits.float(), sampler, idx).argmax(dim=-1, keepdim=True)  # (B, 1)
    probs = next_token_probs(logits, sampler, idx)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
