"""Training text (a .txt file, a folder of them, .jsonl, a Q&A .json list, a tools/prepare.py folder), its tokenizer
as a checkpoint saves it (and grown by a fine-tune's new characters), and prompts."""

import hashlib
import json
import os
import re

import numpy as np
import regex

from config import EOT, TinyLLMError, TrainConfig
from utils import CharTokenizer, Corpus, tokenize

from deep_dives.bpe import BPETokenizer, GPT2Tokenizer

from machinery.cli import warn


# Read as "utf-8-sig" (dropping PowerShell's and Notepad's byte-order mark), CRLF as LF: the same tokens everywhere.

def iter_pieces(path, clean=False, extensions=".txt", chunk_chars=1 << 20):
    """A text source as (text, document_ends) pieces, never all in memory (a .txt file is one document, in chunks)."""
    if not os.path.exists(path):
        raise TinyLLMError(f"data file {path} not found")
    seen = set()

    def document(text):
        if clean:
            text = clean_text(text).strip()
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in seen:
                return None
            seen.add(key)
        return text or None

    file = path
    try:
        if os.path.isdir(path):
            for file in folder_files(path, extensions):
                with open(file, encoding="utf-8-sig") as f:
                    text = document(f.read())
                if text:
                    yield text, True
        elif path.lower().endswith(".jsonl"):
            with open(path, encoding="utf-8-sig") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                            raise TinyLLMError(f"{path} line {n}: expected an object with a \"text\" string")
                        if text := document(record["text"]):
                            yield text, True
        elif path.lower().endswith(".json"):
            with open(path, encoding="utf-8-sig") as f:
                records = json.load(f)
            if not isinstance(records, list):
                raise TinyLLMError(f"{path}: expected a JSON list of {{\"question\": ..., \"answer\": ...}} records")
            for n, record in enumerate(records):
                if text := document(qa_document(record, n, path)):
                    yield text, True
        else:
            with open(path, encoding="utf-8-sig") as f:
                while chunk := f.read(chunk_chars):
                    chunk += f.readline()  # end the piece at a line end
                    yield clean_text(chunk) if clean else chunk, False  # (its line ends kept: they join it to the next)
            yield "", True
    except UnicodeDecodeError:
        raise TinyLLMError(f"data file {file} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise TinyLLMError(f"{path} is not valid JSON: {e}") from None


def folder_files(folder, extensions=".txt"):
    endings = tuple(e.strip().lower() for e in extensions.split(",") if e.strip())
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(files) if n.lower().endswith(endings) and not n.startswith(".")]
    if not found:
        raise TinyLLMError(f"folder {folder} has no files ending in {', '.join(endings)} (see --data_ext)")
    return found


def qa_document(record, n, path="data"):
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "answer")):
        rid = record.get("id", n) if isinstance(record, dict) else n
        raise TinyLLMError(f"{path}: record {rid} needs string fields \"question\" and \"answer\"")
    return qa_prompt(record["question"]) + " " + record["answer"].strip()


def qa_prompt(question):
    return f"Question: {question.strip()}\nAnswer:"


def clean_text(text):
    """Light curation: unify line ends, trim trailing spaces, squeeze runs of spaces and blank lines; the ends kept."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def iter_stream(path, clean=False, extensions=".txt"):
    """The source as text pieces, each of several documents wrapped in EOT: the model learns where one ends."""
    multi_doc = os.path.isdir(path) or path.lower().endswith((".json", ".jsonl"))
    if multi_doc:
        yield EOT
    for text, ends in iter_pieces(path, clean, extensions):
        yield text + EOT if multi_doc and ends else text


def read_text(path, clean=False, extensions=".txt"):
    text = "".join(iter_stream(path, clean, extensions))
    if not text.replace(EOT, "").strip():
        raise TinyLLMError(f"data file {path} is empty")
    return text


# ----------------------------------------------------------------------------- a run's corpus

def load_prepared(path):
    """A tools.prepare folder: (meta, train tokens, val tokens), memory-mapped: a corpus larger than memory trains."""
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
                           f"run python -m tools.prepare again") from None
    splits = []
    for name in ("train", "val"):
        file = os.path.join(path, f"{name}.bin")
        if not os.path.isfile(file) or os.path.getsize(file) < dtype.itemsize:
            raise TinyLLMError(f"{file} is missing or empty; run python -m tools.prepare again")
        splits.append(np.memmap(file, dtype=dtype, mode="r"))
    return meta, splits[0], splits[1]


def prepared_meta(path):
    """A tools.prepare folder's meta.json, checked; None for other data."""
    return load_prepared(path)[0] if os.path.isfile(os.path.join(path, "meta.json")) else None


def load_corpus(cfg, tokenizer=None, vocab_size=0, extend=False):
    """cfg.data as a utils.Corpus; a char tokenizer lacking some characters is extended when extend, else refused."""
    if os.path.isfile(os.path.join(cfg.data, "meta.json")):  # from tools.prepare
        meta, train_ids, val_ids = load_prepared(cfg.data)
        if tokenizer is not None and tokenizer.to_dict() != meta["tokenizer"]:  # resuming or fine-tuning
            raise TinyLLMError(f"{cfg.data} was prepared with a different tokenizer than the checkpoint's")
        chars_per_token = meta["val_chars"] / max(1, len(val_ids))
        return Corpus(tokenizer_from_dict(meta["tokenizer"]), train_ids, val_ids, chars_per_token, added=[])
    text = read_text(cfg.data, cfg.clean, cfg.data_ext)
    tokenizer, old_ids, added = extend_tokenizer(tokenizer, text, extend, cfg.data)
    corpus = tokenize(text, tokenizer, cfg.tokenizer, vocab_size)
    corpus.added, corpus.old_ids = added, old_ids
    return corpus


# ----------------------------------------------------------------------------- tokenizers saved, and grown

def tokenizer_from_dict(d):
    """The tokenizer a checkpoint (or a prepared corpus's meta.json) describes, checked field by field."""
    kind = d.get("kind") if isinstance(d, dict) else None
    try:
        if kind == "char":
            chars, special = d["chars"], d.get("special_tokens", [])
            if not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
                raise ValueError("chars must be distinct single characters")
            if not all(isinstance(s, str) for s in special):
                raise ValueError("special_tokens must be strings")
            return CharTokenizer(chars, special)
        if kind == "bpe":
            special = sorted(d["special_tokens"], key=d["special_tokens"].get)  # names in id order
            return BPETokenizer([bytes.fromhex(h) for h in d["tokens"]], d["pattern"], special)
    except (KeyError, TypeError, ValueError, AttributeError, regex.error) as e:
        raise TinyLLMError(f"the {kind} tokenizer data is incomplete or malformed ({type(e).__name__}: {e})") from None
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise TinyLLMError(f"unknown tokenizer kind {kind!r} (expected a dict with kind char, bpe or gpt2)")


def extend_tokenizer(tokenizer, text, extend, path):
    """(tokenizer, old_ids, new characters): a char tokenizer grown by text's unknown ones if extend, else an error."""
    missing = tokenizer.unknown_chars(text) if tokenizer is not None else []
    if not missing:
        return tokenizer, None, []
    if not extend:
        raise TinyLLMError(f"{path} has characters the checkpoint's vocabulary lacks: {''.join(missing)[:40]!r}")
    bigger = CharTokenizer(tokenizer.chars + missing, list(tokenizer.special_tokens))
    old_ids = list(range(len(tokenizer.chars))) + [None] * len(missing) + list(tokenizer.special_tokens.values())
    return bigger, old_ids, missing


def validation_split(checkpoint, tokenizer, data=None):
    """(corpus, data): the source a checkpoint's run was validated on (or data), tokenized and split as then."""
    saved = checkpoint.get("train_config", {})
    data = data or saved.get("data", TrainConfig.data)
    cfg = TrainConfig(data=data, clean=saved.get("clean", False), data_ext=saved.get("data_ext", ".txt"))
    corpus = load_corpus(cfg, tokenizer)
    check_long_enough(corpus.val, 1, "validation", data)
    return corpus, data


def check_long_enough(ids, block_size, name, path):
    if len(ids) < block_size + 1:
        raise TinyLLMError(f"{path}: the {name} split has {len(ids)} tokens but block_size {block_size} "
                           f"needs at least {block_size + 1}; use more text or a smaller --block_size")


# ----------------------------------------------------------------------------- prompts

def read_prompt(cfg):
    if not cfg.prompt_file:
        return cfg.prompt
    try:
        with open(cfg.prompt_file, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError:
        raise TinyLLMError(f"--prompt_file {cfg.prompt_file} is not UTF-8 text") from None
    except OSError as e:
        raise TinyLLMError(f"cannot read --prompt_file {cfg.prompt_file}: {e.strerror or e}") from None


def encode_prompt(tokenizer, prompt, qa=False, say=warn):
    """The prompt's ids, characters the vocabulary lacks dropped with a warning; qa frames it as Q&A training did."""
    if qa:
        if tokenizer.eot_id is None:
            raise TinyLLMError("--qa needs a model trained on Q&A data (its vocabulary has no <|endoftext|>)")
        prompt = EOT + qa_prompt(prompt)
    if missing := tokenizer.unknown_chars(prompt):
        pieces = tokenizer.split_special(prompt)  # [text, special, text, ...]: special tokens kept whole
        kept = "".join(p if i % 2 else "".join(ch for ch in p if ch not in set(missing)) for i, p in enumerate(pieces))
        if prompt and not kept:
            raise TinyLLMError(f"no character of the prompt is in the model's vocabulary "
                               f"(missing: {''.join(missing)[:40]!r})")
        say(f"dropped characters the vocabulary lacks: {''.join(missing)[:40]!r}")
        prompt = kept
    return tokenizer.encode(prompt) if prompt else start_ids(tokenizer)


def start_ids(tokenizer):
    """Where sampling starts without a prompt: a line end, or a char vocabulary's first character if it has none."""
    return [0] if isinstance(tokenizer, CharTokenizer) and "\n" not in tokenizer.stoi else tokenizer.encode("\n")
