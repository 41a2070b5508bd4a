"""The GPT (model.py) and its decoding (sampling.py): shapes, causality, initialisation, every
model setting against recomputation and the attention formula, the sampler, generation and beam
search."""

import ast
import itertools
import math
import os
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from conftest import GREEDY, ROOT, tiny_model

import model as model_module
import sampling
from config import GPTConfig, SamplerConfig, TinyLLMError
from model import GPT, MLP, SwiGLU, apply_rope, causal_mask, rope_tables
from sampling import (
    Context,
    beam_search,
    filter_logits,
    generate,
    next_token_probs,
    sample_next,
    token_stream,
)

# The model variants the causality, cache and attention tests run over, from every GPTConfig field.
# A field with choices takes each of them and a bool both values, by themselves; a field with a
# number takes the example value written here (test_every_model_setting_has_an_example names any
# missing), or the settings written here when it needs others (n_head=dict(n_head=4, n_embd=48)).
# Every combination of the choices runs; then each other example once, the rest from BASE.
EXAMPLES = {
    "vocab_size": 50,
    "block_size": 5,
    "n_layer": 3,
    "n_head": dict(n_head=4, n_embd=48),
    "n_embd": 36,
    "dropout": 0.1,
}
BASE = dict(
    vocab_size=65,
    block_size=8,
    n_layer=2,
    n_head=3,
    n_embd=24,
    dropout=0.0,
    bias=True,
    norm="rmsnorm",
    mlp="swiglu",
    pos="rope",
)  # the last choices: the most code runs
CHOICES = [f for f in fields(GPTConfig) if f.metadata["choices"]]  # norm, mlp, pos, and any to come
VARIANTS = [
    dict(zip([f.name for f in CHOICES], values))
    for values in itertools.product(*(f.metadata["choices"] for f in CHOICES))
]
for f in fields(GPTConfig):
    if f.type is bool:
        VARIANTS.append({f.name: not BASE.get(f.name, f.default)})  # BASE's: in the combinations
    elif isinstance(EXAMPLES.get(f.name), dict):  # a value and the settings it needs
        VARIANTS.append(EXAMPLES[f.name])
    elif f.name in EXAMPLES:
        VARIANTS.append({f.name: EXAMPLES[f.name]})


def variant_id(variant):
    return "-".join(f"{name}={value}" for name, value in variant.items())


def test_every_model_setting_has_an_example():
    numbers = {
        f.name for f in fields(GPTConfig) if not f.metadata["choices"] and f.type is not bool
    }
    missing, stale = numbers - EXAMPLES.keys(), EXAMPLES.keys() - numbers
    assert not missing, (
        f"GPTConfig.{', '.join(sorted(missing))} has no example value: add one "
        "to EXAMPLES at the top of tests/test_model.py"
    )
    assert not stale, f"EXAMPLES names {', '.join(sorted(stale))}, which GPTConfig lacks"


def variant_model(variant):
    """A small model of the variant, BASE's settings where it names none, in eval mode. Each
    parameter that starts at one value (a norm's gain, a bias, a new scale at 0) gets a little
    noise: a variant's own parameter then changes what the tests see."""
    torch.manual_seed(0)
    model = GPT(tiny_model(**{**BASE, **variant}))
    with torch.no_grad():
        for p in model.parameters():
            if bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def sharp(model):
    """Attention far from uniform (queries and keys 10 times larger): a key cached wrong shows in
    the logits."""
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
    expected = F.cross_entropy(logits.view(-1, 65), targets.view(-1)).item()
    assert loss.item() == pytest.approx(expected)
    assert abs(loss.item() - math.log(65)) < 0.1


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_a_later_token_never_changes_an_earlier_positions_logits(variant):
    model = variant_model(variant)
    V, T = model.config.vocab_size, model.config.block_size
    idx = torch.randint(0, V, (1, T))
    t = T // 2 + 1  # the token changed
    changed = torch.where(torch.arange(T) == t, (idx + 1) % V, idx)
    before, after = model(idx)[0], model(changed)[0]
    assert torch.allclose(before[0, :t], after[0, :t], atol=1e-6)
    assert not torch.allclose(before[0, t], after[0, t], atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_the_tied_embedding_is_one_tensor_and_the_parameter_count_matches_its_formula(bias):
    V, T, L, C, b = 65, 16, 3, 48, int(bias)
    model = GPT(
        tiny_model(
            vocab_size=V,
            block_size=T,
            n_layer=L,
            n_embd=C,
            n_head=4,
            bias=bias,
            norm="layernorm",
            mlp="gelu",
            pos="learned",
        )
    )
    assert model.lm_head.weight is model.wte.weight
    norm = C + C * b
    attention = 3 * C * C + 3 * C * b + C * C + C * b
    mlp = 4 * C * C + 4 * C * b + 4 * C * C + C * b
    blocks = L * (2 * norm + attention + mlp)
    assert model.num_params() == V * C + T * C + blocks + norm  # the tied matrix once


def test_gpt2_init_starts_the_residual_projections_smaller():
    torch.manual_seed(0)
    L = 8
    model = GPT(tiny_model(n_layer=L, n_embd=128, n_head=4, bias=True))
    for block in model.blocks:
        for layer in (block.attn.c_proj, block.mlp.c_proj):
            assert layer.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
            assert not layer.bias.any()
        for layer in (block.attn.c_attn, block.mlp.c_fc):
            assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(n_embd=30, n_head=4), "n_head"),
        (dict(n_layer=0), "n_layer"),
        (dict(block_size=0), "block_size"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(norm="batchnorm"), "norm"),
        (dict(pos="rope", n_embd=6, n_head=2), "rope"),
        (dict(mlp="relu"), "mlp"),
    ],
)
def test_a_bad_model_config_is_a_tinyllm_error(overrides, name):
    with pytest.raises(TinyLLMError, match=name):
        tiny_model(**overrides)


CALLS = [0, 1, 3, 1, 1, 5, 1, 2, 1, 1, 1]  # tokens added before each call: 5 + 17, past block_size


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_the_cache_and_the_formula_give_recomputations_logits_past_block_size(variant):
    """At every step, one token or several at once, far past block_size: the KV cache's next-token
    logits are recomputation's, and the attention formula (weights kept) gives the fused kernel's,
    with a mask (the cache's) and without one (the causal triangle)."""
    model = sharp(variant_model(variant))
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    runs = {}
    for fused, use_cache in itertools.product((True, False), repeat=2):
        for block in model.blocks:
            block.attn.kept = None if fused else []  # weights kept: the formula as written
        context, end, logits = Context(model, use_cache), 5, []
        for added in CALLS:
            end += added
            logits.append(context.next_logits(tokens[:, :end]))
        runs[fused, use_cache] = torch.stack(logits)
    for (fused, use_cache), logits in runs.items():
        gap = (logits - runs[True, False]).abs().amax(dim=(1, 2))
        wrong = gap.gt(1e-5).nonzero().flatten().tolist()
        assert not wrong, f"fused={fused} cache={use_cache}: calls {wrong}"


def chat(model, turns, sampler, use_cache):
    """A chat: generate 8 tokens, then the user's turn (several tokens at once), then generate on
    with the same Context. Returns (the tokens, the distribution of each generated one)."""
    context, idx, seen = Context(model, use_cache), torch.zeros(2, 0, dtype=torch.long), []
    for turn in turns:
        idx = torch.cat((idx, turn), dim=1)
        generator = torch.Generator().manual_seed(len(seen))
        for token, probs in token_stream(context, idx, 8, sampler, generator=generator):
            idx = torch.cat((idx, token), dim=1)
            seen.append(probs)
    return idx, torch.stack(seen)


@pytest.mark.parametrize(
    "sampler", [GREEDY, SamplerConfig(temperature=1.0, top_k=20)], ids=["greedy", "seeded"]
)
def test_generation_and_a_chat_write_the_same_tokens_with_and_without_the_cache(sampler):
    torch.manual_seed(0)
    model = sharp(GPT(tiny_model(block_size=8, pos="rope")))
    turns = [torch.randint(0, 65, (2, n)) for n in (5, 4, 7)]  # past block_size
    (cached, cached_logits), (full, full_logits) = (chat(model, turns, sampler, c) for c in (1, 0))
    assert cached.shape == (2, 40) and torch.equal(cached, full)
    assert torch.allclose(cached_logits, full_logits, atol=1e-5)


def visible(*args, **kwargs):
    return (causal_mask(*args, device="cpu", **kwargs) == 0).int().tolist()


def test_an_attention_that_keeps_its_weights_runs_the_formula_as_written(monkeypatch):
    model = GPT(tiny_model())
    for block in model.blocks:
        block.attn.kept = []
    monkeypatch.setattr(model_module, "fused_attention", None)  # a call to it would fail
    assert model(torch.randint(0, 65, (1, 8)))[0].shape == (1, 8, 65)


def test_causal_mask_lets_each_query_see_the_keys_up_to_its_position():
    assert visible(3, 3) == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # training: the lower triangle
    assert visible(2, 4) == [[1, 1, 1, 0], [1, 1, 1, 1]]  # the new queries are the last positions
    # the cache's unfilled slots hidden
    assert visible(2, 6, start=2) == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]


def test_rope_turns_each_pair_as_a_complex_number_by_its_positions_angle():
    T, hs = 7, 8
    x = torch.randn(2, 3, T, hs)
    got = apply_rope(x, *rope_tables(T, hs))
    inv_freq = 10000.0 ** (-torch.arange(0, hs, 2).double() / hs)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    pairs = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
    turned = pairs * torch.polar(torch.ones_like(angles), angles)
    expected = torch.stack((turned.real, turned.imag), dim=-1).flatten(-2)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert apply_rope(x.bfloat16(), *rope_tables(T, hs)).dtype == torch.bfloat16


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("width", [32, 160, 384])
def test_swiglu_holds_about_as_many_parameters_as_the_gelu_mlp(width):
    config = tiny_model(n_embd=width, n_head=2)
    assert count(SwiGLU(config)) == pytest.approx(count(MLP(config)), rel=0.05)


def test_attention_stays_float32_under_cpu_bfloat16_autocast(monkeypatch):
    seen, real = [], model_module.fused_attention

    def watched(*args):  # the dtype of every attention's output, where the model calls it
        out = real(*args)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(model_module, "fused_attention", watched)
    torch.manual_seed(0)
    model = GPT(tiny_model(pos="rope"))
    idx = torch.randint(0, 65, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16  # the rest of the forward pass ran in bfloat16
    assert seen and set(seen) == {torch.float32}


# ----------------------------------------------------------------------------- the sampler


# (a sampler, the tokens it keeps of odds 0.5, 0.2, 0.15, 0.1, 0.05), the text so far SO_FAR:
# a new rule is tested by its rows
SO_FAR = torch.tensor([[3, 0, 3]])


def so_far(logits):
    """SO_FAR as the text so far of every row of logits (B, V)."""
    return SO_FAR.expand(logits.size(0), -1)


KEEPS = [
    (SamplerConfig(temperature=1.0), [1, 1, 1, 1, 1]),
    (SamplerConfig(temperature=1.0, top_k=2), [1, 1, 0, 0, 0]),
    (SamplerConfig(temperature=1.0, top_p=0.8), [1, 1, 1, 0, 0]),  # 0.5 + 0.2 < 0.8
    # top_p reads the odds the temperature made: 0.25 / 0.325 > 0.6 alone
    (SamplerConfig(temperature=0.5, top_k=4, top_p=0.6), [1, 0, 0, 0, 0]),
]


@pytest.mark.parametrize("sampler, kept", KEEPS)
def test_each_rule_keeps_its_tokens_of_the_odds(sampler, kept):
    logits = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]).log()
    out = filter_logits(logits, sampler, so_far(logits))
    assert torch.isfinite(out).int().tolist() == [kept]


def test_top_k_keeps_the_k_likeliest_and_any_tied_with_the_kth():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    kept = filter_logits(logits, SamplerConfig(temperature=1.0, top_k=2), so_far(logits))
    assert torch.isfinite(kept).tolist() == [[True, False, True, True, False]]
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    kept = filter_logits(logits, SamplerConfig(temperature=0.5, top_k=7), so_far(logits))
    finite = torch.isfinite(kept)
    assert torch.equal(finite, logits >= logits.topk(7, dim=-1).values[:, -1:])
    assert torch.equal(kept[finite], (logits / 0.5)[finite])  # the temperature's


def test_top_p_keeps_the_smallest_set_reaching_p_and_always_the_likeliest():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    for p, n in ((0.8, 3), (0.6, 2), (1e-9, 1)):  # 0.5 + 0.2 < 0.8 <= 0.85
        kept = filter_logits(
            probs.log(), SamplerConfig(temperature=1.0, top_p=p), so_far(probs.log())
        )
        assert torch.isfinite(kept).tolist() == [[i < n for i in range(5)]], p
    torch.manual_seed(1)
    logits = torch.randn(3, 100)
    for p in (0.1, 0.5, 0.9):
        kept = filter_logits(logits, SamplerConfig(temperature=1.0, top_p=p), so_far(logits))
        for row, keep in zip(F.softmax(logits, dim=-1), torch.isfinite(kept)):
            assert row[keep].sum() >= p - 1e-6 and keep[row.argmax()]
            assert row[keep].sum() - row[keep].min() < p


def test_temperature_0_is_argmax_and_a_seeded_draw_repeats():
    torch.manual_seed(0)
    logits = torch.randn(4, 40) * 3
    argmax = logits.argmax(-1, keepdim=True)
    for greedy in (GREEDY, SamplerConfig(temperature=0, top_k=3)):
        assert torch.equal(
            sample_next(next_token_probs(logits, greedy, so_far(logits)), greedy), argmax
        )
    probs = next_token_probs(logits, SamplerConfig(temperature=0.7), so_far(logits))
    assert torch.allclose(probs, F.softmax(logits / 0.7, dim=-1))
    sampler = SamplerConfig(temperature=0.7, top_k=10)
    probs = next_token_probs(logits, sampler, so_far(logits))
    draws = [sample_next(probs, sampler, torch.Generator().manual_seed(s)) for s in (1, 1, 2, 3)]
    assert torch.equal(draws[0], draws[1])
    assert not (torch.equal(draws[0], draws[2]) and torch.equal(draws[0], draws[3]))
    kept = filter_logits(logits, sampler, so_far(logits))
    assert torch.isfinite(kept.gather(1, draws[2])).all()  # a candidate, always


# ----------------------------------------------------------------------------- generation


class MarkovChain(torch.nn.Module):
    """A stand-in model whose next-token probabilities are a row of a table, by the last token."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table).log()  # (V, V)
        self.config = GPTConfig(vocab_size=len(table), block_size=64, n_layer=1, n_head=1, n_embd=2)

    def forward(self, idx, targets=None, cache=None):
        return self.table[idx], None  # (B, T, V)


def test_a_stop_token_ends_generation_once_every_row_has_made_it():
    table = [[0.6 if j == (i + 1) % 5 else 0.1 for j in range(5)] for i in range(5)]  # i -> i + 1
    chain = MarkovChain(table)
    out = generate(chain, torch.tensor([[1], [4]]), 10, GREEDY, stop_token=3)
    assert out.tolist() == [[1, 2, 3, 4, 0], [4, 0, 1, 2, 3]]  # the first row goes on past its stop
    out = generate(chain, torch.tensor([[1]]), 10, GREEDY, stop_token=3)
    assert out.tolist() == [[1, 2, 3]]


def test_a_sampling_rule_reads_the_prompt_and_every_token_drawn_so_far(monkeypatch):
    seen = []

    def recording(logits, sampler, idx):
        seen.append(idx.tolist())
        return filter_logits(logits, sampler, idx)

    monkeypatch.setattr(sampling, "filter_logits", recording)
    table = [[0.6 if j == (i + 1) % 5 else 0.1 for j in range(5)] for i in range(5)]  # i -> i + 1
    out = generate(MarkovChain(table), torch.tensor([[1, 2], [4, 0]]), 4, GREEDY).tolist()
    assert seen == [[row[: 2 + k] for row in out] for k in range(4)]


def test_generation_builds_no_autograd_graph():
    model = GPT(tiny_model())  # parameters that require gradients
    context, idx, seen = Context(model), torch.zeros(1, 3, dtype=torch.long), []
    for token, probs in token_stream(context, idx, 5, GREEDY):
        seen.append((probs.requires_grad, token.requires_grad))
    assert seen == [(False, False)] * 5
    assert not any(k.requires_grad for k in context.cache.k + context.cache.v)
    out = generate(model, idx, 5, GREEDY)
    assert not out.requires_grad and not out.is_inference()  # a tensor autograd may use later


# ----------------------------------------------------------------------------- beam search


def peaked(seed, vocab_size=65, block_size=8):
    """Far from uniform next-token distributions (the embedding scaled): greedy and beam search can
    disagree."""
    torch.manual_seed(seed)
    model = GPT(tiny_model(vocab_size=vocab_size, block_size=block_size)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(30)
    return model


def total_logprob(model, prompt, new):
    """new's total log-probability after prompt, each token's context recomputed by generation's
    context rule."""
    context, idx, total = Context(model, use_cache=False), prompt, 0.0
    for token in new[0].tolist():
        total += F.log_softmax(context.next_logits(idx)[0].double(), dim=-1)[token].item()
        idx = torch.cat((idx, torch.tensor([[token]])), dim=1)
    return total


def test_beam_width_1_is_greedy():
    model = peaked(0)
    prompt = torch.randint(0, 65, (1, 3))
    new, total = beam_search(Context(model), prompt, 20, 1)  # past block_size 8
    assert torch.equal(new, generate(model, prompt, 20, GREEDY)[:, 3:])
    assert total == pytest.approx(total_logprob(model, prompt, new), abs=1e-4)


@pytest.mark.parametrize("stop, length_penalty", [(None, 0.0), (2, 0.0), (2, 1.0), (2, 2.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_beam_holding_every_candidate_finds_the_brute_force_best(seed, stop, length_penalty):
    V, n = 4, 4
    model = peaked(seed, vocab_size=V, block_size=16)
    prompt = torch.randint(0, V, (1, 2), generator=torch.Generator().manual_seed(seed))
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))  # every continuation (V^n, n)
    with torch.no_grad():
        logits = model(torch.cat((prompt.expand(len(seqs), -1), seqs), 1))[0]
    logp = F.log_softmax(logits.double(), dim=-1)
    steps = logp[:, 1:-1].gather(2, seqs[:, :, None])[:, :, 0]  # (V^n, n)
    endings = {}  # a continuation ends at its first stop token
    for seq, lp in zip(seqs.tolist(), steps):
        cut = seq.index(stop) + 1 if stop in seq else n
        endings[tuple(seq[:cut])] = lp[:cut].sum().item()
    best = max(endings, key=lambda s: endings[s] / len(s) ** length_penalty)
    new, total = beam_search(Context(model), prompt, n, V ** (n - 1), stop, length_penalty)
    assert tuple(new[0].tolist()) == best and total == pytest.approx(endings[best], abs=1e-5)


def test_a_stopped_continuation_competes_by_the_length_rule():
    """The plain sum favours a short continuation that stops (token 2); length_penalty 1, the
    mean, a longer one."""
    chain = MarkovChain([[1e-9, 0.6, 0.4], [0.5, 0.5, 1e-9], [1 / 3, 1 / 3, 1 / 3]])
    start = torch.tensor([[0]])
    context = Context(chain, use_cache=False)
    new, total = beam_search(context, start, 3, 2, stop_token=2)
    assert new.tolist() == [[2]]
    assert total == pytest.approx(math.log(0.4))  # beats 0 1 (0.3), and all that follow
    context = Context(chain, use_cache=False)
    new, total = beam_search(context, start, 3, 2, stop_token=2, length_penalty=1.0)
    assert new.tolist() == [[1, 0, 1]]
    assert total == pytest.approx(math.log(0.6 * 0.5 * 0.6))  # -0.57 a token


@pytest.mark.parametrize("width", [2, 5])
def test_the_cache_changes_nothing_in_beam_search(width):
    torch.manual_seed(width)
    model = sharp(GPT(tiny_model(block_size=8, pos="rope")))  # a cache on the wrong beam shows
    prompt = torch.randint(0, 65, (1, 5))
    cached, cached_total = beam_search(Context(model, use_cache=True), prompt, 20, width)
    full, full_total = beam_search(Context(model, use_cache=False), prompt, 20, width)
    assert torch.equal(cached, full) and cached_total == pytest.approx(full_total, abs=1e-4)
    assert cached_total == pytest.approx(total_logprob(model, prompt, cached), abs=1e-4)


@pytest.mark.parametrize(
    "name",
    ["config.py", "model.py", "utils.py", "muon.py", "sampling.py", "lora.py", "tokenizer.py"],
)
def test_the_lesson_imports_nothing_of_the_scripts_machinery_or_tools(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not {m.split(".")[0] for m in imported} & {"train", "generate", "machinery", "tools"}
