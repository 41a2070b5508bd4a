"""Data sources beyond one text file: prepare.py's memory-mapped corpora, JSONL, folders,
Q&A records, cleaning, and a tiny model that learns to answer and stop."""

import json

import numpy as np
import pytest
import torch

from config import EOT, GREEDY, TinyLLMError, TrainConfig
from conftest import TINY_FLAGS, corpus_head, snapshot, tiny_model_config, tiny_train_config
from generate import encode_prompt
import sampling
import train
from utils import get_batch, tokenize

from tools import prepare
from machinery.sources import tokenizer_from_dict
from machinery.sources import iter_pieces, load_prepared
from machinery.sources import read_text as load_corpus


def test_memmap_batches_equal_in_memory_batches(tmp_path):
    ids = np.random.default_rng(0).integers(0, 3000, size=5000).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    on_disk = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r")
    in_memory = torch.from_numpy(ids.astype(np.int64))
    for seed in range(5):
        a = get_batch(on_disk, 8, 32, torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
        b = get_batch(in_memory, 8, 32, torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].dtype == torch.int64


def write_docs(folder, n=30):
    folder.mkdir()
    text = corpus_head(60_000)
    docs = [text[i * 2000:(i + 1) * 2000] for i in range(n)]
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return docs


def test_prepare_a_folder_then_train_from_the_memmaps(tmp_path):
    docs = write_docs(tmp_path / "docs")
    meta = prepare.prepare(TrainConfig(data=str(tmp_path / "docs"), tokenizer="bpe"), str(tmp_path / "out"), 400)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    meta, train_ids, val_ids = load_prepared(str(tmp_path / "out"))
    tok = tokenizer_from_dict(meta["tokenizer"])
    stream = tok.decode(np.concatenate([train_ids, val_ids]).tolist())
    assert stream == EOT + "".join(d + EOT for d in docs)       # every document wrapped, nothing lost
    assert 0.05 < len(val_ids) / (len(train_ids) + len(val_ids)) < 0.2
    cfg = tiny_train_config(str(tmp_path / "out"), tmp_path / "run", max_steps=10)
    result = train.train(tiny_model_config(), cfg)
    assert result["model"].config.vocab_size == 400
    assert result["history"][-1]["val_loss"] < result["history"][0]["val_loss"]
    assert torch.load(tmp_path / "run" / "last.pt")["train_config"]["tokenizer"] == "bpe"  # as trained, not "char"
    for flags in (["--tokenizer", "char"], ["--vocab_size", "500"], ["--clean", "true"]):  # prepare's to decide
        with pytest.raises(TinyLLMError, match=f"tools.prepare.*drop {flags[0]}"):
            train.main([*TINY_FLAGS, "--data", str(tmp_path / "out"), "--out_dir", str(tmp_path / "r2"), *flags])
    same = ["--tokenizer", "bpe", "--vocab_size", "400", "--clean", "false", "--max_steps", "1"]  # what it has: fine
    assert train.main([*TINY_FLAGS, "--data", str(tmp_path / "out"), "--out_dir", str(tmp_path / "r3"), *same]) is None


def test_prepare_jsonl_with_char_tokenizer_and_uint16(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"text": f"record number {i}: " + "abc" * (i % 7)} for i in range(200)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    meta = prepare.prepare(TrainConfig(data=str(path)), str(tmp_path / "out"))
    _, train_ids, val_ids = load_prepared(str(tmp_path / "out"))
    tok = tokenizer_from_dict(meta["tokenizer"])
    assert tok.decode(np.concatenate([train_ids, val_ids]).tolist()) == load_corpus(str(path))


def test_bits_per_character_count_end_of_text_as_one_character_in_memory_and_prepared(tmp_path):
    path = tmp_path / "data.jsonl"  # short documents: many <|endoftext|> tokens in the val split
    path.write_text("\n".join(json.dumps({"text": f"doc {i}: " + "xy" * (i % 5)}) for i in range(300)) + "\n")
    corpus = tokenize(load_corpus(str(path)))  # char tokens, <|endoftext|> too: one character each
    assert EOT in corpus.tokenizer.decode(corpus.val.tolist()) and corpus.chars_per_token == 1.0
    meta = prepare.prepare(TrainConfig(data=str(path)), str(tmp_path / "out"))
    _, _, val_ids = load_prepared(str(tmp_path / "out"))
    assert meta["val_chars"] == len(val_ids)


def test_prepare_learns_bpe_from_the_training_split_alone_and_never_cuts_an_end_of_text(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(20):  # a word only the last 2% of the text has: the validation split's
        (tmp_path / "docs" / f"{i:02d}.txt").write_text("zqxjv " * 10 if i >= 19 else "the " * 100, encoding="utf-8")
    cfg = TrainConfig(data=str(tmp_path / "docs"), tokenizer="bpe")
    learned = prepare.tokenizer_text(cfg, 10**9, prepare.source_size(cfg))
    assert "the" in learned and "zqxjv" not in learned
    text = "ab" + EOT + "cd"
    assert [prepare.train_chars(text, 0, at)[0] for at in (1, 3, 14, 15, 16)] == [1, 2, 2, 15, 16]  # EOT: 2 to 14


def test_a_failed_prepare_leaves_the_previous_dataset_as_it_was(tmp_path):
    path, out = tmp_path / "data.txt", tmp_path / "out"
    path.write_text("a few words of text to tokenize, twice. " * 50)
    prepare.prepare(TrainConfig(data=str(path)), str(out))
    before = snapshot(out)
    path.write_text("x")  # too little to split: refused, after tokenizing
    with pytest.raises(TinyLLMError, match="too little text"):
        prepare.prepare(TrainConfig(data=str(path)), str(out))
    assert snapshot(out) == before  # no .tmp left either


def test_bad_records_are_clear_errors(tmp_path):
    qa = tmp_path / "qa.JSON"
    qa.write_text(json.dumps([{"question": "Hi?", "answer": "Hello."}, {"id": 7, "question": "No answer?"}]))
    with pytest.raises(TinyLLMError, match="record 7.*answer"):
        load_corpus(str(qa))
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(TinyLLMError, match="line 2"):
        load_corpus(str(lines))
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(TinyLLMError, match="not valid JSON"):
        load_corpus(str(broken))


def test_clean_normalises_whitespace_and_drops_duplicates(tmp_path):
    path = tmp_path / "docs.JSONL"  # (an ending in capitals, as Windows may name it, reads alike)
    texts = ["Hello   world  \r\n\n\n\nagain", "unique", "Hello world\n\nagain"]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    kept = [t for t, _ in iter_pieces(str(path), clean=True)]
    assert kept == ["Hello world\n\nagain", "unique"]
    assert len(list(iter_pieces(str(path)))) == 3


def test_clean_reads_a_large_text_file_in_pieces_without_joining_lines_at_their_seams(tmp_path):
    from machinery.sources import clean_text
    path = tmp_path / "book.txt"
    text = "".join(f"  Line {i} of   the book.  \n" + "\n" * (i % 4) for i in range(200))
    path.write_bytes(text.replace("\n", "\r\n").encode())  # Windows line ends, cleaned too
    pieces = [t for t, _ in iter_pieces(str(path), clean=True, chunk_chars=50)]  # many pieces, each at a line end
    assert len(pieces) > 50
    cleaned = clean_text(text).strip()  # the whole text cleaned at once
    # the same lines in the same order; a run of blank lines split between two pieces may keep one more
    assert [line for line in "".join(pieces).strip().split("\n") if line] == [l for l in cleaned.split("\n") if l]
    assert "\n\n\n\n" not in "".join(pieces) and cleaned.startswith("Line 0 of the book.\n")


def test_tiny_model_learns_to_answer_and_stop(tmp_path):
    records = [{"question": q, "answer": a} for q, a in [
        ("Who are you?", "I am tinyllm."), ("What is your name?", "My name is tinyllm."),
        ("What do you eat?", "Only tokens."), ("Where do you live?", "In a checkpoint."),
        ("Are you alive?", "No, I am numbers."), ("Do you sleep?", "Never.")] * 3]
    data = tmp_path / "qa.json"
    data.write_text(json.dumps(records))
    torch.manual_seed(0)
    cfg = tiny_train_config(str(data), tmp_path / "run", max_steps=150, batch_size=16, lr=1e-2, min_lr=1e-3,
                            warmup_steps=20, eval_interval=150, plots=False)
    model = train.train(tiny_model_config(n_embd=64, n_head=4, block_size=48), cfg)["model"].eval()
    tok = tokenizer_from_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["tokenizer"])
    prompt = encode_prompt(tok, "Who are you?", qa=True)
    out = sampling.generate(model, torch.tensor([prompt]), 40, GREEDY, stop_token=tok.eot_id)[0, len(prompt):].tolist()
    assert out[-1] == tok.eot_id                                   # it stopped at the boundary...
    assert tok.decode(out[:-1]) == " I am tinyllm."                # ...right after the learned answer


def test_a_vocabulary_past_65536_tokens_is_prepared_as_uint32(tmp_path):
    # 70,000 distinct characters (from the CJK and Hangul blocks and beyond): a char vocabulary
    # too big for uint16 ids
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000]
    text = "".join(chars) * 2
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    meta = prepare.prepare(TrainConfig(data=str(tmp_path / "wide.txt")), str(tmp_path / "out"))
    assert meta["vocab_size"] > 2 ** 16 and meta["dtype"] == "uint32"
    meta, train_ids, val_ids = load_prepared(str(tmp_path / "out"))
    assert train_ids.dtype == np.uint32 and int(max(train_ids.max(), val_ids.max())) >= 2 ** 16
    tok = tokenizer_from_dict(meta["tokenizer"])
    assert tok.decode(np.concatenate([train_ids, val_ids]).tolist()) == text  # no id was cut to 16 bits
