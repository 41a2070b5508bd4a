"""Beam search, a deep dive after sampling.py (generate.py --beam N): instead of drawing one
token at a time, keep the beam_width most likely continuations found so far, extend every one
of them by every token, keep the best beam_width of those, repeat. Read sampling.py first: the
model is asked for its logits through sampling.Context, so the context rule and the KV cache
are the sampler's, and each beam's cache follows the beam it grew from.
"""

import torch
import torch.nn.functional as F

from sampling import Context


def follow(context, rows):
    """Row i of the context continues row rows[i] of the last call from now on: its cached keys
    and values become a copy of that row's (each new beam keeps the cache of the beam it extends)."""
    cache = context.cache
    if cache is not None:
        cache.k = [k[rows] if k is not None else None for k in cache.k]
        cache.v = [v[rows] if v is not None else None for v in cache.v]


def score_dtype(device):
    """Totals of hundreds of log-probabilities are kept in float64, so that rounding never picks
    between two beams; MPS has no float64, and float32 is near enough there."""
    return torch.float32 if device.type == "mps" else torch.float64


@torch.inference_mode()
def beam_search(model, idx, max_new_tokens, beam_width, use_cache=True, stop_token=None, length_penalty=0.0):
    """The continuation of idx (1, T) with the highest score that a beam of beam_width finds.
    A continuation's score is its total log-probability (the sum over its tokens), divided by
    its length ** length_penalty (0: the plain sum). One that ends in stop_token is finished and
    leaves the beam. Returns (new tokens (1, n), total log-probability)."""
    context, prompt = Context(model, use_cache, replay=False), idx.size(1)  # (follow moves the cache)
    beams = idx  # (k, T + t): the live continuations, one row each (k = 1 before the first step)
    dtype = score_dtype(idx.device)
    totals = torch.zeros(1, dtype=dtype, device=idx.device)  # (k,) their total log-probabilities
    finished = []  # (total log-probability, new tokens) of the continuations that stopped
    for _ in range(max_new_tokens):
        logp = F.log_softmax(context.next_logits(beams).to(dtype), dim=-1)  # (k, V)
        V = logp.size(-1)
        # every beam extended by every token is one of k * V candidates, flattened to one row:
        # candidate flat is beam flat // V extended by token flat % V. A beam adds at most one
        # stopped candidate, so the best 2 * beam_width hold beam_width live ones
        best, flat = (totals[:, None] + logp).flatten().topk(min(2 * beam_width, logp.numel()))
        rows, tokens = flat // V, flat % V  # which beam each candidate extends, by which token
        stops = tokens == stop_token if stop_token is not None else torch.zeros_like(tokens, dtype=torch.bool)
        finished += [(t, torch.cat((beams[r, prompt:], tok[None]))) for t, r, tok in
                     zip(best[stops].tolist(), rows[stops], tokens[stops])]
        keep = (~stops).nonzero()[:beam_width, 0]
        if len(keep) == 0:
            break
        follow(context, rows[keep])  # each new beam's cache is its parent's
        beams = torch.cat((beams[rows[keep]], tokens[keep, None]), dim=1)
        totals = best[keep]
        if length_penalty == 0 and finished and max(f[0] for f in finished) >= totals[0]:
            break  # the plain sum only falls as a continuation grows: no live beam can win any more
    candidates = finished + [(t, b[prompt:]) for t, b in zip(totals.tolist(), beams)]
    total, new = max(candidates, key=lambda c: c[0] / max(1, len(c[1])) ** length_penalty)
    return new[None], total
