"""The GPT (model.py) and its decoding (sampling.py): shapes, causality, initialisation, every combination of the
model's switches against recomputation and the attention formula, the sampler, generation and beam search."""

import ast
import itertools
import math
import os
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from config import GPTConfig, SamplerConfig, TinyLLMError
from conftest import GREEDY, ROOT, tiny_model
from model import GPT, MLP, SwiGLU, apply_rope, causal_mask, rope_tables
from sampling import Context, beam_search, filter_logits, generate, next_token_probs, sample_next

SWITCHES = [f for f in fields(GPTConfig) if f.metadata["choices"]]  # norm, mlp, pos, and any switch to come
COMBOS = [dict(zip([f.name for f in SWITCHES], values))
          for values in itertools.product(*(f.metadata["choices"] for f in SWITCHES))]
COMBO_IDS = ["-".join(combo.values()) for combo in COMBOS]


def sharp(model):
    """Attention far from uniform (queries and keys 10 times larger): a key cached wrong shows in the logits."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_attn.weight.mul_(10)
    return model.eval()


def test_logits_shape_and_loss_near_ln_vocab_untrained():
    torch.manual_seed(0)
    model = GPT(tiny_model(vocab_size=65, n_embd=64, n_head=4))
    idx, targets = torch.randint(0, 65, (8, 16)), torch.randint(0, 65, (8, 16))
    assert model(idx)[0].shape == (8, 16, 65) and model(idx)[1] is None
    logits, loss = model(idx, targets)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, 65), targets.view(-1)).item())
    assert abs(loss.item() - math.log(65)) < 0.1


@pytest.mark.parametrize("switches", COMBOS, ids=COMBO_IDS)
def test_a_later_token_never_changes_an_earlier_positions_logits(switches):
    torch.manual_seed(0)
    model = GPT(tiny_model(**switches)).eval()
    idx = torch.randint(0, 65, (1, 16))
    changed = torch.where(torch.arange(16) == 9, (idx + 1) % 65, idx)
    before, after = model(idx)[0], model(changed)[0]
    assert torch.allclose(before[0, :9], after[0, :9], atol=1e-6)
    assert not torch.allclose(before[0, 9], after[0, 9], atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_the_tied_embedding_is_one_tensor_and_the_parameter_count_matches_its_formula(bias):
    V, T, L, C, b = 65, 16, 3, 48, int(bias)
    model = GPT(tiny_model(vocab_size=V, block_size=T, n_layer=L, n_embd=C, n_head=4, bias=bias, norm="layernorm",
                           mlp="gelu", pos="learned"))
    assert model.lm_head.weight is model.wte.weight
    norm = C + C * b
    attention = 3 * C * C + 3 * C * b + C * C + C * b
    mlp = 4 * C * C + 4 * C * b + 4 * C * C + C * b
    assert model.num_params() == V * C + T * C + L * (2 * norm + attention + mlp) + norm  # the tied matrix once


def test_gpt2_init_starts_the_residual_projections_smaller():
    torch.manual_seed(0)
    model = GPT(tiny_model(n_layer=(L := 8), n_embd=128, n_head=4, bias=True))
    for block in model.blocks:
        for layer in (block.attn.c_proj, block.mlp.c_proj):
            assert layer.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
            assert not layer.bias.any()
        for layer in (block.attn.c_attn, block.mlp.c_fc):
            assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("overrides, name", [
    (dict(n_embd=30, n_head=4), "n_head"), (dict(n_layer=0), "n_layer"), (dict(block_size=0), "block_size"),
    (dict(vocab_size=-1), "vocab_size"), (dict(dropout=1.0), "dropout"), (dict(norm="batchnorm"), "norm"),
    (dict(pos="rope", n_embd=6, n_head=2), "rope"), (dict(mlp="relu"), "mlp")])
def test_a_bad_model_config_is_a_tinyllm_error(overrides, name):
    with pytest.raises(TinyLLMError, match=name):
        tiny_model(**overrides)


CALLS = [0, 1, 3, 1, 1, 5, 1, 2, 1, 1, 1]  # the tokens added before each call: 5 + 17, far past block_size 8


@pytest.mark.parametrize("switches", COMBOS, ids=COMBO_IDS)
def test_the_cache_and_the_formula_give_recomputations_logits_past_block_size(switches):
    """At every step, one token or several at once, far past block_size: the KV cache's next-token logits are
    recomputation's, and the attention formula (fused = False) gives the fused kernel's, with a mask (the cache's)
    and without one (the causal triangle)."""
    torch.manual_seed(0)
    model = sharp(GPT(tiny_model(block_size=8, n_head=3, n_embd=24, **switches)))
    tokens = torch.randint(0, 65, (2, 40))
    runs = {}
    for fused, use_cache in itertools.product((True, False), repeat=2):
        for block in model.blocks:
            block.attn.fused = fused
        context, end, logits = Context(model, use_cache), 5, []
        for added in CALLS:
            end += added
            logits.append(context.next_logits(tokens[:, :end]))
        runs[fused, use_cache] = torch.stack(logits)
    for (fused, use_cache), logits in runs.items():
        gap = (logits - runs[True, False]).abs().amax(dim=(1, 2))
        assert (gap < 1e-5).all(), f"fused={fused} cache={use_cache}: calls {gap.gt(1e-5).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("sampler", [GREEDY, SamplerConfig(temperature=1.0, top_k=20)], ids=["greedy", "seeded"])
def test_generation_and_a_chat_write_the_same_tokens_with_and_without_the_cache_past_block_size(sampler):
    """A chat: generate, then the user's turn (several tokens at once), then generate on with the same Context."""
    torch.manual_seed(0)
    model = sharp(GPT(tiny_model(block_size=8, pos="rope")))
    turns = [torch.randint(0, 65, (2, n)) for n in (5, 4, 7)]  # the model answers 8 tokens to each
    results = {}
    for use_cache in (True, False):
        context, idx, seen = Context(model, use_cache), torch.zeros(2, 0, dtype=torch.long), []
        for turn in turns:
            idx = generate(model, torch.cat((idx, turn), dim=1), 8, sampler, context=context,
                           generator=torch.Generator().manual_seed(len(seen)), on_token=lambda *a: seen.append(a[1]))
        results[use_cache] = idx, torch.stack(seen)
    assert results[True][0].shape == (2, 40) and torch.equal(results[True][0], results[False][0])
    assert torch.allclose(results[True][1], results[False][1], atol=1e-5)


def test_causal_mask_lets_each_query_see_the_keys_up_to_its_position():
    visible = lambda *args, **kwargs: (causal_mask(*args, device="cpu", **kwargs) == 0).int().tolist()  # noqa: E731
    assert visible(3, 3) == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # training: the lower triangle
    assert visible(2, 4) == [[1, 1, 1, 0], [1, 1, 1, 1]]  # the new queries are the last positions
    assert visible(2, 6, start=2) == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]  # the cache's unfilled slots hidden


def test_rope_turns_each_pair_as_a_complex_number_by_its_positions_angle():
    T, hs = 7, 8
    x = torch.randn(2, 3, T, hs)
    got = apply_rope(x, *rope_tables(T, hs))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, hs, 2).double() / hs)
    turned = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.polar(torch.ones_like(angles), angles)
    assert torch.allclose(got.double(), torch.stack((turned.real, turned.imag), dim=-1).flatten(-2), atol=1e-5)
    assert apply_rope(x.bfloat16(), *rope_tables(T, hs)).dtype == torch.bfloat16


@pytest.mark.parametrize("width", [32, 160, 384])
def test_swiglu_holds_about_as_many_parameters_as_the_gelu_mlp(width):
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    config = tiny_model(n_embd=width, n_head=2)
    assert count(SwiGLU(config)) == pytest.approx(count(MLP(config)), rel=0.05)


def test_attention_stays_float32_under_cpu_bfloat16_autocast(monkeypatch):
    seen, real = [], model_module.fused_attention  # the dtype of every attention's output, where the model calls it
    monkeypatch.setattr(model_module, "fused_attention", lambda *a: seen.append((out := real(*a)).dtype) or out)
    torch.manual_seed(0)
    model = GPT(tiny_model(pos="rope"))
    idx = torch.randint(0, 65, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16  # the rest of the forward pass ran in bfloat16
    assert seen and set(seen) == {torch.float32}


# ----------------------------------------------------------------------------- the sampler

def test_top_k_keeps_the_k_likeliest_and_any_tied_with_the_kth():
    kept = torch.isfinite(filter_logits(torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]]), SamplerConfig(temperature=1.0, top_k=2)))
    assert kept.tolist() == [[True, False, True, True, False]]
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    kept = filter_logits(logits, SamplerConfig(temperature=0.5, top_k=7))
    assert torch.equal(torch.isfinite(kept), logits >= logits.topk(7, dim=-1).values[:, -1:])
    assert torch.equal(kept[torch.isfinite(kept)], (logits / 0.5)[torch.isfinite(kept)])  # the temperature's


def test_top_p_keeps_the_smallest_set_reaching_p_and_always_the_likeliest():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    for p, n in ((0.8, 3), (0.6, 2), (1e-9, 1)):  # 0.5 + 0.2 < 0.8 <= 0.85
        kept = torch.isfinite(filter_logits(probs.log(), SamplerConfig(temperature=1.0, top_p=p)))
        assert kept.tolist() == [[i < n for i in range(5)]], p
    torch.manual_seed(1)
    logits = torch.randn(3, 100)
    for p in (0.1, 0.5, 0.9):
        kept = torch.isfinite(filter_logits(logits, SamplerConfig(temperature=1.0, top_p=p)))
        for row, keep in zip(F.softmax(logits, dim=-1), kept):
            assert row[keep].sum() >= p - 1e-6 and row[keep].sum() - row[keep].min() < p and keep[row.argmax()]


def test_temperature_0_is_argmax_and_a_seeded_draw_repeats():
    torch.manual_seed(0)
    logits = torch.randn(4, 40) * 3
    assert torch.equal(sample_next(logits, GREEDY), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_next(logits, SamplerConfig(temperature=0, top_k=3)), logits.argmax(-1, keepdim=True))
    sampler = SamplerConfig(temperature=0.7, top_k=10)
    assert torch.allclose(next_token_probs(logits, SamplerConfig(temperature=0.7)), F.softmax(logits / 0.7, dim=-1))
    draws = [sample_next(logits, sampler, torch.Generator().manual_seed(s)) for s in (1, 1, 2, 3)]
    assert torch.equal(draws[0], draws[1]) and not (torch.equal(draws[0], draws[2]) and torch.equal(draws[0], draws[3]))
    assert torch.isfinite(filter_logits(logits, sampler).gather(1, draws[2])).all()  # a candidate, always


# ----------------------------------------------------------------------------- generation

class MarkovChain(torch.nn.Module):
    """A stand-in model whose next-token probabilities are a row of a table, by the last token alone."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table).log()  # (V, V)
        self.config = GPTConfig(vocab_size=len(table), block_size=64, n_layer=1, n_head=1, n_embd=2)

    def forward(self, idx, targets=None, cache=None):
        return self.table[idx], None  # (B, T, V)


def test_a_stop_token_ends_generation_once_every_row_has_made_it():
    chain = MarkovChain([[0.1 if j != (i + 1) % 5 else 0.6 for j in range(5)] for i in range(5)])  # i -> i + 1
    out = generate(chain, torch.tensor([[1], [4]]), 10, GREEDY, stop_token=3)
    assert out.tolist() == [[1, 2, 3, 4, 0], [4, 0, 1, 2, 3]]  # the first row goes on after its stop
    assert generate(chain, torch.tensor([[1]]), 10, GREEDY, stop_token=3).tolist() == [[1, 2, 3]]


def test_generation_builds_no_autograd_graph():
    model = GPT(tiny_model())  # parameters that require gradients
    context, seen = Context(model), []
    out = generate(model, torch.zeros(1, 3, dtype=torch.long), 5, GREEDY, context=context,
                   on_token=lambda t, logits, i: seen.append((logits.requires_grad, torch.is_inference_mode_enabled())))
    assert seen == [(False, True)] * 5
    assert not any(k.requires_grad for k in context.cache.k + context.cache.v)
    assert not out.requires_grad and not out.is_inference()  # a tensor autograd may use later


# ----------------------------------------------------------------------------- beam search

def peaked(seed, vocab_size=65, block_size=8, **switches):
    """Far from uniform next-token distributions (the embedding scaled): greedy and beam search can disagree."""
    torch.manual_seed(seed)
    model = GPT(tiny_model(vocab_size=vocab_size, block_size=block_size, **switches)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(30)
    return model


def total_logprob(model, prompt, new):
    """new's total log-probability after prompt, each token's context recomputed by generation's context rule."""
    context, idx, total = Context(model, use_cache=False), prompt, 0.0
    for token in new[0].tolist():
        total += F.log_softmax(context.next_logits(idx)[0].double(), dim=-1)[token].item()
        idx = torch.cat((idx, torch.tensor([[token]])), dim=1)
    return total


def test_beam_width_1_is_greedy():
    model = peaked(0)
    prompt = torch.randint(0, 65, (1, 3))
    new, total = beam_search(model, prompt, 20, 1)  # past block_size 8
    assert torch.equal(new, generate(model, prompt, 20, GREEDY)[:, 3:])
    assert total == pytest.approx(total_logprob(model, prompt, new), abs=1e-4)


@pytest.mark.parametrize("stop, length_penalty", [(None, 0.0), (2, 0.0), (2, 1.0), (2, 2.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_beam_holding_every_candidate_finds_the_brute_force_best(seed, stop, length_penalty):
    V, n = 4, 4
    model = peaked(seed, vocab_size=V, block_size=16)
    prompt = torch.randint(0, V, (1, 2), generator=torch.Generator().manual_seed(seed))
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))  # every continuation, (V^n, n)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.cat((prompt.expand(len(seqs), -1), seqs), 1))[0].double(), dim=-1)
    steps = logp[:, 1:-1].gather(2, seqs[:, :, None])[:, :, 0]  # (V^n, n)
    endings = {}  # a continuation ends at its first stop token
    for seq, lp in zip(seqs.tolist(), steps):
        cut = seq.index(stop) + 1 if stop in seq else n
        endings[tuple(seq[:cut])] = lp[:cut].sum().item()
    best = max(endings, key=lambda s: endings[s] / len(s) ** length_penalty)
    new, total = beam_search(model, prompt, n, V ** (n - 1), stop_token=stop, length_penalty=length_penalty)
    assert tuple(new[0].tolist()) == best and total == pytest.approx(endings[best], abs=1e-5)


def test_a_stopped_continuation_competes_by_the_length_rule():
    """The plain sum favours a short continuation that stops (token 2); length_penalty 1, the mean, a longer one."""
    chain = MarkovChain([[1e-9, 0.6, 0.4], [0.5, 0.5, 1e-9], [1 / 3, 1 / 3, 1 / 3]])
    new, total = beam_search(chain, torch.tensor([[0]]), 3, 2, use_cache=False, stop_token=2)
    assert new.tolist() == [[2]] and total == pytest.approx(math.log(0.4))  # beats 0 1 (0.3), and all that follow
    new, total = beam_search(chain, torch.tensor([[0]]), 3, 2, use_cache=False, stop_token=2, length_penalty=1.0)
    assert new.tolist() == [[1, 0, 1]] and total == pytest.approx(math.log(0.6 * 0.5 * 0.6))  # -0.57 a token


@pytest.mark.parametrize("width", [2, 5])
def test_the_cache_changes_nothing_in_beam_search(width):
    torch.manual_seed(width)
    model = sharp(GPT(tiny_model(block_size=8, pos="rope")))  # a cache that followed the wrong beam shows
    prompt = torch.randint(0, 65, (1, 5))
    (cached, cached_total), (full, full_total) = (beam_search(model, prompt, 20, width, use_cache=c) for c in (1, 0))
    assert torch.equal(cached, full) and cached_total == pytest.approx(full_total, abs=1e-4)
    assert cached_total == pytest.approx(total_logprob(model, prompt, cached), abs=1e-4)


@pytest.mark.parametrize("name", ["config.py", "model.py", "utils.py", "optim.py", "sampling.py", "bpe.py"])
def test_the_lesson_imports_nothing_of_the_scripts_machinery_or_tools(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {m.split(".")[0] for m in imported} & {"train", "generate", "machinery", "tools"}
