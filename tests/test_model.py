"""The GPT itself: shapes, causality, initialisation, tying, parameter count, sampling."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from config import GREEDY, SHAPE, GPTConfig, Sampler, TinyLLMError
from conftest import (GPT_SWITCHES, MODEL_VARIANTS, KernelCalls, checkpoint_of, no_tokens, tiny_model_config,
                      variant_id)
from model import GPT
import sampling
from sampling import filter_logits, sample_next



def test_logits_shape_and_loss():
    model = GPT(tiny_model_config())
    idx = torch.randint(0, 65, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 65) and loss is None
    _, loss = model(idx, idx)
    assert loss.ndim == 0


@pytest.mark.parametrize("pos", GPT_SWITCHES["pos"])
def test_causality(pos):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(pos=pos)).eval()
    idx = torch.randint(0, 65, (1, 16))
    logits, _ = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 65
        logits2, _ = model(changed)
        assert torch.allclose(logits[0, :t], logits2[0, :t], atol=1e-6)   # the past never sees the future
        assert not torch.allclose(logits[0, t], logits2[0, t])            # the changed position does move


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(tiny_model_config(n_embd=64, n_layer=2, n_head=4))
    idx = torch.randint(0, 65, (8, 16))
    _, loss = model(idx, torch.randint(0, 65, (8, 16)))
    assert abs(loss.item() - math.log(65)) < 0.1


def test_weight_tying_is_one_tensor():
    model = GPT(tiny_model_config())
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_parameter_count_matches_formula():
    V, T, L, C = 65, 16, 3, 48
    model = GPT(tiny_model_config(vocab_size=V, block_size=T, n_layer=L, n_embd=C, n_head=4))
    per_layer = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    assert model.num_params() == V * C + T * C + L * per_layer + 2 * C


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(tiny_model_config(n_embd=256, n_head=4, n_layer=8))
    fc = model.blocks[0].mlp.c_fc.weight.std().item()
    proj = model.blocks[0].attn.c_proj.weight.std().item()
    assert fc == pytest.approx(0.02, rel=0.05)
    assert proj == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


@pytest.mark.parametrize("overrides, words", [
    (dict(n_embd=30, n_head=4), ["n_embd (30)", "n_head (4)"]),
    (dict(n_layer=0), ["n_layer"]),
    (dict(dropout=1.5), ["dropout"]),
    (dict(norm="batchnorm"), ["norm"]),
])
def test_bad_model_config_is_a_clear_error(overrides, words):
    with pytest.raises(TinyLLMError) as err:
        tiny_model_config(**overrides)
    assert all(w in str(err.value) for w in words)


@pytest.mark.parametrize("rule", dataclasses.fields(Sampler), ids=lambda f: f.name)
def test_every_sampling_rule_at_its_example_changes_the_odds_and_keeps_a_candidate(rule):
    """Each of config.Sampler's settings at its example= value, on logits where every rule has something to do: the
    distribution the token is drawn from is not the default sampler's (a rule wired in but never applied fails
    here), it is a distribution, and greedy picks a candidate."""
    if rule.metadata.get("example") is None:
        pytest.skip(f"Sampler.{rule.name} has no example=: give its setting(...) a value at which it changes the odds")
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3  # (B, V)
    # the tokens so far (B, T), for a rule that reads them: the likeliest three among them, each twice
    idx = torch.cat([torch.randint(0, 50, (4, 10)), logits.topk(3, dim=-1).indices.repeat(1, 2)], dim=1)
    sampler = Sampler(**{rule.name: rule.metadata["example"]})
    plain, ruled = sampling.next_token_probs(logits, Sampler(), idx), sampling.next_token_probs(logits, sampler, idx)
    assert not torch.allclose(plain, ruled, atol=1e-4)
    assert torch.allclose(ruled.sum(-1), torch.ones(4)) and (ruled >= 0).all()
    greedy = sample_next(logits, dataclasses.replace(sampler, temperature=0), idx)  # (B, 1)
    assert torch.isfinite(filter_logits(logits, sampler, idx).gather(-1, greedy)).all()


def test_top_k_keeps_exactly_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    kept = filter_logits(logits, Sampler(temperature=1.0, top_k=7), no_tokens(logits))
    assert (torch.isfinite(kept).sum(dim=-1) == 7).all()
    assert torch.equal(torch.isfinite(kept), logits >= logits.topk(7, dim=-1).values[:, -1:])


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), Sampler(temperature=1.0, top_p=0.8), no_tokens(probs)))
    assert kept.tolist() == [[True, True, True, False, False]]   # 0.5 + 0.2 < 0.8 <= 0.85
    kept = torch.isfinite(filter_logits(probs.log(), Sampler(temperature=1.0, top_p=0.3), no_tokens(probs)))
    assert kept.tolist() == [[True, False, False, False, False]]
    torch.manual_seed(1)
    logits = torch.randn(3, 100)
    for p in (0.1, 0.5, 0.9):
        kept = torch.isfinite(filter_logits(logits, Sampler(temperature=1.0, top_p=p), no_tokens(logits)))
        probs = F.softmax(logits, dim=-1)
        for row in range(3):
            mass = probs[row][kept[row]]
            assert mass.sum() >= p - 1e-6                 # reaches p
            assert mass.sum() - mass.min() < p            # and no token could be dropped


def test_top_p_of_zero_still_keeps_the_most_likely_token():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, Sampler(temperature=1.0, top_p=1e-9), no_tokens(logits)))
    assert kept.tolist() == [[False, True, False], [True, False, False]]


def test_greedy_is_deterministic_and_seeded_sampling_reproducible():
    torch.manual_seed(0)
    model = GPT(tiny_model_config()).eval()
    idx = torch.randint(0, 65, (2, 5))
    a = sampling.generate(model, idx, 20, GREEDY)
    b = sampling.generate(model, idx, 20, GREEDY)
    assert torch.equal(a, b) and a.shape == (2, 25)
    s1 = sampling.generate(model, idx, 20, Sampler(temperature=1.0), generator=torch.Generator().manual_seed(42))
    s2 = sampling.generate(model, idx, 20, Sampler(temperature=1.0), generator=torch.Generator().manual_seed(42))
    s3 = sampling.generate(model, idx, 20, Sampler(temperature=1.0), generator=torch.Generator().manual_seed(43))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)


def test_generation_crops_context_past_block_size():
    model = GPT(tiny_model_config(block_size=8)).eval()
    out = sampling.generate(model, torch.zeros(1, 3, dtype=torch.long), 30, GREEDY)
    assert out.shape == (1, 33)


def test_sample_next_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    assert sample_next(logits, GREEDY, no_tokens(logits)).tolist() == [[1], [0]]


def test_every_variant_of_the_model_is_run_by_the_model_tests():
    """Each setting of GPTConfig beyond its shape is away from its default in one of MODEL_VARIANTS, so the
    cache, the fused kernel, the replayed step and the pictures' reference are checked with it on."""
    default = GPTConfig()
    varied = {k for variant in MODEL_VARIANTS for k, v in variant.items() if v != getattr(default, k)}
    missing = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in SHAPE and f.name not in varied]
    assert not missing, f"give {', '.join(missing)} an example= in config.py: a value the model tests run it at"


ODD_HEADS = dict(n_head=3, n_embd=24)  # a per-head formula must work at any count (the tiny preset has 5 heads)


@pytest.mark.parametrize("switches", MODEL_VARIANTS, ids=variant_id)
def test_kv_cache_matches_full_recompute_at_every_step(switches, monkeypatch):
    """Next-token logits with and without the cache agree at every step, well past block_size."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config(block_size=8, **ODD_HEADS, **switches)).eval()
    seen = {True: [], False: []}
    real = sampling.sample_next
    for use_cache in (True, False):
        def recording(logits, *a, _log=seen[use_cache], **k):  # keep every step's logits, then sample as usual
            _log.append(logits.clone())
            return real(logits, *a, **k)
        monkeypatch.setattr(sampling, "sample_next", recording)
        torch.manual_seed(1)  # the same prompt both times
        out = sampling.generate(model, torch.randint(0, 65, (2, 5)), 30, GREEDY, use_cache=use_cache)
        seen[use_cache].append(out)
    *cached_logits, cached_out = seen[True]
    *full_logits, full_out = seen[False]
    assert len(cached_logits) == len(full_logits) == 30   # 5 + 30 tokens: far beyond block_size 8
    for step, (a, b) in enumerate(zip(cached_logits, full_logits)):
        assert torch.allclose(a, b, atol=1e-4), f"step {step}: max diff {(a - b).abs().max():.2e}"
    assert torch.equal(cached_out, full_out)


def test_every_combination_trains_saves_reloads_and_generates(tmp_path):
    from machinery.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    for switches in MODEL_VARIANTS:
        torch.manual_seed(0)
        model = GPT(tiny_model_config(**switches))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        idx = torch.randint(0, 65, (4, 16))
        first = None
        for _ in range(5):
            _, loss = model(idx[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = first if first is not None else loss.item()
        assert loss.item() < first
        path = str(tmp_path / "m.pt")
        save_checkpoint(path, checkpoint_of(model))
        loaded = model_from_checkpoint(load_checkpoint(path)).eval()
        model.eval()
        assert torch.equal(sampling.generate(loaded, idx[:1, :3], 10, GREEDY), sampling.generate(model, idx[:1, :3], 10, GREEDY))


def test_swiglu_keeps_the_parameter_count_close():
    gelu = GPT(tiny_model_config(n_embd=384, n_head=6)).num_params()
    swiglu = GPT(tiny_model_config(n_embd=384, n_head=6, mlp="swiglu")).num_params()
    assert abs(swiglu - gelu) / gelu < 0.01


def test_attention_stays_float32_under_cpu_bfloat16_autocast(monkeypatch):
    # a speed choice with a test of its own: bfloat16 attention (its backward above all) was several
    # times slower than float32's on CPUs, while the matmuls around it keep bfloat16's speed
    model = GPT(tiny_model_config(pos="rope"))
    idx = torch.randint(0, 65, (2, 16))
    with KernelCalls() as kernel, torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert kernel.calls and {q.dtype for q, _, _ in kernel.calls} == {torch.float32}
    assert logits.dtype == torch.bfloat16  # the rest of the forward pass did run in bfloat16


def test_generation_builds_no_autograd_graph(monkeypatch):
    seen = []
    real = sampling.sample_next
    monkeypatch.setattr(sampling, "sample_next", lambda logits, *a, **k: seen.append(
        (logits.requires_grad, torch.is_inference_mode_enabled())) or real(logits, *a, **k))
    sampling.generate(GPT(tiny_model_config()), torch.zeros(1, 3, dtype=torch.long), 5, GREEDY)
    assert seen == [(False, True)] * 5  # inference mode at every step: no graph kept alive by the cache


@pytest.mark.parametrize("switches", MODEL_VARIANTS, ids=variant_id)
def test_the_formula_as_written_is_what_the_fused_kernel_computes(switches):
    """CausalSelfAttention.attention as the lesson writes it, softmax(q k^T / sqrt(hs) + mask) v, and the fused
    kernel the model runs by default give the same logits, the same gradients, and the same
    cached generation, past block_size."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config(block_size=8, **ODD_HEADS, **switches))
    idx = torch.randint(0, 65, (3, 9))
    results = {}
    for fused in (True, False):
        for block in model.blocks:
            block.attn.fused = fused
        model.zero_grad()
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.eval()
        text = sampling.generate(model, idx[:1, :3], 20, GREEDY)
        model.train()
        results[fused] = (logits.detach(), grads, text)
    (fast, fast_grads, fast_text), (plain, plain_grads, plain_text) = results[True], results[False]
    assert torch.allclose(fast, plain, atol=1e-5), (fast - plain).abs().max()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast_grads, plain_grads))
    assert torch.equal(fast_text, plain_text)


def test_the_causal_mask_lets_each_query_see_the_keys_up_to_its_own_position():
    from model import causal_mask
    assert causal_mask(3, 3, "cpu").isinf().tolist() == [[False, True, True], [False, False, True],
                                                          [False, False, False]]
    # two new queries after two cached keys: each also sees the cached ones
    assert causal_mask(2, 4, "cpu").isinf().tolist() == [[False, False, False, True], [False, False, False, False]]


def test_every_decoding_step_with_the_cache_computes_with_the_same_shapes(monkeypatch):
    # the cache's whole buffers are attended to, its unfilled slots masked: the same shapes every step
    torch.manual_seed(0)
    model = GPT(tiny_model_config(block_size=8)).eval()
    with KernelCalls() as kernel:
        sampling.generate(model, torch.zeros(2, 3, dtype=torch.long), 20, GREEDY)  # past block_size: refills too
    calls = [(tuple(q.shape), tuple(k.shape), None if m is None else tuple(m.shape)) for q, k, m in kernel.calls]
    steps = [c for c in calls if c[0][2] == 1]  # one new token per row
    assert len(steps) > 10 and len(set(steps)) == 1, set(steps)
    assert steps[0][1][2] == 8  # every step reads all block_size slots


def test_the_fused_path_uses_a_mask_it_is_given_even_in_training_shape():
    """A variant that adds to the mask (ALiBi's biases, say) hands it to every layer; the fused
    kernel must use it, and take its causal shortcut only for a mask of None."""
    from model import CausalSelfAttention, causal_mask, fused_attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    given = torch.zeros(6, 6)  # every query sees every key: not the causal triangle
    formula = CausalSelfAttention(tiny_model_config(), 0)
    formula.fused = False
    assert torch.allclose(fused_attention(q, k, v, given), formula.attention(q, k, v, given), atol=1e-5)
    assert torch.allclose(fused_attention(q, k, v, None), formula.attention(q, k, v, causal_mask(6, 6, "cpu")),
                          atol=1e-5)
