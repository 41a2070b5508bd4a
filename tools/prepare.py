"""Tokenize a corpus larger than memory once, streaming: its first 90% of bytes (cut at a character; train.py cuts at
90% of the characters: the same for ASCII) to train.bin, the rest to val.bin, with meta.json (train.py --data DIR)."""

import contextlib
import json
import os
import time

import numpy as np

from config import BPE_VOCAB_SIZE, EOT, TRAIN_FRACTION, TinyLLMError, TrainConfig, make_config
from utils import make_tokenizer, whole_eot

from machinery.checkpoint import replace_file
from machinery.cli import ArgumentParser, add_config_flags, check_writable, explicit_flags, format_seconds, log, run_cli
from machinery.sources import iter_stream


def source_size(cfg):
    """Bytes of text the stream will carry (a JSON file's own size counts quotes and escapes); of a text file, its
    size less what reading drops (a byte-order mark, each \\r\\n's \\r): the 90/10 cut is the same CRLF or LF."""
    if not os.path.isfile(cfg.data) or cfg.data.lower().endswith((".json", ".jsonl")) or cfg.clean:
        log(f"measuring {cfg.data} ...")
        return sum(len(text.encode("utf-8")) for text in iter_stream(cfg.data, cfg.clean, cfg.data_ext))
    with open(cfg.data, "rb") as f:
        size, last = os.path.getsize(cfg.data) - (3 if f.read(3) == b"\xef\xbb\xbf" else 0), b""
        f.seek(0)
        while block := f.read(1 << 24):
            size -= (last + block).count(b"\r\n")  # (a pair split between two blocks counts once)
            last = block[-1:]
    return size


def tokenizer_text(cfg, max_chars, total_bytes):
    """What the tokenizer is built from: every character for char; for BPE the first max_chars of the training
    split, so that the validation text stays unseen."""
    if cfg.tokenizer != "char":
        parts, total, seen = [], 0, 0
        for text in iter_stream(cfg.data, cfg.clean, cfg.data_ext):
            cut, size = train_chars(text, seen, total_bytes * TRAIN_FRACTION)
            parts.append(text[:cut])
            total, seen = total + cut, seen + size
            if total >= max_chars or cut < len(text):
                break
        return "".join(parts)
    chars = set()
    for text in iter_stream(cfg.data, cfg.clean, cfg.data_ext):
        chars.update(text.replace(EOT, ""))  # (a char tokenizer has the end-of-text token whatever its text)
    return "".join(sorted(chars))


def prepare(cfg, out, vocab_size=2048, tokenizer_sample_mb=20):
    if not os.path.exists(cfg.data):
        raise TinyLLMError(f"input {cfg.data} not found")
    if os.path.exists(out) and not os.path.isdir(out):
        raise TinyLLMError(f"--out {out} is a file, not a folder")
    check_writable(os.path.join(out, "meta.json"), "--out", make_folder=True)
    make_tokenizer(cfg.tokenizer, "", vocab_size)  # now, not after measuring: a size BPE cannot have, GPT-2's files
    total_bytes = source_size(cfg)
    if total_bytes == 0:
        raise TinyLLMError(f"input {cfg.data} is empty")
    t0 = time.perf_counter()
    what = "every character" if cfg.tokenizer == "char" else f"the first {tokenizer_sample_mb} MB of the train split"
    log(f"building the {cfg.tokenizer} tokenizer from {what} of {total_bytes / 2**20:,.1f} MB ...")
    tokenizer = make_tokenizer(cfg.tokenizer, tokenizer_text(cfg, tokenizer_sample_mb * 2**20, total_bytes), vocab_size,
                               verbose=cfg.tokenizer == "bpe")
    log(f"tokenizer {cfg.tokenizer}: {tokenizer.vocab_size:,} tokens (built in {time.perf_counter() - t0:.1f}s)")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    counts, val_chars = write_splits(cfg, tokenizer, dtype, out, total_bytes)
    elapsed = time.perf_counter() - t0
    meta = {"source": os.path.abspath(cfg.data), "tokenizer": tokenizer.to_dict(), "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name, "train_tokens": counts["train"], "val_tokens": counts["val"],
            "val_chars": val_chars, "clean": cfg.clean}
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f)
    # meta.json is deleted first, renamed in last: a folder caught halfway is refused, not read with the old tokenizer
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, "meta.json"))
    for name in ("train.bin", "val.bin", "meta.json"):
        replace_file(os.path.join(out, f"{name}.tmp"), os.path.join(out, name))
    log(f"wrote {out}/train.bin ({counts['train']:,} tokens), val.bin ({counts['val']:,} tokens), meta.json "
        f"in {format_seconds(elapsed)} ({sum(counts.values()) / max(elapsed, 1e-9):,.0f} tokens/s)")
    return meta


def train_chars(text, seen, split_at):
    """(how many of text's characters train, its UTF-8 bytes), text starting seen bytes into the source: those before
    byte split_at train (a character or an <|endoftext|> the byte cuts validates)."""
    data = text.encode("utf-8")
    cut = len(data[:max(0, int(split_at - seen))].decode("utf-8", errors="ignore"))
    return whole_eot(text, cut), len(data)


def write_splits(cfg, tokenizer, dtype, out, total_bytes):
    """Stream the source through the tokenizer into out/train.bin.tmp and out/val.bin.tmp, removed on failure."""
    split_at = total_bytes * TRAIN_FRACTION  # the first 90% of the bytes train, the rest validates
    paths = {name: os.path.join(out, f"{name}.bin.tmp") for name in ("train", "val")}
    counts, val_chars, seen = {"train": 0, "val": 0}, 0, 0
    t0 = last_report = time.perf_counter()
    try:
        with open(paths["train"], "wb") as train_file, open(paths["val"], "wb") as val_file:
            files = {"train": train_file, "val": val_file}
            for text in iter_stream(cfg.data, cfg.clean, cfg.data_ext):
                cut, size = train_chars(text, seen, split_at)
                for split, part in (("train", text[:cut]), ("val", text[cut:])):
                    if part:
                        ids = np.asarray(tokenizer.encode(part), dtype=dtype)
                        ids.tofile(files[split])
                        counts[split] += len(ids)
                        val_chars += len(part.replace(EOT, "\n")) if split == "val" else 0  # (EOT: one character)
                seen += size
                if time.perf_counter() - last_report > 2:  # the first line once there is a rate to show
                    last_report = time.perf_counter()
                    report_progress(seen, total_bytes, sum(counts.values()), last_report - t0)
        if counts["val"] == 0 or counts["train"] == 0:
            raise TinyLLMError(f"{cfg.data}: too little text to split into train and validation")
    except BaseException:
        for path in paths.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        raise
    return counts, val_chars


def report_progress(seen, total, tokens, seconds):
    rate = seen / seconds
    log(f"prepare {seen / 2**20:,.1f}/{total / 2**20:,.1f} MB ({100 * seen / total:.0f}%) | {tokens:,} tokens | "
        f"{rate / 2**20:.1f} MB/s, {tokens / seconds:,.0f} tok/s | ETA {format_seconds(max(0, total - seen) / rate)}")


def main(argv=None):
    parser = ArgumentParser(description="Tokenize a corpus to train.bin/val.bin for train.py --data.")
    parser.add_argument("--input", required=True, help="a .txt file, a folder, a .jsonl file, or a Q&A .json list")
    parser.add_argument("--out", required=True, help="output folder, e.g. data/NAME")
    add_config_flags(parser, TrainConfig, names=("tokenizer", "clean", "data_ext"), title="as in train.py")
    parser.add_argument("--vocab_size", type=int, default=BPE_VOCAB_SIZE,
                        help="vocabulary to learn, with --tokenizer bpe (default: %(default)s)")
    parser.add_argument("--tokenizer_sample_mb", type=int, default=20,
                        help="MB of text the BPE learns from (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.tokenizer_sample_mb < 1:
        raise TinyLLMError(f"--tokenizer_sample_mb must be at least 1, got {args.tokenizer_sample_mb}")
    cfg = make_config(TrainConfig, {**explicit_flags(args), "data": args.input})
    prepare(cfg, args.out, args.vocab_size, args.tokenizer_sample_mb)


if __name__ == "__main__":
    run_cli(main)
