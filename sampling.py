"""Generation, the chapter after train.py: how a trained GPT writes text, one token at a time.

Read it from top to bottom. generate is the loop: it computes the next-token logits, draws one
token and appends it. The KV cache lets a new token cost the work of one position instead of the
whole context. The context rule says what the model sees once the text outgrows block_size. The
sampler and beam search come last.

Use it like this:

    idx = torch.tensor([tokenizer.encode(prompt)]); model.eval()
    out = generate(model, idx, 100, config.SamplerConfig()); tokenizer.decode(out[0].tolist())

or, one token at a time:

    for token, probs in token_stream(Context(model), idx, 100, sampler): ...
"""

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- the loop


def generate(model, idx, max_new_tokens, sampler, stop_token=None, generator=None):
    """Extends each row of idx (B, T) by max_new_tokens tokens and returns (B, T + new).

    It stops early once every row has made stop_token. A row that stopped earlier goes on past its
    stop_token, so cut it there (until_stop). Call model.eval() first, or dropout stays on."""
    steps = token_stream(Context(model), idx, max_new_tokens, sampler, stop_token, generator)
    return torch.cat([idx, *(token for token, _ in steps)], dim=1)


@torch.inference_mode()  # no autograd graph
def token_stream(context, idx, max_new_tokens, sampler, stop_token=None, generator=None):
    """Runs the loop of generate one token at a time.

    Each step yields the new tokens (B, 1) and the distribution (B, V) they were drawn from, so a
    caller can show them as they come. context is the model as it generates (see Context); in a
    chat, it holds the conversation so far."""
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = context.next_logits(idx)  # (B, V)
        probs = next_token_probs(logits, sampler, idx)  # (B, V)
        token = sample_next(probs, sampler, generator)  # (B, 1)
        yield token.clone(), probs  # a clone that autograd may use outside inference mode
        idx = torch.cat((idx, token), dim=1)  # (B, T + 1)
        if stop_token is not None:
            done |= token[:, 0] == stop_token
            if done.all():
                break


def until_stop(ids, stop_token):
    """Returns a row of tokens from generate, cut at its first stop_token. The rows of a batch run
    on past their stop, so each row needs this cut."""
    return ids[: ids.index(stop_token)] if stop_token in ids else ids


def sample_text(model, ids, max_new_tokens, sampler, stop_token=None, seed=0):
    """Returns the new token ids of one seeded sample after ids, cut at stop_token. The same seed
    gives the same text. The model samples in eval mode, then goes back to the mode it was in."""
    idx = torch.tensor([ids], device=model.wte.weight.device)  # (1, T)
    generator = torch.Generator(idx.device).manual_seed(seed)
    training = model.training
    out = generate(model.eval(), idx, max_new_tokens, sampler, stop_token, generator)
    model.train(training)
    return until_stop(out[0, len(ids) :].tolist(), stop_token)


# ----------------------------------------------------------------------------- the KV cache


class KVCache:
    """Holds the keys and values of every layer for the tokens so far.

    The buffers have block_size positions; they are allocated once and written in place. pos is
    where the next token goes. Attention reads the whole buffers, and the mask (model.causal_mask)
    hides the slots after the position of each query."""

    def __init__(self, n_layer, block_size):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.block_size = block_size
        self.pos = 0

    def update(self, layer, k, v):
        """Stores k and v (B, nh, T, hs) at positions pos..pos+T-1 and returns the whole buffers
        (B, nh, block_size, hs)."""
        if self.k[layer] is None:  # not empty: a hidden slot gets weight 0, but 0 * NaN is NaN
            shape = (k.size(0), k.size(1), self.block_size, k.size(3))
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        self.k[layer][:, :, self.pos : self.pos + k.size(2)] = k
        self.v[layer][:, :, self.pos : self.pos + v.size(2)] = v
        return self.k[layer], self.v[layer]


class Context:
    """What the model sees while it generates. next_logits(idx) returns the logits of the token
    after each row of idx (B, T). The idx of each call continues the idx of the last call by one
    token or more."""

    def __init__(self, model, use_cache=True):
        self.model = model
        self.use_cache = use_cache
        self.start = None  # the context is idx[:, start:]
        self.cache = None

    def next_logits(self, idx):
        block_size = self.model.config.block_size
        if self.start is None:  # the prompt: keep at most its last block_size tokens
            self.start = max(0, idx.size(1) - block_size)
        full = idx.size(1) - self.start > block_size
        if full:
            # Sliding the window by one token would move every token to a new position, but each
            # cached key was computed at the old position. So the context restarts from its
            # newest block_size // 2 tokens and the cache is refilled every block_size / 2 tokens.
            self.start = idx.size(1) - max(1, block_size // 2)
        if not self.use_cache:  # recompute the whole context
            return self.model(idx[:, self.start :])[0][:, -1, :]
        if self.cache is None or full:  # a new, empty cache takes the whole context
            self.cache = KVCache(self.model.config.n_layer, block_size)
        new = idx[:, self.start + self.cache.pos :]  # (B, T): the tokens not yet in the cache
        logits, _ = self.model(new, cache=self.cache)
        self.cache.pos += new.size(1)
        return logits[:, -1, :]  # (B, V)


# ----------------------------------------------------------------------------- the sampler


def filter_logits(logits, sampler, idx):
    """Returns the logits (B, V) to draw the next token from, after the text idx (B, T).

    It divides the logits by the temperature (by 1 for greedy), then sets every logit outside the
    candidates to -inf. top_k keeps the k likeliest tokens (and any tied with the k-th). top_p
    keeps the fewest tokens whose probabilities add up to top_p. No rule here reads idx, but a rule
    that does (a penalty on repeats, say) has it at hand. To add a rule, add a field to
    config.SamplerConfig and a branch here."""
    logits = logits / (sampler.temperature or 1.0)
    if sampler.top_k and sampler.top_k < logits.size(-1):
        kth = torch.topk(logits, sampler.top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampler.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= sampler.top_p  # the mass before each token
        drop[..., 0] = False  # the most likely token always stays
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_token_probs(logits, sampler, idx):
    """Returns the distribution (B, V) that the next token is drawn from (see filter_logits).
    Greedy decoding draws nothing. For it, this is the temperature-1 distribution over the
    candidates, and greedy picks the likeliest token."""
    return F.softmax(filter_logits(logits.float(), sampler, idx), dim=-1)


def sample_next(probs, sampler, generator=None):
    """Draws one token per row, (B, 1), from probs (B, V). Temperature 0 takes the most likely."""
    if sampler.temperature == 0:
        return probs.argmax(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)


# ----------------------------------------------------------------------------- beam search


@torch.inference_mode()
def beam_search(context, idx, max_new_tokens, beam_width, stop_token=None, length_penalty=0.0):
    """Returns (new tokens (1, n), total log-probability) of the best continuation of idx (1, T).

    context (a Context) holds the model. Each step keeps the beam_width likeliest continuations.
    The best continuation is the one with the highest total / length ** length_penalty."""
    prompt = idx.size(1)
    dtype = torch.float32 if idx.device.type == "mps" else torch.float64  # MPS has no float64
    beams = idx  # (k, T + t)
    totals = torch.zeros(1, dtype=dtype, device=idx.device)  # (k,)
    finished = []  # (total, new tokens) of the continuations that stopped
    for _ in range(max_new_tokens):
        logp = F.log_softmax(context.next_logits(beams).to(dtype), dim=-1)  # (k, V)
        V = logp.size(-1)
        # put the k * V candidates in one row. Each beam adds at most one stopped candidate, so
        # the best 2 * beam_width candidates include beam_width live ones
        best, flat = (totals[:, None] + logp).flatten().topk(min(2 * beam_width, logp.numel()))
        rows = flat // V  # the beam each candidate extends
        tokens = flat % V  # the token it adds
        stops = torch.zeros_like(tokens, dtype=torch.bool)  # whether each candidate stops
        if stop_token is not None:
            stops = tokens == stop_token
        for total, row, token in zip(best[stops].tolist(), rows[stops], tokens[stops]):
            finished.append((total, torch.cat((beams[row, prompt:], token[None]))))
        keep = (~stops).nonzero()[:beam_width, 0]
        if len(keep) == 0:
            break
        if context.cache is not None:  # each cache row follows the beam it grew from
            context.cache.k = [k[rows[keep]] for k in context.cache.k]
            context.cache.v = [v[rows[keep]] for v in context.cache.v]
        beams = torch.cat((beams[rows[keep]], tokens[keep, None]), 1)
        totals = best[keep]
        if length_penalty == 0 and finished and max(f[0] for f in finished) >= totals[0]:
            break  # a plain sum only falls as a beam grows, so no live beam can win now
    candidates = finished + [(t, b[prompt:]) for t, b in zip(totals.tolist(), beams)]
    total, new = max(candidates, key=lambda c: c[0] / max(1, len(c[1])) ** length_penalty)
    return new[None], total
