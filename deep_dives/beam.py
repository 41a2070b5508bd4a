"""Beam search (generate.py --beam N): keep the beam_width likeliest continuations, extend each by every
token, repeat. Logits come through sampling.Context, each beam's KV cache following the beam it grew from."""

import torch
import torch.nn.functional as F

from sampling import Context


def reorder_cache(context, rows):
    """Row i of the context continues row rows[i] of the last call, its cached keys and values that row's."""
    if (cache := context.cache) is not None:
        cache.k = [k[rows] if k is not None else None for k in cache.k]
        cache.v = [v[rows] if v is not None else None for v in cache.v]


def score_dtype(device):
    """float64 for totals of hundreds of log-probabilities, so rounding never picks a beam; MPS has none: float32."""
    return torch.float32 if device.type == "mps" else torch.float64


@torch.inference_mode()
def beam_search(model, idx, max_new_tokens, beam_width, use_cache=True, stop_token=None, length_penalty=0.0):
    """(new tokens (1, n), total log-prob) of idx (1, T)'s best continuation, by total / length ** length_penalty."""
    context, prompt = Context(model, use_cache), idx.size(1)  # (reorder_cache moves it)
    beams = idx  # (k, T + t): the live continuations, one row each (k = 1 before the first step)
    dtype = score_dtype(idx.device)
    totals = torch.zeros(1, dtype=dtype, device=idx.device)  # (k,) their total log-probabilities
    finished = []  # (total log-probability, new tokens) of the continuations that stopped
    for _ in range(max_new_tokens):
        logp = F.log_softmax(context.next_logits(beams).to(dtype), dim=-1)  # (k, V)
        V = logp.size(-1)
        # the k * V candidates (beam, token) flattened to one row. A beam adds at most one stopped
        # candidate, so the best 2 * beam_width hold beam_width live ones
        best, flat = (totals[:, None] + logp).flatten().topk(min(2 * beam_width, logp.numel()))
        rows, tokens = flat // V, flat % V  # which beam each candidate extends, by which token
        stops = tokens == stop_token if stop_token is not None else torch.zeros_like(tokens, dtype=torch.bool)
        finished += [(t, torch.cat((beams[r, prompt:], tok[None]))) for t, r, tok in
                     zip(best[stops].tolist(), rows[stops], tokens[stops])]
        keep = (~stops).nonzero()[:beam_width, 0]
        if len(keep) == 0:
            break
        reorder_cache(context, rows[keep])
        beams = torch.cat((beams[rows[keep]], tokens[keep, None]), dim=1)
        totals = best[keep]
        if length_penalty == 0 and finished and max(f[0] for f in finished) >= totals[0]:
            break  # the plain sum only falls as a continuation grows: no live beam can win any more
    candidates = finished + [(t, b[prompt:]) for t, b in zip(totals.tolist(), beams)]
    total, new = max(candidates, key=lambda c: c[0] / max(1, len(c[1])) ** length_penalty)
    return new[None], total
