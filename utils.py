"""The data path: text sources -> one token stream -> a contiguous train/val split ->
random (x, y) batches, where y is x shifted by one token. train.py batches with get_batch.

Sources: a .txt file, a folder of text files (searched recursively), a .jsonl file with a
"text" field per line, a Q&A .json list, or a folder written by prepare.py (memory-mapped
tokens, for corpora larger than memory)."""

import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from config import TinyLLMError
from tokenizer import EOT, make_tokenizer, tokenizer_from_dict


# ----------------------------------------------------------------------------- text sources

def iter_pieces(path, clean=False, extensions=".txt", chunk_chars=1 << 20):
    """Stream a text source as (text, document_ends) pieces, never holding it all in memory:
    a .txt file (one document, read in chunks cut at line ends), a folder (every file whose
    name ends in one of extensions, searched recursively, a document each), a .jsonl file (the
    "text" field of each line), or a .json list of {"question": ..., "answer": ...} records.
    clean=True normalises whitespace and drops exact duplicate documents."""
    if not os.path.exists(path):
        raise TinyLLMError(f"data file {path} not found")
    seen = set()

    def document(text):
        if clean:
            text = clean_text(text)
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in seen:
                return None
            seen.add(key)
        return text or None

    file = path
    try:
        if os.path.isdir(path):
            for file in folder_files(path, extensions):
                with open(file, encoding="utf-8") as f:
                    text = document(f.read())
                if text:
                    yield text, True
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                            raise TinyLLMError(f"{path} line {n}: expected an object with a \"text\" string")
                        text = document(record["text"])
                        if text:
                            yield text, True
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
            if not isinstance(records, list):
                raise TinyLLMError(f"{path}: expected a JSON list of {{\"question\": ..., \"answer\": ...}} records")
            for n, record in enumerate(records):
                text = document(qa_document(record, n, path))
                if text:
                    yield text, True
        else:
            with open(path, encoding="utf-8") as f:
                while chunk := f.read(chunk_chars):
                    chunk += f.readline()  # end the piece at a line end
                    yield clean_text(chunk) if clean else chunk, False
            yield "", True
    except UnicodeDecodeError:
        raise TinyLLMError(f"data file {file} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise TinyLLMError(f"{path} is not valid JSON: {e}") from None


def folder_files(folder, extensions=".txt"):
    """Every file under folder whose name ends in one of the comma-separated extensions, in a
    fixed (sorted) order; hidden files and folders (.git, ...) are skipped."""
    endings = tuple(e.strip().lower() for e in extensions.split(",") if e.strip())
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(files) if n.lower().endswith(endings) and not n.startswith(".")]
    if not found:
        raise TinyLLMError(f"folder {folder} has no files ending in {', '.join(endings)} (see --data_ext)")
    return found


def qa_document(record, n, path="data"):
    """One Q&A record as the text the model learns from."""
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "answer")):
        rid = record.get("id", n) if isinstance(record, dict) else n
        raise TinyLLMError(f"{path}: record {rid} needs string fields \"question\" and \"answer\"")
    return qa_prompt(record["question"]) + " " + record["answer"].strip()


def qa_prompt(question):
    return f"Question: {question.strip()}\nAnswer:"


def clean_text(text):
    """Light curation: unify line ends, trim trailing spaces, squeeze runs of spaces and blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def iter_stream(path, clean=False, extensions=".txt"):
    """The source as a stream of text pieces. A plain text file flows as it is; a source of
    several documents has each one wrapped in "<|endoftext|>", so the model learns where
    a document (or an answer) ends."""
    multi_doc = os.path.isdir(path) or path.endswith((".json", ".jsonl"))
    if multi_doc:
        yield EOT
    for text, ends in iter_pieces(path, clean, extensions):
        yield text + EOT if multi_doc and ends else text


def read_text(path, clean=False, extensions=".txt"):
    """The whole source as one string."""
    text = "".join(iter_stream(path, clean, extensions))
    if not text.replace(EOT, "").strip():
        raise TinyLLMError(f"data file {path} is empty")
    return text


# ----------------------------------------------------------------------------- token streams

@dataclass
class Corpus:
    tokenizer: object
    train: object              # 1-D token ids: a LongTensor, or a read-only np.memmap
    val: object
    chars_per_token: float     # of the val split, to report bits per character
    added: list                # characters a given char tokenizer lacked and now has
    old_ids: list = None       # with added: the id each token had before (None for new ones)


def tokenize(path, kind="char", vocab_size=0, tokenizer=None, clean=False, extensions=".txt", extend=False):
    """The source as train and val token streams. The tokenizer is reused when given (resume,
    fine-tuning) or built: char from the whole text, BPE learned from the training split only.
    A given char tokenizer that lacks some of the text's characters is extended with them when
    extend is True, and refused otherwise. The split is contiguous, 90/10."""
    if is_prepared(path):  # a folder from prepare.py: memory-mapped tokens
        meta, train_ids, val_ids = load_prepared(path)
        prepared = tokenizer_from_dict(meta["tokenizer"])
        if tokenizer is not None and tokenizer.to_dict() != meta["tokenizer"]:
            raise TinyLLMError(f"{path} was prepared with a different tokenizer than the checkpoint's")
        return Corpus(prepared, train_ids, val_ids, meta["val_chars"] / max(1, len(val_ids)), [])
    text = read_text(path, clean, extensions)
    added, old_ids = [], None
    if tokenizer is None:
        tokenizer = make_tokenizer(kind, text if kind == "char" else text[:int(len(text) * 0.9)], vocab_size)
    elif hasattr(tokenizer, "unknown_chars") and tokenizer.unknown_chars(text):
        if not extend:
            missing = "".join(tokenizer.unknown_chars(text))
            raise TinyLLMError(f"{path} has characters the checkpoint's vocabulary lacks: {missing[:40]!r}")
        tokenizer, old_ids, added = tokenizer.extended(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = split_train_val(ids)
    chars_per_token = len(tokenizer.decode(val_ids.tolist())) / max(1, len(val_ids))
    return Corpus(tokenizer, train_ids, val_ids, chars_per_token, added, old_ids)


def is_prepared(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json"))


def load_prepared(path):
    """A folder written by prepare.py: (meta, train tokens, val tokens), the tokens as
    read-only memory maps, so a corpus larger than memory trains without loading it."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        dtype = np.dtype(meta["dtype"])
        if dtype not in (np.uint16, np.uint32) or not isinstance(meta["tokenizer"], dict):
            raise ValueError("unexpected dtype or tokenizer")
        meta["val_chars"] = int(meta["val_chars"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise TinyLLMError(f"{meta_path} is corrupt or incomplete ({type(e).__name__}: {e}); "
                           f"run prepare.py again") from None
    splits = []
    for name in ("train", "val"):
        file = os.path.join(path, f"{name}.bin")
        if not os.path.isfile(file) or os.path.getsize(file) < dtype.itemsize:
            raise TinyLLMError(f"{file} is missing or empty; run prepare.py again")
        splits.append(np.memmap(file, dtype=dtype, mode="r"))
    return meta, splits[0], splits[1]


def split_train_val(ids, train_fraction=0.9):
    """Contiguous split: the first 90% trains, the rest validates. Tokens are never
    shuffled, since next-token prediction needs them in order."""
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]


def check_long_enough(ids, block_size, name, path):
    if len(ids) < block_size + 1:
        raise TinyLLMError(f"{path}: the {name} split has {len(ids)} tokens but block_size {block_size} "
                           f"needs at least {block_size + 1}; use more text or a smaller --block_size")


# ----------------------------------------------------------------------------- batches

def get_batch(data, batch_size, block_size, device, generator=None):
    """Random windows from a 1-D token stream: x (B, T) and y (B, T), where
    y[b, t] is the token right after x[b, t] in the corpus. data is a tensor, or a
    NumPy memmap of which only the B windows are read from disk."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    if isinstance(data, np.ndarray):
        windows = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix.tolist()]).astype(np.int64))
    else:
        windows = data.unfold(0, block_size + 1, 1)[ix]  # (B, T+1), one gather, no Python loop
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
