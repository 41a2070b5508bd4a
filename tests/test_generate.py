"""generate.py and machinery/annotate.py: samples as the sampler draws them (streamed, in a file
under a header, several checkpoints alike), --show_probs's odds replayed, --qa, --beam, and bad
input refused before sampling."""

import ast
import math
import re
import shutil

import pytest
import torch
from conftest import assert_one_line_error, cli, corpus_head, tiny_model, tiny_run, train_run

import generate
import sampling
from config import EOT, SamplerConfig
from machinery import checkpoint
from sampling import Context, beam_search, next_token_probs

ROW = re.compile(r"^(?P<label>.+?) +p=(?P<p>[\d.]+)  H=(?P<h>[\d.]+) bits(?:  top: (?P<top>.*))?$")


def run(capsys, *argv):
    code, out, err = cli(capsys, generate.main, *argv)
    assert code == 0, err
    return out, err


def sampled(path, prompt, seed, max_new_tokens, n=1, stop=True, **sampler):
    """The texts generate.py should print: sampling.generate from the prompt with the seed, cut at
    the stop token."""
    loaded = checkpoint.load_model(path)
    model, tok = loaded.model, loaded.tokenizer
    idx = torch.tensor([tok.encode(prompt)] * n)
    stop = tok.eot_id if stop else None
    generator = torch.Generator().manual_seed(seed)
    out = sampling.generate(
        model, idx, max_new_tokens, SamplerConfig(**sampler), stop_token=stop, generator=generator
    )
    texts = []
    for row in out[:, idx.size(1) :].tolist():
        row = row[: row.index(stop)] if stop in row else row
        texts.append(prompt + tok.decode(row))
    return texts


def rows(text):
    return [m for m in map(ROW.match, text.splitlines()) if m]


def sampler_flags(sampler):
    return [f"--{k}={v}" for k, v in sampler.items()]


def replay(path, prompt, found, distribution):
    """Each printed row against distribution(logits, idx) of a plain forward pass over the whole
    context so far: its p, entropy and alternatives. Returns the tokens' log-probabilities."""
    loaded = checkpoint.load_model(path)
    model, tok = loaded.model, loaded.tokenizer
    ids, logps = tok.encode(prompt), []
    for row in found:
        [token] = tok.encode(ast.literal_eval(row["label"]))
        idx = torch.tensor([ids])
        with torch.no_grad():
            probs = distribution(model(idx)[0][:, -1], idx)[0].double()
        entropy = -(probs * probs.clamp_min(1e-300).log2()).sum().item()
        assert float(row["p"]) == pytest.approx(probs[token].item(), abs=5.1e-4)
        assert float(row["h"]) == pytest.approx(entropy, abs=5.1e-3)
        top = re.findall(r"('.*?'|\".*?\") ([\d.]+)(?:, |$)", row["top"] or "")
        best = probs.topk(len(top))
        assert [tok.encode(ast.literal_eval(label))[0] for label, _ in top] == best.indices.tolist()
        assert [float(p) for _, p in top] == pytest.approx(best.values.tolist(), abs=5.1e-4)
        logps.append(math.log(probs[token].item()))
        ids.append(token)
    return logps


@pytest.fixture(scope="module")
def stopper(trained, tmp_path_factory):
    """The trained model with <|endoftext|>'s embedding 1.5 times the space's: it stops where it
    would write a space."""
    saved = checkpoint.load(trained[0])
    space, eot = saved["tokenizer"]["chars"].index(" "), len(saved["tokenizer"]["chars"])
    for name in ("wte.weight", "lm_head.weight"):
        saved["model"][name] = saved["model"][name].clone()
        saved["model"][name][eot] = 1.5 * saved["model"][name][space]
    path = str(tmp_path_factory.mktemp("stopper") / "stopper.pt")
    checkpoint.save(path, saved)
    return path


def test_the_output_file_holds_every_setting_and_the_exact_text(trained, tmp_path, capsys):
    prompt_file, out = tmp_path / "prompt.txt", tmp_path / "samples.txt"
    prompt_file.write_text("ROMEO:", encoding="utf-8")
    sampler = dict(temperature=0.9, top_k=10, top_p=0.95)
    printed, _ = run(
        capsys,
        trained[0],
        "--prompt_file",
        prompt_file,
        "--seed",
        3,
        "--max_new_tokens",
        30,
        "--num_samples",
        2,
        "--no_stop",
        "--output_file",
        out,
        *sampler_flags(sampler),
    )
    header, body = out.read_text(encoding="utf-8").split("\n\n", 1)
    settings = [
        "seed=3",
        "max_new_tokens=30",
        "num_samples=2",
        "qa=False",
        "no_stop=True",
        "no_cache=False",
        *(f"{k}={v}" for k, v in sampler.items()),
    ]
    for piece in [trained[0], str(prompt_file), "'ROMEO:'", *settings]:
        assert piece in header
    texts = sampled(trained[0], "ROMEO:", 3, 30, n=2, stop=False, **sampler)
    assert texts[0] != texts[1]
    assert body == f"--- sample 1/2 ---\n{texts[0]}\n\n--- sample 2/2 ---\n{texts[1]}\n"
    assert printed.startswith(f"--- sample 1/2 ---\n{texts[0]}\n--- sample 2/2 ---\n{texts[1]}\n")


def test_several_checkpoints_are_sampled_alike_and_another_seed_gives_another_text(
    trained, tmp_path, capsys
):
    copy = tmp_path / "copy.pt"
    argv = ["--prompt", "ROMEO:", "--temperature", 1.0, "--max_new_tokens", 20, "--no_stop"]
    shutil.copy(trained[0], copy)
    printed, _ = run(capsys, trained[0], copy, "--seed", 4, *argv)
    [text] = sampled(trained[0], "ROMEO:", 4, 20, stop=False, temperature=1.0)
    assert printed.count(text) == 2
    assert printed.index(trained[0]) < printed.index(text) < printed.index(str(copy))
    assert run(capsys, copy, "--seed", 4, *argv)[0] == text + "\n"
    assert run(capsys, copy, "--seed", 5, *argv)[0] != text + "\n"


def test_a_single_sample_is_streamed_token_by_token(trained, capsys, monkeypatch):
    pieces, real = [], generate.token_stream

    def watched(*args, **kwargs):  # what is printed by each token's turn
        for step in real(*args, **kwargs):
            yield step
            pieces.append(capsys.readouterr().out)

    monkeypatch.setattr(generate, "token_stream", watched)
    rest, _ = run(
        capsys,
        trained[0],
        "--prompt",
        "ROMEO:",
        "--seed",
        2,
        "--temperature",
        1.0,
        "--max_new_tokens",
        20,
        "--no_stop",
    )
    [text] = sampled(trained[0], "ROMEO:", 2, 20, stop=False, temperature=1.0)
    assert pieces == [text[:7], *text[7:]] and rest == "\n"  # the prompt, then a character a token


@pytest.mark.parametrize(
    "sampler, where",
    [
        (dict(temperature=1.0), "file"),
        (dict(temperature=0.7, top_k=5), "pipe"),
        (dict(temperature=1.3, top_p=0.8), "file"),
        (dict(temperature=0, top_k=3), "pipe"),
    ],
)
def test_show_probs_prints_the_odds_each_token_was_drawn_with(
    trained, tmp_path, capsys, sampler, where
):
    out = tmp_path / "odds.txt"
    to_file = ["--output_file", out] if where == "file" else []
    printed, _ = run(
        capsys,
        trained[0],
        "--prompt",
        "ROMEO:",
        "--max_new_tokens",
        10,
        "--seed",
        3,
        "--show_top",
        3,
        "--no_stop",
        *sampler_flags(sampler),
        *to_file,
    )
    text = out.read_text(encoding="utf-8") if where == "file" else printed
    found = rows(text)
    assert len(found) == 10 and all(row["top"] for row in found)
    config = SamplerConfig(**sampler)
    logps = replay(
        trained[0], "ROMEO:", found, lambda logits, idx: next_token_probs(logits, config, idx)
    )
    mean = float(re.search(r"mean log-probability (-?[\d.]+) nats", text)[1])
    assert mean == pytest.approx(sum(logps) / len(logps), abs=1.1e-3)
    [plain] = sampled(trained[0], "ROMEO:", 3, 10, stop=False, **sampler)
    assert plain + "\n" in text  # the text, as without --show_probs


def test_a_stopped_sample_is_annotated_up_to_its_stop(stopper, tmp_path, capsys):
    out = tmp_path / "odds.txt"
    run(
        capsys,
        stopper,
        "--prompt",
        "ROMEO:",
        "--temperature",
        1.0,
        "--seed",
        1,
        "--num_samples",
        3,
        "--max_new_tokens",
        30,
        "--show_probs",
        "--output_file",
        out,
    )
    texts = sampled(stopper, "ROMEO:", 1, 30, n=3, temperature=1.0)
    label = r"^--- sample \d/3(?: \(stopped at <\|endoftext\|> after (\d+) tokens\))? ---\n"
    blocks = re.split(label, out.read_text(encoding="utf-8"), flags=re.M)[1:]
    stops = [int(n) if n else None for n in blocks[0::2]]
    assert len(set(stops)) > 1  # one sample stopped while the batch went on
    for text, stop, block in zip(texts, stops, blocks[1::2]):
        assert block.startswith(text + "\n")
        labels = [row["label"] for row in rows(block)]
        if stop is not None:
            assert len(text) == 6 + stop and labels[-1] == repr(EOT) and EOT not in labels[:-1]
        assert len(labels) == (30 if stop is None else stop + 1)
        assert f"\n{len(labels)} tokens: " in block


def test_beam_with_show_probs_reports_the_models_odds(trained, tmp_path, capsys):
    out = tmp_path / "beam.txt"
    run(
        capsys,
        trained[0],
        "--prompt",
        "ROMEO:",
        "--beam",
        3,
        "--max_new_tokens",
        8,
        "--show_top",
        2,
        "--output_file",
        out,
    )
    text = out.read_text(encoding="utf-8")
    loaded = checkpoint.load_model(trained[0])
    model, tok = loaded.model, loaded.tokenizer
    prompt = torch.tensor([tok.encode("ROMEO:")])
    new, total = beam_search(Context(model), prompt, 8, 3, stop_token=tok.eot_id)
    logps = replay(
        trained[0], "ROMEO:", rows(text), lambda logits, idx: torch.softmax(logits.float(), dim=-1)
    )
    assert len(logps) == 8 and sum(logps) == pytest.approx(total, abs=1e-4)
    assert "beam=3" in text and f"total log-probability {total:.3f} nats" in text
    assert "\nROMEO:" + tok.decode(new[0].tolist()) + "\n" in text


@pytest.mark.parametrize(
    "target, word",
    [
        ("out.pt", "--output_file"),
        ("./copy.ckpt", "--output_file"),
        ("missing/out.txt", "--output_file"),
        (".", "folder"),
    ],
)
def test_an_output_file_replacing_a_checkpoint_or_unwritable_is_refused_first(
    trained, tmp_path, capsys, target, word
):
    ckpt = tmp_path / "copy.ckpt"
    shutil.copy(trained[0], ckpt)
    code, out, err = cli(
        capsys, generate.main, ckpt, "--max_new_tokens", 5, "--output_file", f"{tmp_path}/{target}"
    )
    assert_one_line_error(code, err, word)
    assert out == "" and ckpt.read_bytes() == open(trained[0], "rb").read()
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("second", ["truncated", "no_prompt_chars"])
def test_every_checkpoint_is_read_and_its_prompt_encoded_before_the_first_is_sampled(
    trained, tmp_path, capsys, second
):
    bad = tmp_path / "second.pt"
    if second == "truncated":
        bad.write_bytes(open(trained[0], "rb").read()[:3000])
    else:  # a vocabulary without R, O, M, E
        saved = checkpoint.load(trained[0])
        chars = saved["tokenizer"]["chars"]
        saved["tokenizer"]["chars"] = [
            c if c not in "ROME" else chr(0x3B1 + i) for i, c in enumerate(chars)
        ]
        checkpoint.save(str(bad), saved)
    code, out, err = cli(
        capsys, generate.main, trained[0], bad, "--prompt", "ROME", "--max_new_tokens", 5
    )
    assert_one_line_error(code, err, str(bad) if second == "truncated" else "prompt")
    assert out == ""


@pytest.mark.parametrize(
    "flags",
    [
        "--top_p 0",
        "--temperature -1",
        "--show_top 30",
        "--beam 0",
        "--length_penalty 1",
        "--beam 2 --num_samples 2",
        "--prompt a --prompt_file p.txt",
        "--beam 2 --temperature 0.5",
        "--beam 2 --top_k 3 --top_p 0.9",
    ],
)
def test_a_bad_flag_is_one_error_line_naming_it(trained, capsys, flags):
    code, out, err = cli(capsys, generate.main, trained[0], *flags.split())
    assert_one_line_error(code, err, flags.split()[-2])
    assert out == ""


def test_characters_the_vocabulary_lacks_are_dropped_from_the_prompt_with_a_warning(
    trained, capsys
):
    printed, err = run(
        capsys, trained[0], "--prompt", "ROMEO€:", "--temperature", 0, "--max_new_tokens", 10
    )
    assert printed == sampled(trained[0], "ROMEO:", 0, 10, temperature=0)[0] + "\n"
    assert err.startswith("warning:") and "€" in err


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A byte-level BPE model (vocabulary 300) trained for a few steps on text with é and ö."""

    folder = tmp_path_factory.mktemp("bpe")
    text = corpus_head(12_000).replace("e", "é").replace("o", "ö")
    (folder / "data.txt").write_text(text, encoding="utf-8")
    run = tiny_run(
        folder / "data.txt", folder / "run", tokenizer="bpe", max_steps=5, eval_interval=5
    )
    train_run(tiny_model(vocab_size=300), run)
    return str(folder / "run" / "best.pt")


def test_a_bpe_model_shows_split_bytes_as_bytes_and_streams_whole_characters(
    bpe_model, tmp_path, capsys
):
    """Sampled nearly uniformly (temperature 1000): many byte tokens that end mid-character, and
    some that join."""
    argv = [
        bpe_model,
        "--prompt",
        "Héllö",
        "--temperature",
        1000,
        "--seed",
        0,
        "--max_new_tokens",
        300,
        "--no_stop",
    ]
    streamed, _ = run(capsys, *argv)
    out = tmp_path / "odds.txt"
    run(capsys, *argv, "--show_probs", "--output_file", out)
    with open(out, encoding="utf-8", newline="") as f:  # the text exactly: a sampled \r stays one
        report = f.read().split(" ---\n", 1)[1]
    assert report.startswith(streamed)  # the text decoded whole, as the stream printed it
    loaded = checkpoint.load_model(bpe_model)
    tok = loaded.tokenizer
    joined = [ch for ch in streamed if ord(ch) > 127 and ch != "\ufffd" and len(tok.encode(ch)) > 1]
    assert joined  # a character made of several tokens
    labels = [ast.literal_eval(row["label"]) for row in rows(report)]
    split = [label for label in labels if isinstance(label, bytes)]
    texts = [label for label in labels if isinstance(label, str)]
    assert len(labels) == 300 and split and not any("\ufffd" in label for label in texts)
    for raw in split:  # each one token's bytes, not a whole character
        assert tok.enc.encode_single_token(raw) < tok.vocab_size
        assert "\ufffd" in raw.decode("utf-8", "replace")
