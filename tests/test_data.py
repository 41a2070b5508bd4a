"""The data path: the char tokenizer, the 90/10 split and batches; every source read_corpus reads
and its errors; BPE; tools.prepare's memory-mapped folders; prompts."""

import errno
import hashlib
import json
import os
import tempfile
from collections import Counter

import numpy as np
import pytest
import regex
import torch
from conftest import TINY_FLAGS, assert_one_line_error, cli, corpus_head

import generate
import tokenizer as tokenizers
import train
from config import ASSISTANT, EOT, USER, TinyLLMError, TrainConfig
from machinery.checkpoint import load
from machinery.sources import (
    clean_text,
    encode_prompt,
    iter_documents,
    load_prepared,
    prepared_meta,
    read_corpus,
)
from tokenizer import GPT2_PATTERN, BPETokenizer, CharTokenizer, GPT2Tokenizer, from_dict, train_bpe
from tools import prepare
from utils import get_batch, split_train_val

CPU = torch.device("cpu")
UNICODE = "Café naïve — Müller 😀🎉 👩‍👩‍👧 中文测试，日本語 한국어\n  tabs\tand   spaces  \n"


def corpus(path, **settings):
    return read_corpus(TrainConfig(data=str(path), **settings), vocab_size=300)  # (bpe's)


def stream(tokenizer, *splits):
    """The text the token streams (tensors or memmaps) spell, end to end."""
    ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in splits])
    return tokenizer.decode(ids.tolist())


def train_cli(capsys, data, out, *flags):
    flags = (*TINY_FLAGS, "--data", data, "--out_dir", out, "--max_steps", "2", *flags)
    return cli(capsys, train.main, *flags)


def prepare_cli(capsys, source, out, *flags):
    return cli(capsys, prepare.main, "--input", source, "--out", out, *flags)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------ chars, split, batches


def test_char_tokenizer_round_trip_with_end_of_text_as_one_id_after_the_characters():
    tok = CharTokenizer.from_text("hello world" + EOT + "hi\n")
    assert tok.chars == sorted(set("hello worldhi\n"))
    assert tok.eot_id == len(tok.chars) == tok.vocab_size - 1
    assert tok.encode("hi" + EOT + "h") == [tok.stoi["h"], tok.stoi["i"], tok.eot_id, tok.stoi["h"]]
    text = "hold " + EOT + EOT + "\nworld"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("special", [EOT, USER])
def test_split_is_contiguous_90_10_and_never_cuts_a_special_token(special):
    text = "".join(chr(65 + i % 26) for i in range(1000))
    assert split_train_val(text) == (text[:900], text[900:])
    for start in range(885, 902):  # the cut at 900 falls before, inside or after the token
        text = "a" * start + special + "b" * (1000 - start - len(special))
        train_part, val_part = split_train_val(text)
        assert train_part + val_part == text, start
        assert train_part.count(special) + val_part.count(special) == 1, start
        assert abs(len(train_part) - 900) <= len(special), start


def test_batch_targets_are_inputs_shifted_by_one_and_reach_the_last_token():
    data, seen = torch.arange(20), set()
    torch.manual_seed(0)
    for _ in range(100):
        x, y = get_batch(data, 4, 8, CPU)
        assert x.shape == y.shape == (4, 8) and torch.equal(y, x + 1)
        seen.update(y.flatten().tolist())
    assert 19 in seen and 0 not in seen


def test_memmap_batches_equal_in_memory_batches(tmp_path):
    ids = np.random.default_rng(0).integers(0, 3000, size=2000).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    on_disk = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r")
    for seed in range(3):
        torch.manual_seed(seed)
        a = get_batch(on_disk, 8, 32, CPU)
        torch.manual_seed(seed)
        b = get_batch(torch.from_numpy(ids.astype(np.int64)), 8, 32, CPU)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].dtype == torch.int64


# ----------------------------------------------------------------------------------------- sources


def test_a_text_file_is_its_text_split_90_10(tmp_path):
    text = corpus_head(2000)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    c = corpus(tmp_path / "a.txt")
    assert c.tokenizer.decode(c.train.tolist()) == text[:1800]
    assert stream(c.tokenizer, c.train, c.val) == text


def test_a_folder_is_searched_recursively_for_the_data_ext_endings_skipping_hidden_files(tmp_path):
    for name, text in (
        ("a.md", "alpha"),
        ("deep/b.PY", "beta"),
        ("deep/skip.txt", "ZZZ"),
        (".hid.md", "QQQ"),
        (".git/c.md", "QQQ"),
        ("deep/.cache/d.md", "QQQ"),
    ):
        (tmp_path / "notes" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "notes" / name).write_text(text)
    c = corpus(tmp_path / "notes", data_ext=".md, .py")
    assert stream(c.tokenizer, c.train, c.val) == EOT + "alpha" + EOT + "beta" + EOT


def test_jsonl_texts_and_qa_records_are_documents_joined_by_end_of_text(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    (tmp_path / "qa.json").write_text(json.dumps([{"question": " Hi? ", "answer": "Hello. "}] * 2))
    c = corpus(tmp_path / "d.jsonl")
    assert stream(c.tokenizer, c.train, c.val) == EOT + "one" + EOT + "two" + EOT
    c = corpus(tmp_path / "qa.json")
    assert stream(c.tokenizer, c.train, c.val) == EOT + (f"{USER}Hi?\n{ASSISTANT}Hello." + EOT) * 2


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("d.jsonl", '{"text": "fine"}\n{"body": "no text"}\n', ["line 2"]),
        ("d.jsonl", '{"text": "fine"}\n["not an object"]\n', ["line 2"]),
        ("d.jsonl", '{"text": "fine"}\n{"text": 5}\n', ["line 2"]),
        (
            "qa.json",
            '[{"question": "Hi?", "answer": "Yes."}, {"id": 7, "question": "No?"}]',
            ["record 2"],
        ),
        ("qa.json", '[{"question": "Hi?", "answer": "Yes."}, "a string"]', ["record 2"]),
        ("qa.json", '{"question": "Hi?", "answer": "not in a list"}', ["list"]),
        ("qa.json", '[{"question": "Hi?"', ["JSON"]),
    ],
)
def test_a_bad_record_is_one_error_line_naming_it(tmp_path, capsys, name, content, words):
    (tmp_path / name).write_text(content)
    with pytest.raises(TinyLLMError):
        corpus(tmp_path / name)
    code, _, err = train_cli(capsys, tmp_path / name, tmp_path / "run")
    assert_one_line_error(code, err, name, *words)


def test_invalid_json_in_a_jsonl_file_names_its_line(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n\n{"text": "ok"}\n{oops\n')
    code, _, err = train_cli(capsys, tmp_path / "d.jsonl", tmp_path / "run")
    assert_one_line_error(code, err, "d.jsonl", "line 4")


def test_a_byte_order_mark_is_not_text(tmp_path):
    qa = json.dumps([{"question": "Hi?", "answer": "Yes."}])
    (tmp_path / "qa.json").write_text(qa, encoding="utf-8-sig")
    c = corpus(tmp_path / "qa.json")
    assert stream(c.tokenizer, c.train, c.val) == EOT + f"{USER}Hi?\n{ASSISTANT}Yes." + EOT
    (tmp_path / "a.txt").write_text("To be or not to be\n" * 5, encoding="utf-8-sig")
    c = corpus(tmp_path / "a.txt")
    assert "\ufeff" not in c.tokenizer.chars
    assert stream(c.tokenizer, c.train, c.val) == "To be or not to be\n" * 5


def test_crlf_and_lf_give_the_same_tokens_and_split_in_memory_and_prepared(tmp_path, capsys):
    text = (corpus_head(2500) + UNICODE) * 2
    (tmp_path / "lf.txt").write_bytes(text.encode())
    (tmp_path / "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode())
    (tmp_path / "bom_crlf.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    lf = corpus(tmp_path / "lf.txt")
    for name in ("lf", "crlf", "bom_crlf"):
        c = corpus(tmp_path / f"{name}.txt")
        assert c.tokenizer.chars == lf.tokenizer.chars
        assert torch.equal(c.train, lf.train) and torch.equal(c.val, lf.val)
        assert prepare_cli(capsys, tmp_path / f"{name}.txt", tmp_path / name)[0] == 0
        for split in ("train.bin", "val.bin"):
            same = (tmp_path / name / split).read_bytes() == (tmp_path / "lf" / split).read_bytes()
            assert same, (name, split)
    meta = json.loads((tmp_path / "bom_crlf" / "meta.json").read_text())
    assert meta["tokenizer"] == lf.tokenizer.to_dict()
    prepared = load_prepared(str(tmp_path / "lf"))  # the same split as in memory, non-ASCII too
    assert prepared.val.tolist() == lf.val.tolist() and prepared.train.tolist() == lf.train.tolist()


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_a_folder_of_non_ascii_files_splits_as_in_memory_when_prepared(tmp_path, capsys, tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):  # the cut falls in the last file, after two of other lengths
        text = UNICODE * (i + 1) + corpus_head(1500 * (i + 1))
        (folder / f"{i}.txt").write_text(text, encoding="utf-8")
    in_memory = corpus(folder, tokenizer=tokenizer)
    flags = ("--tokenizer", tokenizer, "--vocab_size", 300)
    assert prepare_cli(capsys, folder, tmp_path / "out", *flags)[0] == 0
    prepared = load_prepared(str(tmp_path / "out"))
    assert prepared.train.tolist() == in_memory.train.tolist()
    assert prepared.val.tolist() == in_memory.val.tolist()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_extend_grows_a_tokenizer_by_new_characters_and_chat_tokens_keeping_old_ids(tmp_path, kind):
    (tmp_path / "a.txt").write_text(corpus_head(3000))
    old = corpus(tmp_path / "a.txt", tokenizer=kind).tokenizer
    messages = [{"role": "user", "content": "Жук?"}, {"role": "assistant", "content": "Да"}]
    chat = {"messages": messages}
    (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps({"text": "hello"}))
    cfg = TrainConfig(data=str(tmp_path / "c.jsonl"))
    with pytest.raises(TinyLLMError):
        read_corpus(cfg, old)
    c = read_corpus(cfg, old, grow=True)
    new = c.tokenizer
    added = [new.decode([i]) for i, old_id in enumerate(c.old_ids) if old_id is None]
    assert added == (sorted("ЖукДа") if kind == "char" else []) + [USER, ASSISTANT]
    assert new.vocab_size == len(c.old_ids) == old.vocab_size + len(added)
    for new_id, old_id in enumerate(c.old_ids):
        if old_id is not None:
            assert new.decode([new_id]) == old.decode([old_id])
    assert stream(new, c.train, c.val) == EOT + f"{USER}Жук?\n{ASSISTANT}Да{EOT}hello{EOT}"


def test_clean_normalises_whitespace_and_drops_duplicate_documents(tmp_path):
    texts = ["Hello   world  \r\n\n\n\nagain", "unique", "Hello world\n\nagain\n", "unique"]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    c = corpus(tmp_path / "d.jsonl", clean=True)
    assert stream(c.tokenizer, c.train, c.val) == f"{EOT}Hello world\n\nagain{EOT}unique{EOT}"
    c = corpus(tmp_path / "d.jsonl")
    assert stream(c.tokenizer, c.train, c.val).count(EOT) == 5


def test_clean_reads_a_large_text_in_pieces_without_joining_lines_at_their_seams(tmp_path):
    line = "a" + " " * 30 + "b   \n"  # 36 characters: the 2**20th falls in a run of spaces
    text = line * (2**21 // len(line))
    (tmp_path / "big.txt").write_text(text)
    pieces = list(iter_documents(str(tmp_path / "big.txt"), clean=True))
    assert len(pieces) >= 2
    assert "".join(pieces) == clean_text(text) == "a b\n" * (2**21 // len(line))


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("latin1.txt", "café ".encode("latin-1") * 100, ["latin1.txt", "UTF-8"]),
        ("docs/b.txt", b"fine " * 100 + b"\xff", ["b.txt", "UTF-8"]),  # a folder's file
        ("missing.txt", None, ["missing.txt", "not found"]),
        ("blank.txt", b" \r\n\n", ["empty"]),
        ("docs/a.md", b"no .txt here", ["--data_ext"]),
        # val: 15 tokens, a window 17
        ("short.txt", corpus_head(150).encode(), ["validation", "block_size 16"]),
    ],
)
def test_unusable_data_is_one_error_line_before_any_training(
    tmp_path, capsys, name, content, words
):
    if content is not None:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)
    data = tmp_path / name.split("/")[0]
    code, out, err = train_cli(capsys, data, tmp_path / "run")
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


# --------------------------------------------------------------------------------------------- BPE


def reference_bpe(text, n_tokens):
    """Textbook BPE, recounting every pair each round: the most frequent pair, a tie to the
    smallest byte pair, merged left to right; words never span an <|endoftext|>."""
    words = Counter(w for chunk in text.split(EOT) for w in regex.findall(GPT2_PATTERN, chunk))
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    tokens = [bytes([b]) for b in range(256)]
    while len(tokens) < n_tokens:
        pairs = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        tokens += [best[0] + best[1]] if best[0] + best[1] not in tokens else []
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                hit = i + 1 < len(seq) and (seq[i], seq[i + 1]) == best
                out.append(best[0] + best[1] if hit else seq[i])
                i += 2 if hit else 1
            seqs[w] = out
    return tokens


@pytest.fixture(scope="module")
def bpe_tok():
    return BPETokenizer(train_bpe(corpus_head(20_000) + UNICODE, 400))


def test_bpe_training_is_deterministic_and_starts_with_the_256_bytes():
    text = corpus_head(10_000)
    tokens = train_bpe(text, 350)
    assert tokens == train_bpe(text, 350) and len(tokens) == 349 and len(set(tokens)) == 349
    assert tokens[:256] == [bytes([b]) for b in range(256)]


def test_bpe_matches_a_plain_reference_bpe():
    text = corpus_head(3000) + EOT + UNICODE * 3 + EOT + "aaaa abab aaab"
    assert train_bpe(text, 330) == reference_bpe(text, 329)
    learned = train_bpe("ba dc", 300, special_tokens=())[256:]
    assert learned == reference_bpe("ba dc", 300)[256:] == [b" d", b" dc", b"ba"]


def test_no_merge_crosses_a_special_token():
    text = ("ab" + EOT + "cd" + EOT) * 50
    tok = BPETokenizer(train_bpe(text, 300))
    assert {bytes(t) for t in tok.tokens[256:]} == {b"ab", b"cd"}
    assert tok.encode("ab" + EOT) == [256 + tok.tokens[256:].index(b"ab"), tok.eot_id]


def test_bpe_round_trips_unicode_and_end_of_text(bpe_tok):
    assert bpe_tok.vocab_size == 400 and bpe_tok.eot_id == 399 and bpe_tok.encode(EOT) == [399]
    text = UNICODE + EOT + "Second document, नमस्ते.\n" + EOT
    ids = bpe_tok.encode(text)
    assert ids.count(399) == 2 and bpe_tok.decode(ids) == text and len(ids) < len(text.encode())


def test_decoding_a_split_character_never_crashes(bpe_tok):
    ids = bpe_tok.encode("😀")
    assert len(ids) > 1 and bpe_tok.decode(ids[:1]) == "\ufffd"
    for i in range(len(ids)):
        assert all(isinstance(bpe_tok.decode(ids[i:j]), str) for j in range(i, len(ids) + 1))


def test_to_dict_and_tokenizer_from_dict_round_trip(bpe_tok, tmp_path):
    char = CharTokenizer.from_text("hello" + EOT)
    text = UNICODE + EOT + "hello"
    for tok, sample in ((bpe_tok, text), (char, "hole" + EOT + "hell")):
        torch.save(tok.to_dict(), tmp_path / "tok.pt")
        loaded = from_dict(torch.load(tmp_path / "tok.pt", weights_only=True))
        assert type(loaded) is type(tok) and loaded.to_dict() == tok.to_dict()
        assert loaded.eot_id == tok.eot_id and loaded.encode(sample) == tok.encode(sample)
        assert loaded.decode(tok.encode(sample)) == sample


def test_a_bpe_vocabulary_too_small_is_one_error(tmp_path, capsys):
    assert train_bpe("abc", 257) == [bytes([b]) for b in range(256)]  # the bytes and <|endoftext|>
    (tmp_path / "a.txt").write_text(corpus_head(1000))
    flags = ("--tokenizer", "bpe", "--vocab_size", "256")
    code, _, err = prepare_cli(capsys, tmp_path / "a.txt", tmp_path / "out", *flags)
    assert_one_line_error(code, err, "257")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_the_gpt2_tokenizer_offline_is_one_clear_error(monkeypatch, tmp_path, capsys):
    real = tokenizers.tiktoken.get_encoding

    def offline(name):
        if name == "gpt2":
            raise ConnectionError("no network")
        return real(name)

    monkeypatch.setattr(tokenizers.tiktoken, "get_encoding", offline)
    with pytest.raises(TinyLLMError, match="GPT-2"):
        from_dict({"kind": "gpt2"})  # a gpt2 checkpoint's tokenizer
    (tmp_path / "a.txt").write_text(corpus_head(1000))
    code, _, err = train_cli(capsys, tmp_path / "a.txt", tmp_path / "run", "--tokenizer", "gpt2")
    assert_one_line_error(code, err, "GPT-2", "--tokenizer")


def gpt2_cached():
    """Whether tiktoken has GPT-2's files on disk, looked for as tiktoken does, offline."""
    cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", cache))
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    urls = [base + name for name in ("vocab.bpe", "encoder.json")]
    keys = [hashlib.sha1(u.encode()).hexdigest() for u in urls]
    return bool(cache) and all(os.path.isfile(os.path.join(cache, k)) for k in keys)


@pytest.mark.skipif(not gpt2_cached(), reason="GPT-2's tokenizer files are not cached here")
def test_the_gpt2_tokenizer():
    tok = GPT2Tokenizer()
    ids = tok.encode("Hello world" + EOT)
    assert tok.vocab_size == 50257 and ids[-1] == tok.eot_id == 50256
    assert tok.decode(ids) == "Hello world" + EOT
    assert from_dict(tok.to_dict()).encode(UNICODE) == tok.encode(UNICODE)


# ----------------------------------------------------------------------------------- tools.prepare


def write_docs(folder, n=6, size=1500):
    folder.mkdir()
    docs = [corpus_head(n * size)[i * size : (i + 1) * size] for i in range(n)]
    for i, doc in enumerate(docs):
        (folder / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return docs


def test_prepare_a_folder_then_train_from_the_memmaps_with_flags_that_agree(tmp_path, capsys):
    docs = write_docs(tmp_path / "docs")
    assert prepare_cli(capsys, tmp_path / "docs", tmp_path / "out")[0] == 0
    c = corpus(tmp_path / "out")
    assert isinstance(c.train, np.memmap) and c.train.dtype == np.uint16
    assert stream(c.tokenizer, c.train, c.val) == EOT + "".join(d + EOT for d in docs)
    flags = ("--tokenizer", "char", "--clean", "false")
    code, _, err = train_cli(capsys, tmp_path / "out", tmp_path / "run", *flags)
    assert code == 0, err
    assert load(str(tmp_path / "run" / "last.pt"))["tokenizer"] == c.tokenizer.to_dict()
    code, _, err = train_cli(capsys, tmp_path / "out", tmp_path / "run2", "--tokenizer", "bpe")
    assert_one_line_error(code, err, "--tokenizer bpe")


@pytest.mark.parametrize("wide", [False, True])
def test_prepare_stores_ids_as_uint16_or_past_65536_tokens_as_uint32(tmp_path, capsys, wide):
    if wide:  # a char vocabulary of 70,000 distinct characters
        path, text = (
            tmp_path / "wide.txt",
            "".join(chr(c) for c in range(0x4E00, 0x4E00 + 72_048) if not 0xD800 <= c < 0xE000) * 2,
        )
        path.write_text(text, encoding="utf-8")
    else:
        path = tmp_path / "d.jsonl"
        records = [json.dumps({"text": f"record {i}: " + "abc" * (i % 7)}) for i in range(100)]
        path.write_text("\n".join(records))
        text = "".join(iter_documents(str(path)))
    assert prepare_cli(capsys, path, tmp_path / "out")[0] == 0
    prepared = load_prepared(str(tmp_path / "out"))
    train_ids, val_ids, tok = prepared.train, prepared.val, prepared.tokenizer
    assert train_ids.dtype == val_ids.dtype == (np.uint32 if wide else np.uint16)
    assert (prepared_meta(str(tmp_path / "out"))["vocab_size"] > 2**16) == wide
    assert int(max(train_ids.max(), val_ids.max())) >= 2**16 * wide
    assert stream(tok, train_ids, val_ids) == text  # no id cut to 16 bits


def test_prepare_learns_bpe_from_the_training_split_alone_and_never_cuts_an_end_of_text(
    tmp_path, capsys
):
    # zqxjv: in the validation part only
    (tmp_path / "one.txt").write_text("the cat " * 450 + "zqxjv " * 40)
    (tmp_path / "docs").mkdir()
    docs = ["the cat " * 50] * 9 + ["zqxjv " * 66]  # the 90% cut falls inside the last doc's EOT
    for i, doc in enumerate(docs):
        (tmp_path / "docs" / f"{i}.txt").write_text(doc)
    full = EOT + "".join(d + EOT for d in docs)
    cut = int(len(full) * 0.9)
    assert 0 < full.find(EOT, cut - len(EOT) + 1) < cut  # (the test's premise)
    for source in ("one.txt", "docs"):
        flags = ("--tokenizer", "bpe", "--vocab_size", "300")
        assert prepare_cli(capsys, tmp_path / source, tmp_path / "out", *flags)[0] == 0
        prepared = load_prepared(str(tmp_path / "out"))
        train_ids, val_ids, tok = prepared.train, prepared.val, prepared.tokenizer
        learned = [bytes(t) for t in tok.tokens[256:]]
        assert b" cat" in learned and not any(set(t) & set(b"zqxjv") for t in learned), source
    assert list(train_ids).count(tok.eot_id) == 9 and val_ids[0] == tok.eot_id
    assert tok.decode(val_ids.tolist()) == EOT + docs[-1] + EOT


def test_a_failed_prepare_leaves_the_previous_dataset_byte_for_byte(tmp_path, capsys, monkeypatch):
    write_docs(tmp_path / "docs")
    assert prepare_cli(capsys, tmp_path / "docs", tmp_path / "out")[0] == 0
    before = files(tmp_path / "out")
    for name in ("doc0.txt", "doc1.txt"):  # new text and characters: every file would change
        (tmp_path / "docs" / name).write_text("Ωmega " * 300)
    real = prepare.pieces

    def disk_full_midway(*args):
        yield from list(real(*args))[:3]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare, "pieces", disk_full_midway)
    code, _, err = prepare_cli(capsys, tmp_path / "docs", tmp_path / "out")
    assert_one_line_error(code, err, "space")
    assert files(tmp_path / "out") == before  # nothing replaced, no .tmp left


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_bits_per_character_count_end_of_text_as_one_character(tmp_path, capsys, kind):
    """In memory and prepared."""
    path = tmp_path / "d.jsonl"  # short documents: many <|endoftext|> in the val split
    records = [json.dumps({"text": f"doc {i}: " + "xy " * (i % 5)}) for i in range(200)]
    path.write_text("\n".join(records))
    in_memory = corpus(path, tokenizer=kind)
    val_text = split_train_val("".join(iter_documents(str(path))))[1]
    assert val_text.count(EOT) > 10
    expected = len(val_text.replace(EOT, "\n")) / len(in_memory.val)
    flags = ("--tokenizer", kind, "--vocab_size", "300")
    assert prepare_cli(capsys, path, tmp_path / "out", *flags)[0] == 0
    prepared = corpus(tmp_path / "out")
    assert np.array_equal(prepared.val, in_memory.val.numpy())
    assert in_memory.chars_per_token == pytest.approx(expected)
    assert prepared.chars_per_token == pytest.approx(expected)
    assert (expected == 1.0) == (kind == "char")


# ----------------------------------------------------------------------------------------- prompts


def test_a_prompt_drops_unknown_characters_with_a_warning_and_keeps_end_of_text_whole(capsys):
    # no <, | or >
    tok = CharTokenizer.from_text(f"{USER}who? 3 4 yes\n{ASSISTANT}me", (EOT, USER, ASSISTANT))
    ids = encode_prompt(tok, "so 3 < 4? |yes|" + EOT, qa=True)
    assert tok.decode(ids) == f"{EOT}{USER}so 3  4? yes{EOT}\n{ASSISTANT}" and ids[0] == tok.eot_id
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "<" in err and "|" in err
    assert encode_prompt(tok, "who?") == tok.encode("who?") and not capsys.readouterr().err
    with pytest.raises(TinyLLMError):
        encode_prompt(tok, "ЖЖ|")  # no character it knows


def test_an_empty_prompt_starts_at_a_line_end_or_else_at_the_first_token(bpe_tok):
    for tok in (CharTokenizer.from_text("ab\n"), bpe_tok):
        assert encode_prompt(tok, "") == tok.encode("\n")
    assert encode_prompt(CharTokenizer.from_text("ba"), "") == [0]


def test_a_prompt_file_that_is_not_utf8_is_one_error_line(tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes("café".encode("latin-1"))
    flags = ("--prompt_file", tmp_path / "p.txt")
    code, _, err = cli(capsys, generate.main, tmp_path / "none.pt", *flags)
    assert_one_line_error(code, err, "--prompt_file", "UTF-8")
