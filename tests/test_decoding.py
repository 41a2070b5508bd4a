"""The decoding step a GPU records and replays (deep_dives/graphs.py): on the CPU the tests record
it with torch.fx instead of a CUDA graph (the seam graphs.recorder), which, like a CUDA graph,
replays the tensor operations of one call and nothing of its Python: a step that kept a Python
number from token to token would replay a stale one. The replayed step must give the tokens of
the plain paths, a recording that fails or disagrees must fall back with one warning, and every
decoding option must agree with brute force on a tiny vocabulary."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from config import GREEDY, Sampler

from conftest import MODEL_VARIANTS, cli, tiny_model_config, variant_id
import generate
from model import GPT
import sampling

from deep_dives import beam, graphs
from machinery.checkpoint import load_model
from machinery.sources import encode_prompt

def fx_record(step, static, keep):
    """A recording of step(static) as torch.fx sees it: its tensor operations, replayed on the
    same tensors (running it once, which Replayed puts back)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    recording = make_fx(lambda token: step(token))(static)
    return lambda: recording(static)


@pytest.fixture
def recorded(monkeypatch):
    """Decoding on the CPU replays a recording, as a GPU does; the recordings made are counted."""
    made = []

    def record(step, static, keep):
        made.append(static.shape)
        return fx_record(step, static, keep)
    monkeypatch.setattr(graphs, "recorder", lambda device: record)
    return made


def decode_three_ways(model, prompt, n, **sampler):
    """The same generation recomputing the context, with the cache stepped as it is, and with the
    cache's step recorded and replayed (the recorded fixture on)."""
    def run(use_cache, replay=None):
        generator = torch.Generator().manual_seed(7)
        return sampling.generate(model, prompt, n, Sampler(**sampler), use_cache=use_cache, generator=generator,
                                 replay=replay)
    return run(False), run(True), run(True, replay=graphs.replayable)


@pytest.mark.parametrize("switches", MODEL_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("sampler", [dict(temperature=0), dict(temperature=1.0, top_k=20, top_p=0.9)],
                         ids=["greedy", "seeded"])
def test_the_replayed_step_gives_the_tokens_of_the_plain_paths(switches, sampler, recorded, capsys):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(block_size=8, **switches)).eval()
    prompt = torch.randint(0, 65, (2, 5))
    full, cached, replayed = decode_three_ways(model, prompt, 30, **sampler)  # 35 > block_size 8: refills
    assert torch.equal(replayed, cached) and torch.equal(replayed, full)
    assert recorded == [(2, 1)]  # recorded once, at the first new token, and replayed across the refills
    assert "warning" not in capsys.readouterr().err  # the replay was used: it agreed with the step


def broken(step, static, keep):
    raise RuntimeError("operation not permitted when stream is capturing")


def wrong(step, static, keep):  # a recording whose replay is off by one in every logit
    replay = fx_record(step, static, keep)
    return lambda: replay() + 1.0


def empty(step, static, keep):  # a recording made on the wrong GPU holds no kernel: replaying it returns
    first = step(static).clone()  # what the step gave when it was recorded, and moves nothing
    return lambda: first


@pytest.mark.parametrize("record, why", [(broken, "recording the decoding step failed (RuntimeError: operation "
                                                  "not permitted when stream is capturing)"),
                                         (wrong, "the recorded decoding step disagrees with the step itself"),
                                         (empty, "the recorded decoding step does not move the cache")],
                         ids=["fails", "disagrees", "replays_nothing"])
def test_a_recording_that_cannot_be_trusted_is_not_used_and_says_so_in_one_line(record, why, monkeypatch, capsys):
    monkeypatch.setattr(graphs, "recorder", lambda device: record)
    torch.manual_seed(0)
    model = GPT(tiny_model_config(block_size=8)).eval()
    prompt = torch.randint(0, 65, (1, 3))
    out = sampling.generate(model, prompt, 20, GREEDY, replay=graphs.replayable)
    assert torch.equal(out, sampling.generate(model, prompt, 20, GREEDY))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"warning: {why}"), err


def test_no_recording_is_made_on_a_cpu_unless_asked():
    assert graphs.recorder(torch.device("cpu")) is None
    step = lambda token: token  # noqa: E731
    assert graphs.replayable(step, torch.zeros(1, 1), keep=[]) is step


# ----------------------------------------------------------------------------- every option against brute force

def peaked(seed, vocab_size, block_size=16):
    torch.manual_seed(seed)
    model = GPT(tiny_model_config(vocab_size=vocab_size, block_size=block_size)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(30)  # far from uniform: greedy and beam search can disagree
    return model


def brute_greedy(model, idx, n, stop=None):
    """Greedy decoding, the whole sequence recomputed at every step (it never outgrows
    block_size here); rows stop together, once every row has produced stop."""
    done = torch.zeros(idx.size(0), dtype=torch.bool)
    for _ in range(n):
        with torch.no_grad():
            token = model(idx)[0][:, -1].argmax(-1, keepdim=True)
        idx = torch.cat((idx, token), dim=1)
        done |= token[:, 0] == stop
        if stop is not None and done.all():
            break
    return idx


@pytest.mark.parametrize("rows", [1, 3])
def test_a_stop_token_ends_generation_as_brute_force_says(rows, recorded):
    model = peaked(1, vocab_size=6)
    prompt = torch.randint(0, 6, (rows, 2), generator=torch.Generator().manual_seed(3))
    free = brute_greedy(model, prompt, 10)
    stop = free[0, 4].item()  # a token row 0 writes third: generation ends there, or where the last row stops
    expected = brute_greedy(model, prompt, 10, stop)
    assert expected.size(1) < free.size(1) or rows > 1
    assert torch.equal(sampling.generate(model, prompt, 10, GREEDY, stop_token=stop), expected)
    assert torch.equal(sampling.generate(model, prompt, 10, GREEDY, stop_token=stop, replay=graphs.replayable), expected)


def every_ending(model, prompt, V, n, stop):
    """(tokens, total log-probability) of every continuation beam search may return: the ones
    that end at their first stop token within n tokens, and the ones of n tokens without one."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))  # (V^n, n)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.cat((prompt.expand(len(seqs), -1), seqs), 1))[0].double(), -1)
    T = prompt.size(1)
    steps = logp[:, T - 1:-1].gather(2, seqs[:, :, None])[:, :, 0]  # (V^n, n)
    endings = {}
    for seq, lp in zip(seqs.tolist(), steps):
        cut = seq.index(stop) + 1 if stop in seq else n
        endings[tuple(seq[:cut])] = lp[:cut].sum().item()
    return endings


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_beam_search_with_a_stop_token_finds_what_brute_force_finds(seed, length_penalty):
    V, n, stop = 4, 4, 2
    model = peaked(seed, vocab_size=V)
    prompt = torch.randint(0, V, (1, 2), generator=torch.Generator().manual_seed(seed))
    endings = every_ending(model, prompt, V, n, stop)
    best = max(endings, key=lambda s: endings[s] / len(s) ** length_penalty)
    new, total = beam.beam_search(model, prompt, n, V ** (n - 1), stop_token=stop, length_penalty=length_penalty)
    assert tuple(new[0].tolist()) == best
    assert total == pytest.approx(endings[best], abs=1e-5)


def test_qa_frames_the_question_and_stops_at_the_end_of_text(trained, capsys, recorded):
    model, tokenizer, _ = load_model(str(trained[0] / "best.pt"))
    question = "Who art thou?"
    ids = torch.tensor([encode_prompt(tokenizer, question, qa=True)])
    new = sampling.generate(model, ids, 60, GREEDY, use_cache=False,
                            stop_token=tokenizer.eot_id)[0, ids.size(1):].tolist()  # the plain path: the context recomputed each step
    new = new[:new.index(tokenizer.eot_id)] if tokenizer.eot_id in new else new
    code, out, _ = cli(capsys, generate.main, trained[0] / "best.pt", "--qa", "--prompt", question,
                       "--temperature", "0", "--max_new_tokens", "60")
    assert code == 0 and out == tokenizer.decode(ids[0, 1:].tolist() + new) + "\n"  # streamed, then one line end
    assert recorded  # generate.py decoded through the recorded step
