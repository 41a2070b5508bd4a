"""Generation, the chapter after train.py: how a trained GPT writes text, one token at a time.

Read it top to bottom: generate (the loop: next-token logits, one token drawn, appended); the KV
cache, so that a new token costs one position's work instead of the whole context's; the context
rule (what the model sees once the text outgrows block_size); the sampler; beam search.

In use: idx = torch.tensor([tokenizer.encode(prompt)]); model.eval();
out = generate(model, idx, 100, config.SamplerConfig()); tokenizer.decode(out[0].tolist())
or, a token at a time: for token, probs in token_stream(Context(model), idx, 100, sampler): ...
"""

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- the loop


def generate(model, idx, max_new_tokens, sampler, stop_token=None, generator=None):
    """Continue each row of idx (B, T) by max_new_tokens tokens, or until every row has made
    stop_token (a row that stopped earlier goes on past it: cut it there). Returns (B, T + new).
    Call model.eval() first, or dropout stays on."""
    steps = token_stream(Context(model), idx, max_new_tokens, sampler, stop_token, generator)
    return torch.cat([idx, *(token for token, _ in steps)], dim=1)


@torch.inference_mode()  # no autograd graph
def token_stream(context, idx, max_new_tokens, sampler, stop_token=None, generator=None):
    """generate's loop, a token at a time: each step's new tokens (B, 1) and the distribution
    (B, V) they were drawn from, so that a caller can show them as they come. context: the model
    as it generates (below), a chat's holding the conversation so far."""
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = context.next_logits(idx)  # (B, V)
        probs = next_token_probs(logits, sampler, idx)  # (B, V)
        token = sample_next(probs, sampler, generator)  # (B, 1)
        yield token.clone(), probs  # outside inference mode: tensors autograd may use
        idx = torch.cat((idx, token), dim=1)  # (B, T + 1)
        if stop_token is not None:
            done |= token[:, 0] == stop_token
            if done.all():
                break


def until_stop(ids, stop_token):
    """A row of generate's tokens, cut at its first stop_token (the rows of a batch run on)."""
    return ids[: ids.index(stop_token)] if stop_token in ids else ids


def sample_text(model, ids, max_new_tokens, sampler, stop_token=None, seed=0):
    """One seeded sample's new token ids after ids, cut at stop_token: the same seed, the same
    text. The model samples in eval mode, then goes back to the mode it was in."""
    idx = torch.tensor([ids], device=model.wte.weight.device)  # (1, T)
    generator = torch.Generator(idx.device).manual_seed(seed)
    training = model.training
    out = generate(model.eval(), idx, max_new_tokens, sampler, stop_token, generator)
    model.train(training)
    return until_stop(out[0, len(ids) :].tolist(), stop_token)


# ----------------------------------------------------------------------------- the KV cache


class KVCache:
    """Every layer's keys and values of the tokens so far, in buffers of block_size positions
    allocated once and written in place; pos: where the next token goes. Attention reads the whole
    buffers, and the mask (model.causal_mask) hides the slots after each query's position."""

    def __init__(self, n_layer, block_size):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.block_size = block_size
        self.pos = 0

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) at pos..pos+T-1; return the buffers (B, nh, block_size, hs)."""
        if self.k[layer] is None:  # zeros: a hidden slot's weight is 0, and 0 * NaN is NaN
            shape = (k.size(0), k.size(1), self.block_size, k.size(3))
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        self.k[layer][:, :, self.pos : self.pos + k.size(2)] = k
        self.v[layer][:, :, self.pos : self.pos + v.size(2)] = v
        return self.k[layer], self.v[layer]


class Context:
    """What the model sees while it generates. next_logits(idx) gives the logits of the token after
    each row of idx (B, T); each call's idx continues the last call's (by one token, or more)."""

    def __init__(self, model, use_cache=True):
        self.model = model
        self.use_cache = use_cache
        self.start = None  # the context is idx[:, start:]
        self.cache = None

    def next_logits(self, idx):
        block_size = self.model.config.block_size
        if self.start is None:  # the prompt: its last block_size tokens at most
            self.start = max(0, idx.size(1) - block_size)
        full = idx.size(1) - self.start > block_size
        if full:
            # Sliding on by one token would move every token to a new position, while each cached
            # key was computed at its old one: so the context restarts from its newest
            # block_size // 2 tokens and the cache is filled again, every block_size / 2 tokens.
            self.start = idx.size(1) - max(1, block_size // 2)
        if not self.use_cache:  # recompute the whole context
            return self.model(idx[:, self.start :])[0][:, -1, :]
        if self.cache is None or full:  # the whole context into an empty cache
            self.cache = KVCache(self.model.config.n_layer, block_size)
        new = idx[:, self.start + self.cache.pos :]  # (B, T): the tokens the cache lacks
        logits, _ = self.model(new, cache=self.cache)
        self.cache.pos += new.size(1)
        return logits[:, -1, :]  # (B, V)


# ----------------------------------------------------------------------------- the sampler


def filter_logits(logits, sampler, idx):
    """The logits (B, V) a token is drawn from after the text so far, idx (B, T): divided by the
    temperature (greedy: by 1), then every logit outside the candidates set to -inf. top_k keeps
    the k likeliest (and any tied with the k-th); top_p the fewest whose probabilities reach it.
    No rule here reads idx; one that does (a penalty on repeats, say) has it at hand. A new rule:
    a field of config.SamplerConfig and a branch here."""
    logits = logits / (sampler.temperature or 1.0)
    if sampler.top_k and sampler.top_k < logits.size(-1):
        kth = torch.topk(logits, sampler.top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampler.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= sampler.top_p  # the mass ahead of each token
        drop[..., 0] = False  # the most likely token always stays
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_token_probs(logits, sampler, idx):
    """The distribution (B, V) the next token is drawn from (filter_logits). Greedy draws nothing;
    its distribution here is temperature 1's among the candidates: its pick is the likeliest."""
    return F.softmax(filter_logits(logits.float(), sampler, idx), dim=-1)


def sample_next(probs, sampler, generator=None):
    """One token per row (B, 1) drawn from probs (B, V); temperature 0 takes the most likely."""
    if sampler.temperature == 0:
        return probs.argmax(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)


# ----------------------------------------------------------------------------- beam search


@torch.inference_mode()
def beam_search(context, idx, max_new_tokens, beam_width, stop_token=None, length_penalty=0.0):
    """(new tokens (1, n), total log-probability) of the best continuation of idx (1, T) by the
    model of context (a Context): the beam_width likeliest kept at each step, scored by
    total / length ** length_penalty."""
    prompt = idx.size(1)
    dtype = torch.float32 if idx.device.type == "mps" else torch.float64  # MPS has no float64
    beams = idx  # (k, T + t)
    totals = torch.zeros(1, dtype=dtype, device=idx.device)  # (k,)
    finished = []  # (total, new tokens) of the continuations that stopped
    for _ in range(max_new_tokens):
        logp = F.log_softmax(context.next_logits(beams).to(dtype), dim=-1)  # (k, V)
        V = logp.size(-1)
        # the k * V candidates in one row; a beam adds at most one stopped one, so the best
        # 2 * beam_width hold beam_width live ones
        best, flat = (totals[:, None] + logp).flatten().topk(min(2 * beam_width, logp.numel()))
        rows = flat // V  # the beam each candidate extends
        tokens = flat % V  # and by which token
        stops = torch.zeros_like(tokens, dtype=torch.bool)  # whether each candidate stops
        if stop_token is not None:
            stops = tokens == stop_token
        for total, row, token in zip(best[stops].tolist(), rows[stops], tokens[stops]):
            finished.append((total, torch.cat((beams[row, prompt:], token[None]))))
        keep = (~stops).nonzero()[:beam_width, 0]
        if len(keep) == 0:
            break
        if context.cache is not None:  # each row's cache follows the beam it grew from
            context.cache.k = [k[rows[keep]] for k in context.cache.k]
            context.cache.v = [v[rows[keep]] for v in context.cache.v]
        beams = torch.cat((beams[rows[keep]], tokens[keep, None]), 1)
        totals = best[keep]
        if length_penalty == 0 and finished and max(f[0] for f in finished) >= totals[0]:
            break  # a plain sum only falls as a continuation grows: no live beam can win now
    candidates = finished + [(t, b[prompt:]) for t, b in zip(totals.tolist(), beams)]
    total, new = max(candidates, key=lambda c: c[0] / max(1, len(c[1])) ** length_penalty)
    return new[None], total
