"""Tokenize a corpus once, to disk, for corpora larger than memory.

    python prepare.py --input big.txt --tokenizer bpe --vocab_size 4096 --out data/big
    python train.py --data data/big

The input (a .txt file, a folder of .txt files, a .jsonl file with a "text" field, or a
Q&A .json list) is streamed in pieces; documents are wrapped in "<|endoftext|>"; tokens go
to data/NAME/train.bin and val.bin (uint16 when the vocabulary fits, else uint32) with a
meta.json describing the tokenizer. train.py reads the .bin files through np.memmap.
"""

import argparse
import json
import os
import time

import numpy as np

from config import TinyLLMError
from tokenizer import EOT, make_tokenizer
from utils import format_seconds, iter_stream, log, run_cli


def source_size(path, clean):
    """Bytes of text the stream will carry (a JSON file's own size counts quotes and escapes)."""
    if os.path.isfile(path) and not path.endswith((".json", ".jsonl")) and not clean:
        return os.path.getsize(path)
    return sum(len(text.encode("utf-8")) for text in iter_stream(path, clean))


def sample_text(path, clean, max_chars):
    """The first max_chars characters: enough text to learn a tokenizer from."""
    parts, total = [], 0
    for text in iter_stream(path, clean):
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)


def all_chars(path, clean):
    chars, has_eot = set(), False
    for text in iter_stream(path, clean):
        has_eot |= EOT in text
        chars.update(text.replace(EOT, ""))
    return "".join(sorted(chars)) + (EOT if has_eot else "")


def prepare(path, out, kind="bpe", vocab_size=2048, clean=False, tokenizer_sample_mb=20, val_fraction=0.1):
    if not os.path.exists(path):
        raise TinyLLMError(f"input {path} not found")
    total_bytes = source_size(path, clean)
    if total_bytes == 0:
        raise TinyLLMError(f"input {path} is empty")
    t0 = time.perf_counter()
    # the character set needs one pass over everything; BPE learns from a sample of the start
    text = all_chars(path, clean) if kind == "char" else sample_text(path, clean, tokenizer_sample_mb * 2**20)
    tokenizer = make_tokenizer(kind, text, vocab_size)
    del text
    log(f"tokenizer {kind}: {tokenizer.vocab_size:,} tokens (built in {time.perf_counter() - t0:.1f}s)")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    os.makedirs(out, exist_ok=True)

    # documents before the 90% mark of the input's bytes train; the rest validate
    split_at = total_bytes * (1 - val_fraction)
    files = {name: open(os.path.join(out, f"{name}.bin.tmp"), "wb") for name in ("train", "val")}
    counts = {"train": 0, "val": 0}
    val_chars, seen_bytes = 0, 0
    t0, last_report = time.perf_counter(), 0.0
    for text in iter_stream(path, clean):
        split = "train" if seen_bytes < split_at else "val"
        ids = np.asarray(tokenizer.encode(text), dtype=dtype)
        ids.tofile(files[split])
        counts[split] += len(ids)
        val_chars += len(text) if split == "val" else 0
        seen_bytes += len(text.encode("utf-8"))
        now = time.perf_counter()
        if now - last_report > 2:
            rate = seen_bytes / (now - t0)
            log(f"prepare {seen_bytes / 2**20:,.1f}/{total_bytes / 2**20:,.1f} MB | {sum(counts.values()):,} tokens | "
                f"{rate / 2**20:.1f} MB/s, {sum(counts.values()) / (now - t0):,.0f} tokens/s | "
                f"ETA {format_seconds(max(0, total_bytes - seen_bytes) / rate)}")
            last_report = now
    for name, f in files.items():
        f.close()
        os.replace(os.path.join(out, f"{name}.bin.tmp"), os.path.join(out, f"{name}.bin"))
    if counts["val"] == 0:
        raise TinyLLMError(f"{path}: too little text (or one single document) to leave a validation split; "
                           "add documents or use train.py --data on the file directly")
    elapsed = time.perf_counter() - t0
    meta = {"source": os.path.abspath(path), "tokenizer": tokenizer.to_dict(), "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name, "train_tokens": counts["train"], "val_tokens": counts["val"],
            "val_chars": val_chars, "clean": clean}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    log(f"wrote {out}/train.bin ({counts['train']:,} tokens), val.bin ({counts['val']:,} tokens), meta.json "
        f"in {format_seconds(elapsed)} ({sum(counts.values()) / elapsed:,.0f} tokens/s)")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tokenize a corpus to train.bin/val.bin for train.py --data.")
    parser.add_argument("--input", required=True, help=".txt file, folder of .txt files, .jsonl, or Q&A .json")
    parser.add_argument("--out", required=True, help="output folder, e.g. data/NAME")
    parser.add_argument("--tokenizer", default="bpe", choices=["char", "bpe", "gpt2"])
    parser.add_argument("--vocab_size", type=int, default=2048, help="vocabulary size to learn (bpe)")
    parser.add_argument("--clean", action="store_true", help="normalise whitespace, drop duplicate documents")
    parser.add_argument("--tokenizer_sample_mb", type=int, default=20, help="MB of text the BPE learns from")
    args = parser.parse_args(argv)
    prepare(args.input, args.out, args.tokenizer, args.vocab_size, args.clean, args.tokenizer_sample_mb)


if __name__ == "__main__":
    run_cli(main)
