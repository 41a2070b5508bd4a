"""Beam search: width 1 is greedy, the cache changes nothing, a beam that holds every candidate
finds what exhaustive enumeration says is the most probable continuation, a narrower one never
scores below greedy, a stopped continuation competes by the documented length rule, and the
command line composes with the rest of generate.py."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import generate
from config import GREEDY, GPTConfig
from conftest import assert_one_line_error, cli, float32_sum_tolerance, tiny_model_config
from model import GPT
import sampling

from deep_dives import beam
from machinery.annotate import model_odds

COMBINATIONS = [dict(pos="learned"), dict(pos="rope", mlp="swiglu", norm="rmsnorm"), dict(pos="sinusoidal")]


def peaked_gpt(seed, vocab_size=65, block_size=8, **switches):
    """A tiny GPT whose next-token distributions are far from uniform (random weights, scaled),
    so that greedy, beam and exhaustive search can disagree."""
    torch.manual_seed(seed)
    model = GPT(tiny_model_config(vocab_size=vocab_size, block_size=block_size, **switches)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(30)
    return model


def total_logprob(model, prompt, new):
    """The total log-probability of new (1, n) after prompt (1, T) under the model, with
    generation's context rule (machinery.annotate.model_odds)."""
    return sum(math.log(probs[0, token[0, 0]].item()) for token, probs in model_odds(model, prompt, new))


@pytest.mark.parametrize("switches", COMBINATIONS, ids=lambda s: s["pos"])
def test_beam_1_is_greedy_token_for_token(switches):
    model = peaked_gpt(0, **switches)
    prompt = torch.randint(0, 65, (1, 3))
    greedy = sampling.generate(model, prompt, 30, GREEDY)[:, 3:]  # past block_size 8: the context restarts
    new, total = beam.beam_search(model, prompt, 30, beam_width=1)
    assert torch.equal(new, greedy)
    assert total == pytest.approx(total_logprob(model, prompt, new), abs=1e-4)


@pytest.mark.parametrize("width", [2, 4, 7])
@pytest.mark.parametrize("block_size", [8, 32], ids=["restarts", "one_cache"])  # 25 tokens: refills, or none
def test_the_cache_changes_nothing(width, block_size):
    for seed in range(3):
        # not peaked_gpt: there the scaled embeddings drown attention, and a cache that follows
        # the wrong parent beam would change nothing measurable
        torch.manual_seed(seed)
        model = GPT(tiny_model_config(vocab_size=65, block_size=block_size, pos="rope")).eval()
        prompt = torch.randint(0, 65, (1, 5))
        cached = beam.beam_search(model, prompt, 25, width, use_cache=True)
        full = beam.beam_search(model, prompt, 25, width, use_cache=False)
        assert torch.equal(cached[0], full[0]) and cached[1] == pytest.approx(full[1], abs=float32_sum_tolerance(25, full[1]))


def every_continuation(model, prompt, vocab_size, n):
    """{continuation: total log-probability} of every one of the vocab_size ** n continuations,
    in one forward pass over all of them."""
    seqs = torch.tensor(list(itertools.product(range(vocab_size), repeat=n)))  # (V^n, n)
    idx = torch.cat((prompt.expand(len(seqs), -1), seqs), dim=1)
    with torch.no_grad():
        logp = F.log_softmax(model(idx)[0].double(), dim=-1)  # (V^n, T + n, V)
    T = prompt.size(1)
    totals = logp[:, T - 1:-1].gather(2, seqs[:, :, None])[:, :, 0].sum(1)  # (V^n,)
    return seqs, totals


@pytest.mark.parametrize("seed", range(4))
def test_a_beam_that_holds_every_candidate_finds_the_most_probable_continuation(seed):
    V, n = 5, 4  # 625 continuations; a beam of 5 ** 3 keeps every prefix
    model = peaked_gpt(seed, vocab_size=V, block_size=16)
    prompt = torch.randint(0, V, (1, 3))
    seqs, totals = every_continuation(model, prompt, V, n)
    new, total = beam.beam_search(model, prompt, n, beam_width=V ** (n - 1))
    assert torch.equal(new[0], seqs[totals.argmax()])
    assert total == pytest.approx(totals.max().item(), abs=float32_sum_tolerance(n, total))
    greedy = sampling.generate(model, prompt, n, GREEDY)[:, 3:]
    for width in (1, 2, 3, 5, 10):  # narrower beams: never below greedy, never above the best
        _, narrow = beam.beam_search(model, prompt, n, beam_width=width)
        slack = float32_sum_tolerance(n, total)
        assert total_logprob(model, prompt, greedy) - slack <= narrow <= total + slack


class MarkovChain(torch.nn.Module):
    """A stand-in model whose next-token logits depend only on the last token (a table),
    for beam search's stop rule: token 2 is the stop token."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table).log()  # (V, V) probabilities -> logits
        self.config = GPTConfig(vocab_size=len(table), block_size=64, n_layer=1, n_head=1, n_embd=2)

    def forward(self, idx, targets=None, cache=None):
        return self.table[idx], None  # (B, T, V)


def test_a_stopped_continuation_competes_by_the_length_rule():
    chain = MarkovChain([[0.0, 0.4, 0.6], [0.0, 0.99, 0.01], [1 / 3, 1 / 3, 1 / 3]])  # from 0: stop at 0.6
    prompt = torch.tensor([[0]])
    new, total = beam.beam_search(chain, prompt, 3, beam_width=2, stop_token=2)
    assert new.tolist() == [[2]] and total == pytest.approx(math.log(0.6))  # the plain sum: stopping wins
    new, total = beam.beam_search(chain, prompt, 3, beam_width=2, stop_token=2, length_penalty=1.0)
    assert new.tolist() == [[1, 1, 1]]  # per token, the longer one wins: -0.94 / 3 > -0.51 / 1
    assert total == pytest.approx(math.log(0.4) + 2 * math.log(0.99))
    new, _ = beam.beam_search(chain, prompt, 3, beam_width=2)  # no stop token: every continuation runs to the end
    assert new.size(1) == 3


# ----------------------------------------------------------------------------- the command line

def test_the_command_line_finds_the_same_continuation_whatever_the_seed(trained, capsys):
    path = trained[0] / "best.pt"
    outs = [cli(capsys, generate.main, path, "--prompt", "ROMEO:", "--max_new_tokens", 40, "--beam", 3, "--seed", s)
            for s in (1, 2)]
    assert outs[0][0] in (0, None) and outs[0][1] == outs[1][1] and outs[0][1].startswith("ROMEO:")
    greedy = cli(capsys, generate.main, path, "--prompt", "ROMEO:", "--max_new_tokens", 40, "--temperature", 0)
    beam_1 = cli(capsys, generate.main, path, "--prompt", "ROMEO:", "--max_new_tokens", 40, "--beam", 1, "--no_cache")
    assert greedy[1] == beam_1[1]


def test_beam_odds_are_the_models_and_the_total_is_the_searchs(trained, tmp_path, capsys):
    from machinery.checkpoint import load_model
    path, out = trained[0] / "best.pt", tmp_path / "beam.txt"
    code, _, err = cli(capsys, generate.main, path, "--prompt", "ROMEO:", "--max_new_tokens", 12, "--beam", 4,
                       "--show_top", 2, "--output_file", out)
    assert code in (0, None), err
    text = out.read_text()
    assert "beam=4 length_penalty=0.0" in text
    model, tok, _ = load_model(str(path))
    prompt = torch.tensor([tok.encode("ROMEO:")])
    new, total = beam.beam_search(model, prompt, 12, 4, stop_token=tok.eot_id)
    printed = [float(p) for p in __import__("re").findall(r" p=([\d.]+) ", text)]
    expected = [probs[0, token[0, 0]].item() for token, probs in model_odds(model, prompt, new)]
    assert printed == pytest.approx(expected, abs=5.1e-4)
    assert f"total log-probability {total:.3f} nats" in text
    assert tok.decode(new[0].tolist()) in text


@pytest.mark.parametrize("flags, words", [
    (["--beam", "0"], "--beam must be at least 1"),
    (["--beam", "4", "--temperature", "0.5"], "--temperature"),
    (["--beam", "4", "--top_p", "0.9", "--top_k", "3"], "--top_k, --top_p"),
    (["--beam", "2", "--num_samples", "3"], "--num_samples"),
    (["--length_penalty", "1"], "--beam only"),
])
def test_beam_with_flags_that_contradict_it_is_one_line_error(trained, capsys, flags, words):
    code, _, err = cli(capsys, generate.main, trained[0] / "best.pt", *flags)
    assert_one_line_error(code, err, words)


def test_a_bpe_model_beams_too(bpe_trained, capsys):
    code, out, err = cli(capsys, generate.main, bpe_trained, "--prompt", "ROMéO:", "--max_new_tokens", 8, "--beam", 3)
    assert code in (0, None) and out.startswith("ROMéO:"), err
