"""Tokenizers: BPE training, tiktoken vs the plain-Python reference encoder, round trips,
checkpoint round trips, and the GPT-2 tokenizer (skipped when its files can't be fetched)."""

import hashlib
import os
import tempfile
from collections import Counter

import pytest
import regex
import torch

from config import EOT, TinyLLMError
from conftest import corpus_head
from utils import CharTokenizer, make_tokenizer

from deep_dives.bpe import GPT2_PATTERN, BPETokenizer, GPT2Tokenizer, train_bpe
from machinery.sources import encode_prompt, tokenizer_from_dict

UNICODE_TEXT = ("Café naïve façade — señor Müller.\n"
                "Emoji: 😀🎉 👩‍👩‍👧 ok?\n"
                "中文测试，日本語のテキスト、한국어.\n\n"
                "  indented\ttabs\r\nand trailing spaces   \n")


@pytest.fixture(scope="module")
def corpus():
    return corpus_head(120_000)


@pytest.fixture(scope="module")
def bpe(corpus):
    """A BPE tokenizer trained once on the first 80k characters (vocab 500)."""
    return BPETokenizer.train(corpus[:80_000], 500)


def reference_encode(text, tokens_or_ranks, pattern=GPT2_PATTERN, special_tokens=(EOT,)):
    """Encode with our BPE in plain Python, the slow obvious way; the tests check that
    tiktoken gives exactly these ids. tokens_or_ranks: token bytes in rank order, or a
    {bytes: rank} dict. special_tokens: names (ids follow the ranks) or a {name: id} dict."""
    ranks = tokens_or_ranks if isinstance(tokens_or_ranks, dict) else {t: i for i, t in enumerate(tokens_or_ranks)}
    if not isinstance(special_tokens, dict):
        special_tokens = {s: len(ranks) + i for i, s in enumerate(special_tokens)}
    if special_tokens:  # keep the specials (capturing group) so we can emit their ids
        segments = regex.split("(" + "|".join(regex.escape(s) for s in special_tokens) + ")", text)
    else:
        segments = [text]
    ids = []
    for k, segment in enumerate(segments):
        if k % 2 == 1:  # odd segments are the special tokens themselves
            ids.append(special_tokens[segment])
            continue
        for piece in regex.findall(pattern, segment):
            b = piece.encode("utf-8")
            if b in ranks:  # a whole piece that is a token is one id (tiktoken checks this first)
                ids.append(ranks[b])
                continue
            parts = [bytes([x]) for x in b]
            while len(parts) > 1:
                # merge the adjacent pair whose glued bytes have the lowest rank (leftmost on ties)
                best = None
                for i in range(len(parts) - 1):
                    r = ranks.get(parts[i] + parts[i + 1])
                    if r is not None and (best is None or r < best[0]):
                        best = (r, i)
                if best is None:
                    break
                i = best[1]
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids.extend(ranks[p] for p in parts)
    return ids


def naive_train(text, vocab_size):
    """The textbook trainer: recount every pair from scratch each round. Slow, obviously right."""
    words = Counter(regex.findall(GPT2_PATTERN, text))
    seqs = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}
    tokens = [bytes([b]) for b in range(256)]
    while len(tokens) < vocab_size:
        pairs = Counter()
        for w, seq in seqs.items():
            for p in zip(seq, seq[1:]):
                pairs[p] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, then smallest bytes
        merged = best[0] + best[1]
        if merged not in tokens:
            tokens.append(merged)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return tokens


# ---------------------------------------------------------------- training

def test_training_is_deterministic_and_starts_with_bytes(corpus):
    a = train_bpe(corpus[:50_000], 400)
    b = train_bpe(corpus[:50_000], 400)
    assert a == b
    assert len(a) == 400 - 1  # one slot is the special token
    assert a[:256] == [bytes([i]) for i in range(256)]
    assert len(set(a)) == len(a)
    # every learned token is two earlier tokens glued together
    for rank in range(256, len(a)):
        earlier = set(a[:rank])
        t = a[rank]
        assert any(t[:k] in earlier and t[k:] in earlier for k in range(1, len(t))), t


def test_incremental_counts_match_full_recount(corpus):
    text = corpus[:6_000]
    assert train_bpe(text, 320, special_tokens=()) == naive_train(text, 320)


def test_ties_go_to_the_smallest_byte_pair():
    # pieces "ba" and " dc": every pair occurs once, so the rule alone picks the order
    assert train_bpe("ba dc", 300, special_tokens=())[256:] == [b" d", b" dc", b"ba"]


def test_no_merge_across_special_tokens():
    # split on EOT, the pieces are single letters: nothing to merge, training stops at 256
    tokens = train_bpe(("x" + EOT + "y" + EOT) * 50, 300)
    assert tokens == [bytes([i]) for i in range(256)]


def test_vocab_size_too_small_raises(corpus):
    with pytest.raises(TinyLLMError, match="at least 257"):
        train_bpe(corpus[:1000], 256)
    with pytest.raises(TinyLLMError):
        make_tokenizer("bpe", corpus[:1000], 100)
    assert len(train_bpe(corpus[:1000], 257)) == 256  # the smallest valid size: bytes only


def test_verbose_prints_progress(corpus, capsys):
    train_bpe(corpus[:20_000], 256 + 1 + 200, verbose=True)
    out = capsys.readouterr().out
    assert "bpe merge 100/200" in out and "bpe merge 200/200" in out


# ---------------------------------------------------------------- encoding

def test_tiktoken_matches_reference_on_corpus(bpe, corpus):
    for sample in (corpus[:5_000], corpus[100_000:110_000]):  # seen, and not seen in training
        ids = bpe.encode(sample)
        assert ids == reference_encode(sample, bpe.tokens, bpe.pattern, bpe.special_tokens)
        assert len(ids) < 0.6 * len(sample)  # merges are really used


def test_tiktoken_matches_reference_on_unicode(bpe):
    text = UNICODE_TEXT + EOT + "after the end" + EOT
    ids = bpe.encode(text)
    assert ids == reference_encode(text, bpe.tokens, bpe.pattern, [EOT])
    ranks = {t: i for i, t in enumerate(bpe.tokens)}
    assert ids == reference_encode(text, ranks, bpe.pattern, {EOT: bpe.eot_id})


def test_round_trip_with_unicode_and_eot(bpe):
    assert bpe.vocab_size == 500
    assert bpe.eot_id == 499
    assert bpe.encode(EOT) == [bpe.eot_id]
    text = UNICODE_TEXT + EOT + "Second document.\n"
    ids = bpe.encode(text)
    assert ids.count(bpe.eot_id) == 1
    assert bpe.decode(ids) == text
    k = ids.index(bpe.eot_id)
    assert bpe.decode(ids[:k]) == UNICODE_TEXT
    assert all(0 <= i < bpe.vocab_size for i in ids)


def test_decode_of_a_split_character_does_not_crash(bpe):
    ids = bpe.encode("😀")
    assert len(ids) > 1  # four bytes, never merged in Shakespeare
    assert bpe.decode(ids[:1]) == "\ufffd"


# ---------------------------------------------------------------- saving and loading

def _is_plain(x):
    if isinstance(x, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_is_plain(v) for v in x)
    return isinstance(x, (str, int))


def test_bpe_checkpoint_round_trip(bpe, tmp_path):
    d = bpe.to_dict()
    assert d["kind"] == "bpe" and _is_plain(d)
    path = tmp_path / "tok.pt"
    torch.save({"tokenizer": d}, path)
    loaded = tokenizer_from_dict(torch.load(path, weights_only=True)["tokenizer"])
    assert isinstance(loaded, BPETokenizer)
    assert loaded.tokens == bpe.tokens
    assert loaded.vocab_size == bpe.vocab_size and loaded.eot_id == bpe.eot_id
    text = UNICODE_TEXT + EOT + "Now is the winter of our discontent"
    assert loaded.encode(text) == bpe.encode(text)


def test_char_tokenizer_has_one_end_of_text_id(tmp_path):
    tok = make_tokenizer("char", "hello world" + EOT + "hi", 0)
    assert isinstance(tok, CharTokenizer)
    assert tok.chars == sorted(set("hello worldhi")) and tok.eot_id == len(tok.chars) == tok.vocab_size - 1
    assert tok.encode("hi" + EOT + "h") == [tok.stoi["h"], tok.stoi["i"], tok.eot_id, tok.stoi["h"]]
    assert tok.unknown_chars("hold" + EOT + "z") == ["z"]
    path = tmp_path / "tok.pt"
    torch.save(tok.to_dict(), path)
    loaded = tokenizer_from_dict(torch.load(path, weights_only=True))
    text = "hello" + EOT + "hold"
    assert loaded.encode(text) == tok.encode(text) and loaded.decode(tok.encode(text)) == text


def test_a_prompt_drops_the_characters_a_vocabulary_lacks_but_keeps_its_end_of_text_whole(capsys):
    tok = make_tokenizer("char", "Question: who? 3 4 yes\nAnswer: me" + EOT, 0)  # no <, | or >: only in EOT
    ids = encode_prompt(tok, "is 3 < 4? |yes|", qa=True)
    assert ids[0] == tok.eot_id and tok.decode(ids) == EOT + "Question: is 3  4? yes\nAnswer:"
    assert "dropped characters" in capsys.readouterr().err


def test_unknown_kinds_raise():
    with pytest.raises(TinyLLMError, match="unknown tokenizer"):
        make_tokenizer("wordpiece", "abc", 300)
    with pytest.raises(TinyLLMError, match="unknown tokenizer kind"):
        tokenizer_from_dict({"kind": "wordpiece"})


def test_make_tokenizer_bpe(corpus):
    tok = make_tokenizer("bpe", corpus[:20_000], 300)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    assert tok.decode(tok.encode(corpus[:500])) == corpus[:500]


# ---------------------------------------------------------------- GPT-2

GPT2_FILES = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
              "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")


def gpt2_files_cached():
    """Whether tiktoken has GPT-2's files on disk, found the way tiktoken looks for them (a cache
    folder, each file named by the SHA-1 of its address) without touching the network."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR",
                                                                os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    return bool(cache) and all(os.path.isfile(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
                               for url in GPT2_FILES)


@pytest.mark.skipif(not gpt2_files_cached(), reason="tiktoken's GPT-2 files are not cached here; tests never fetch them")
def test_gpt2_tokenizer():
    tok = GPT2Tokenizer()  # with the files on disk, any failure here is a real one
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    ids = tok.encode("Hello world" + EOT)
    assert ids[-1] == 50256 and tok.decode(ids) == "Hello world" + EOT
    assert tokenizer_from_dict(tok.to_dict()).encode("Hello world") == ids[:-1]


def test_gpt2_offline_raises_a_clear_error(monkeypatch):
    def offline():
        raise ConnectionError("no network")
    from deep_dives import bpe
    monkeypatch.setattr(bpe, "gpt2_encoding", offline)
    for build in (GPT2Tokenizer, lambda: make_tokenizer("gpt2", "", 0), lambda: tokenizer_from_dict({"kind": "gpt2"})):
        with pytest.raises(TinyLLMError) as err:
            build()
        msg = str(err.value)
        assert "GPT-2" in msg and "--tokenizer bpe" in msg and "\n" not in msg


def test_bpe_without_a_vocab_size_learns_the_default_vocabulary(tmp_path, capsys):
    from config import BPE_VOCAB_SIZE
    import train
    from conftest import TINY_FLAGS, cli, write_head
    data = write_head(tmp_path / "data.txt", 60_000)  # enough text for every merge
    code, out, err = cli(capsys, train.main, "--tokenizer", "bpe", "--data", data, "--out_dir", tmp_path / "run",
                         *TINY_FLAGS, "--max_steps", "1")
    assert code in (0, None), err
    assert f"vocab {BPE_VOCAB_SIZE}" in out
