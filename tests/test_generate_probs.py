"""generate.py --show_probs: the odds it prints are the sampler's own, at every step, with and
without the KV cache; the text is the text without the flag; the same seed prints the same
numbers; byte-level tokens that end mid-character are shown honestly."""

import ast
import functools
import math
import re
import sys

import pytest
import torch

from config import Sampler

from conftest import assert_one_line_error, cli, tiny_model_config
import generate
from model import GPT
import sampling
from sampling import next_token_probs, sample_next

from machinery import annotate
from machinery.annotate import Annotator, WholeCharacters, token_label
from deep_dives.bpe import BPETokenizer, GPT2Tokenizer
from machinery.checkpoint import load_model

SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
            dict(temperature=0.9, top_k=8, top_p=0.6), dict(temperature=0, top_k=3)]
ROW = re.compile(r"^(?P<label>.+?) +p=(?P<p>[\d.]+)  H=(?P<h>[\d.]+) bits(?:  top: (?P<top>.*))?$")
ANSI = re.compile(r"\033\[[0-9;]*m")


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The sampling distribution from its definition, in float64 and plain Python: softmax at
    the temperature (1 for greedy), keep the k most likely (and ties), renormalise, keep the
    most likely tokens while the mass before them is below top_p, renormalise."""
    probs = torch.softmax(logits.double() / (temperature or 1.0), dim=-1)
    out = torch.zeros_like(probs)
    for r, row in enumerate(probs.tolist()):
        order = sorted(range(len(row)), key=lambda i: -row[i])
        if top_k:
            order = [i for i in order if row[i] >= row[order[top_k - 1]]]
        mass = sum(row[i] for i in order)
        kept, before = [], 0.0
        for i in order:
            if before >= top_p:
                break
            kept.append(i)
            before += row[i] / mass
        for i in kept:
            out[r, i] = row[i]
    return out / out.sum(dim=-1, keepdim=True)


def entropy(p):
    return -sum(x * math.log2(x) for x in p.tolist() if x > 0)


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_the_distribution_is_the_one_sample_next_draws_from(setting):
    torch.manual_seed(0)
    logits = torch.randn(4, 40) * 3
    so_far = torch.randint(0, 40, (4, 6))  # (B, T): the tokens before these logits
    probs = next_token_probs(logits, Sampler(**setting), so_far)
    assert torch.allclose(probs.double(), reference_probs(logits, **setting), atol=1e-6)
    for seed in range(5):
        draw = functools.partial(sample_next, logits, Sampler(**setting), so_far)
        token = draw(generator=torch.Generator().manual_seed(seed))
        assert torch.equal(token, draw(generator=torch.Generator().manual_seed(seed)))
        if setting["temperature"]:  # the draw is multinomial over exactly these probabilities
            assert torch.equal(token, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)))
        else:  # greedy: the most likely token, and its p is the largest in the temperature-1 distribution
            assert torch.equal(token, logits.argmax(-1, keepdim=True))
            assert torch.equal(probs.gather(1, token)[:, 0], probs.max(-1).values)


class Collected:
    """An annotator that keeps what it is given."""

    def __init__(self):
        self.steps = []

    def add(self, token, probs):
        self.steps.append((token.clone(), probs.clone()))


@pytest.mark.parametrize("use_cache", [True, False])
def test_the_odds_beside_the_sampling_are_the_distribution_of_every_step(use_cache, monkeypatch):
    torch.manual_seed(0)
    gpt = GPT(tiny_model_config(block_size=8, pos="rope")).eval()
    prompt = torch.randint(0, 65, (2, 3))
    for setting in SETTINGS:
        seen, real = [], sampling.sample_next

        def recording(logits, *a, **k):  # the logits each step samples from
            seen.append(logits.clone())
            return real(logits, *a, **k)
        monkeypatch.setattr(sampling, "sample_next", recording)
        collected = Collected()
        def odds(token, logits, idx, sampler=Sampler(**setting)):  # as generate.sample's on_token for --show_probs
            collected.add(token, next_token_probs(logits, sampler, idx))
            befores.append(idx.clone())  # the tokens so far at each step: a rule that looks back reads them
        befores = []
        sampling.generate(gpt, prompt, 20, Sampler(**setting), use_cache=use_cache, generator=torch.Generator().manual_seed(1),
                          on_token=odds)
        steps = collected.steps
        monkeypatch.undo()
        out = sampling.generate(gpt, prompt, 20, Sampler(**setting), use_cache=use_cache, generator=torch.Generator().manual_seed(1))
        plain = out[:, prompt.size(1):].split(1, dim=1)
        assert len(steps) == len(seen) == 20  # 3 + 20 tokens: the context is cropped on the way
        assert all(torch.equal(before, out[:, :prompt.size(1) + i]) for i, before in enumerate(befores))
        for (token, probs), logits, same in zip(steps, seen, plain):
            assert torch.equal(token, same)
            assert torch.allclose(probs.double(), reference_probs(logits, **setting), atol=1e-6)


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("cache", [True, False], ids=["kv_cache", "no_cache"])
def test_the_printed_odds_are_the_samplers(trained, setting, cache, capsys):
    """Replay every printed row with a plain forward over the whole context."""
    path = trained[0] / "best.pt"
    flags = [f"--{k}={v}" for k, v in setting.items()] + ([] if cache else ["--no_cache"])
    code, out, err = cli(capsys, generate.main, path, "--prompt", "ROMEO:", "--max_new_tokens", 10, "--seed", 3,
                         "--show_top", 3, "--no_stop", *flags)
    assert code in (0, None), err
    gpt, tok, _ = load_model(str(path))
    ids, logps = tok.encode("ROMEO:"), []
    rows = [ROW.match(line) for line in out.splitlines() if ROW.match(line)]
    assert len(rows) == 10
    for row in rows:
        token = tok.encode(ast.literal_eval(row["label"]))[0]
        with torch.no_grad():
            ref = reference_probs(gpt(torch.tensor([ids]))[0][:, -1], **setting)[0]  # (V,)
        assert float(row["p"]) == pytest.approx(ref[token].item(), abs=5.1e-4)
        assert float(row["h"]) == pytest.approx(entropy(ref), abs=5.1e-3)
        top = [(tok.encode(ast.literal_eval(label))[0], float(p))
               for label, p in re.findall(r"('.*?'|\".*?\") ([\d.]+)(?:, |$)", row["top"])]
        assert [t for t, _ in top] == ref.topk(3).indices.tolist()
        assert all(p == pytest.approx(ref[t].item(), abs=5.1e-4) for t, p in top)
        logps.append(math.log(ref[token].item()))
        ids.append(token)
    mean = float(re.search(r"mean log-probability (-?[\d.]+) nats", out).group(1))
    assert mean == pytest.approx(sum(logps) / len(logps), abs=1.1e-3)
    assert float(re.search(r"perplexity ([\d.]+)", out).group(1)) == pytest.approx(math.exp(-mean), rel=2e-3)


def samples_in(path):
    """The samples of an output file, each as it follows its label: the text, and with
    --show_probs its rows and summary after it."""
    parts = re.split(r"^--- sample \d+/\d+.*---\n", path.read_text(), flags=re.M)[1:]
    return [part[:-2] if i < len(parts) - 1 else part[:-1] for i, part in enumerate(parts)]  # the blank lines between


def check_same_text(plain, annotated):
    """Each annotated sample is the plain sample's text, then a row per token, then a summary."""
    assert len(plain) == len(annotated)
    for text, notes in zip(plain, annotated):
        assert notes.startswith(text + "\n")
        lines = notes[len(text) + 1:].splitlines()
        assert all(ROW.match(line) for line in lines[:-1]) and len(lines) > 1
        assert re.match(r"\d+ tokens: mean log-probability -?[\d.]+ nats \| perplexity [\d.]+ \| mean entropy",
                        lines[-1])


@pytest.mark.parametrize("extra", [[], ["--num_samples", "3"], ["--qa", "--prompt", "Who art thou?"],
                                   ["--temperature", "0"]], ids=["one", "batch", "qa", "greedy"])
def test_the_same_seed_prints_the_same_text_and_numbers(trained, tmp_path, capsys, extra):
    path, plain, odds, again = trained[0] / "best.pt", tmp_path / "plain.txt", tmp_path / "odds.txt", tmp_path / "2.txt"
    for out, flags in ((plain, []), (odds, ["--show_top", "2"]), (again, ["--show_top", "2"])):
        code, _, err = cli(capsys, generate.main, path, "--max_new_tokens", 40, "--seed", 7, "--output_file", out,
                           *flags, *extra)
        assert code in (0, None), err
    assert odds.read_text() == again.read_text()
    assert len(samples_in(plain)) == (3 if "--num_samples" in extra else 1)
    check_same_text(samples_in(plain), samples_in(odds))


def test_a_streamed_sample_keeps_its_text_in_rows_and_in_colour(trained, capsys, monkeypatch):
    argv = [trained[0] / "best.pt", "--prompt", "ROMEO:", "--max_new_tokens", 60, "--seed", 5, "--no_stop"]
    _, plain, _ = cli(capsys, generate.main, *argv)
    _, rows, _ = cli(capsys, generate.main, *argv, "--show_probs")
    assert ANSI.search(rows) is None  # not a terminal: plain rows
    summary = rows.splitlines()[-1]
    assert rows.endswith(plain + summary + "\n") and summary.startswith("60 tokens: ")
    assert len([line for line in rows.splitlines() if ROW.match(line)]) == 60
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    _, coloured, _ = cli(capsys, generate.main, *argv, "--show_probs")
    legend, rest = coloured.split("\n", 1)
    assert "p >= 0.5" in ANSI.sub("", legend) and ANSI.search(rest)
    assert ANSI.sub("", rest) == plain + summary + "\n"  # the same text, painted, and the same numbers


def test_without_the_flag_nothing_is_computed_for_it(trained, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("annotation work without --show_probs")
    for name in ("entropy_bits", "token_label", "summary"):
        monkeypatch.setattr(annotate, name, refuse)
    monkeypatch.setattr(generate, "Annotator", refuse)
    monkeypatch.setattr(sampling, "next_token_probs", refuse)  # greedy needs no softmax either
    code, out, err = cli(capsys, generate.main, trained[0] / "best.pt", "--max_new_tokens", 20, "--temperature", 0)
    assert code in (0, None) and len(out) > 20, err


def test_a_stopped_sample_is_annotated_up_to_its_stop():
    class Chars:  # a three-token vocabulary: "a", "b", and the stop token
        eot_id = 2

        def decode(self, ids):
            return "".join("ab|"[i] for i in ids)
    notes = Annotator(Chars(), top=2)
    notes.begin([0], n_samples=2, stop=2)
    steps = [([[1], [0]], [[0.3, 0.5, 0.2], [0.6, 0.4, 0.0]]),
             ([[2], [1]], [[0.1, 0.1, 0.8], [0.5, 0.5, 0.0]]),
             ([[2], [0]], [[0.0, 0.0, 1.0], [0.25, 0.75, 0.0]])]  # the batch goes on after sample 1 stopped
    for token, probs in steps:
        notes.add(torch.tensor(token), torch.tensor(probs))
    assert [s.token for s in notes.samples[0]] == [1, 2] and [s.token for s in notes.samples[1]] == [0, 1, 0]
    assert notes.text(0) == "ab" and notes.text(1) == "aaba"
    first = notes.samples[0]
    assert [s.p for s in first] == pytest.approx([0.5, 0.8])
    assert first[0].entropy == pytest.approx(entropy(torch.tensor([0.3, 0.5, 0.2])))
    assert first[0].top == [(1, pytest.approx(0.5)), (0, pytest.approx(0.3))]
    mean = (math.log(0.5) + math.log(0.8)) / 2
    assert f"2 tokens: mean log-probability {mean:.3f} nats | perplexity {math.exp(-mean):.3f}" in notes.report(0)
    assert notes.report(0).splitlines()[2].startswith("'|'")  # the stop token's own row


@pytest.fixture(scope="module")
def byte_level():
    """A byte-level BPE too small to have merged every two-byte character, and a GPT-2
    tokenizer built from it offline (tiktoken would download GPT-2's own files)."""
    bpe = BPETokenizer.train("the café serves crème brûlée " * 20 + "naïve ", 270)
    gpt2 = GPT2Tokenizer.__new__(GPT2Tokenizer)  # skips __init__, the download
    gpt2.enc, gpt2.vocab_size, gpt2.eot_id = bpe.enc, bpe.vocab_size, bpe.eot_id
    return bpe, gpt2


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_byte_tokens_that_end_mid_character_show_their_bytes(byte_level, kind):
    tok = byte_level[0] if kind == "bpe" else byte_level[1]
    ids = tok.encode("ï")  # a character no merge covers: two byte tokens
    assert [tok.enc.decode_single_token_bytes(i) for i in ids] == [b"\xc3", b"\xaf"]
    assert [token_label(tok, i) for i in ids] == ["b'\\xc3'", "b'\\xaf'"]
    assert token_label(tok, tok.encode("a")[0]) == "'a'" and token_label(tok, tok.eot_id) == "'<|endoftext|>'"
    pieces = WholeCharacters(tok)
    assert pieces.add(ids[0], 0.5) is None  # half a character waits for the rest...
    assert pieces.add(ids[1], 0.4) == ("ï", pytest.approx(0.2))  # ...and is shown with the joint probability
    notes = Annotator(tok, colour=True)
    text = "naïve"
    notes.begin([], 1, stop=tok.eot_id)
    for t in tok.encode(text):
        probs = torch.full((1, tok.vocab_size), 0.0)
        probs[0, t] = 0.9
        probs[0, (t + 1) % tok.vocab_size] = 0.1
        notes.add(torch.tensor([[t]]), probs)
    report = notes.report(0)
    assert ANSI.sub("", report).splitlines()[0] == text
    assert annotate.paint("ï", 0.81) in report  # one piece, coloured by 0.9 x 0.9


def test_a_bpe_model_prints_its_odds_and_keeps_its_text(bpe_trained, tmp_path, capsys):
    argv = [bpe_trained, "--prompt", "ROMéO:", "--max_new_tokens", 30, "--seed", 2, "--temperature", 1.5]
    for out, flags in ((tmp_path / "plain.txt", []), (tmp_path / "odds.txt", ["--show_top", 3, "--no_cache"])):
        code, _, err = cli(capsys, generate.main, *argv, "--output_file", out, *flags)
        assert code in (0, None), err
    check_same_text(samples_in(tmp_path / "plain.txt"), samples_in(tmp_path / "odds.txt"))
    _, rows, _ = cli(capsys, generate.main, *argv, "--show_probs")  # streamed
    assert len([line for line in rows.splitlines() if ROW.match(line)]) == 30


def test_show_top_out_of_range_is_one_line_error(trained, capsys):
    for value in ("-1", "21"):
        code, _, err = cli(capsys, generate.main, trained[0] / "best.pt", "--show_top", value)
        assert_one_line_error(code, err, "--show_top")


def test_a_streamed_sample_that_ends_mid_character_shows_its_last_tokens(monkeypatch, capsys):
    tokenizer = BPETokenizer([bytes([i]) for i in range(256)])  # bytes alone: "é" is two tokens, 0xC3 0xA9
    new = [ord("a"), 0xC3]  # the sample ends after the first byte of "é"

    def fake_generate(model, idx, max_new_tokens, sampler, on_token=None, **kwargs):  # the project's, where used
        for token in new:
            on_token(torch.tensor([[token]]), None, None)
        return torch.cat([idx, torch.tensor([new])], dim=1)
    monkeypatch.setattr(generate.sampling, "generate", fake_generate)
    cfg = generate.SampleConfig(max_new_tokens=2)
    samples = generate.sample(None, tokenizer, tokenizer.encode("x"), cfg, Sampler(), torch.device("cpu"), stream=True)
    assert capsys.readouterr().out == samples[0][0] + "\n" == "xa\ufffd\n"  # as an output file has it
