"""Tokenize a corpus larger than memory once, streaming: its first 90% of characters (cut as in
memory) to train.bin, the rest to val.bin, with meta.json. Then: python train.py --data DIR.

    python -m tools.prepare --input big.txt --out data/big --tokenizer bpe
"""

import json
import os
import pathlib
import time

import numpy as np

from config import BPE_VOCAB_SIZE, TRAIN_FRACTION, TrainConfig, add_flags, make_config, require
from machinery import cli
from machinery.checkpoint import replace_file
from machinery.sources import iter_documents
from tokenizer import learn
from utils import text_length, whole_special


def pieces(cfg, total_chars):
    """(training part, validation part) of each piece of the source: its first 90% of characters
    train, cut where train.py cuts the text in memory (utils.split_train_val)."""
    seen = 0
    for text in iter_documents(cfg.data, cfg.clean, cfg.data_ext):
        train_chars = min(len(text), max(0, int(total_chars * TRAIN_FRACTION) - seen))
        cut = whole_special(text, train_chars)
        seen += len(text)
        yield text[:cut], text[cut:]


def prepare(cfg, out, vocab_size, sample_mb):
    require(os.path.exists(cfg.data), f"input {cfg.data} not found")
    cli.check_writable(os.path.join(out, "meta.json"), "--out", make_folder=True)
    learn(cfg.tokenizer, "", vocab_size)  # early: a size BPE cannot have, no GPT-2 files
    cli.log(f"measuring {cfg.data} ...")  # as read: CRLF and LF files cut at the same text
    total_chars = sum(len(t) for t in iter_documents(cfg.data, cfg.clean, cfg.data_ext))
    require(total_chars, f"input {cfg.data} is empty")
    t0 = time.perf_counter()
    if cfg.tokenizer == "char":  # every character of the source, and the special tokens it holds
        chars = set()
        for doc in iter_documents(cfg.data, cfg.clean, cfg.data_ext):
            doc_tokenizer = learn("char", doc)
            chars |= set(doc_tokenizer.chars) | set(doc_tokenizer.special_tokens)
        text = "".join(sorted(chars))
    else:  # the first sample_mb of the training part: the validation text stays unseen
        text = ""
        for train_part, val_part in pieces(cfg, total_chars):
            text += train_part
            if len(text) >= sample_mb * 2**20 or val_part:
                break
    tokenizer = learn(cfg.tokenizer, text, vocab_size, verbose=True)
    cli.log(f"tokenizer: {tokenizer.vocab_size:,} tokens ({time.perf_counter() - t0:.1f}s)")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    counts, val_chars = write_splits(cfg, tokenizer, dtype, out, total_chars)
    meta = dict(
        source=os.path.abspath(cfg.data),
        tokenizer=tokenizer.to_dict(),
        vocab_size=tokenizer.vocab_size,
        dtype=np.dtype(dtype).name,
        train_tokens=counts[0],
        val_tokens=counts[1],
        val_chars=val_chars,
        clean=cfg.clean,
    )
    pathlib.Path(out, "meta.json.tmp").write_text(json.dumps(meta))
    # meta.json goes first and comes back last: a folder caught halfway is refused
    pathlib.Path(out, "meta.json").unlink(missing_ok=True)
    for name in ("train.bin", "val.bin", "meta.json"):
        replace_file(os.path.join(out, f"{name}.tmp"), os.path.join(out, name))
    cli.log(
        f"wrote {out}/train.bin ({counts[0]:,} tokens), val.bin ({counts[1]:,} tokens), "
        f"meta.json in {cli.format_seconds(time.perf_counter() - t0)}"
    )


def write_splits(cfg, tokenizer, dtype, out, total_chars):
    """The source tokenized into train.bin.tmp and val.bin.tmp (gone on failure), with progress."""
    paths = [os.path.join(out, f"{name}.bin.tmp") for name in ("train", "val")]
    counts = [0, 0]  # tokens written to each split
    val_chars = 0
    seen = 0  # characters of the source read
    t0 = time.perf_counter()
    shown = t0  # when progress was last shown
    try:
        with open(paths[0], "wb") as train_file, open(paths[1], "wb") as val_file:
            for parts in pieces(cfg, total_chars):
                for i, (part, file) in enumerate(zip(parts, (train_file, val_file))):
                    ids = np.asarray(tokenizer.encode(part), dtype=dtype)
                    ids.tofile(file)
                    counts[i] += len(ids)
                    seen += len(part)
                val_chars += text_length(parts[1], tokenizer.special_tokens)
                if time.perf_counter() - shown > 2:
                    shown = time.perf_counter()
                    rate = seen / (time.perf_counter() - t0)
                    eta = cli.format_seconds(max(0, total_chars - seen) / rate)
                    cli.log(
                        f"prepare {seen / 1e6:,.1f}/{total_chars / 1e6:,.1f}M characters | "
                        f"{sum(counts):,} tokens | {rate / 1e6:.1f}M characters/s | ETA {eta}"
                    )
        require(0 not in counts, f"{cfg.data}: too little text to split into train and validation")
    except BaseException:
        for path in paths:
            pathlib.Path(path).unlink(missing_ok=True)
        raise
    return counts, val_chars


def main(argv=None):
    parser = cli.ArgumentParser(description="Tokenize a corpus for train.py --data, once.")
    parser.add_argument("--input", required=True, help="a .txt, a folder, .jsonl or Q&A .json")
    parser.add_argument("--out", required=True, help="the output folder, e.g. data/NAME")
    add_flags(parser, TrainConfig, names=("tokenizer", "clean", "data_ext"), title="as in train.py")
    parser.add_argument("--vocab_size", type=int, default=BPE_VOCAB_SIZE, help="BPE's: %(default)s")
    parser.add_argument(
        "--tokenizer_sample_mb", type=int, default=20, help="BPE's text: %(default)s"
    )
    args = parser.parse_args(argv)
    sample_mb = args.tokenizer_sample_mb
    require(sample_mb >= 1, f"--tokenizer_sample_mb must be >= 1, got {sample_mb}")
    cfg = make_config(TrainConfig, {**vars(args), "data": args.input})
    prepare(cfg, args.out, args.vocab_size, sample_mb)


if __name__ == "__main__":
    cli.run_cli(main)
