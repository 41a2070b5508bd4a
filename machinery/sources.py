"""Reads training text and turns it into tokens, and encodes prompts.

The text comes from files, folders, conversations in the chat template, or folders written by
tools.prepare. Files are read as "utf-8-sig", which drops a byte-order mark, and CRLF is read as
LF. So the same text gives the same tokens on every platform."""

import hashlib
import json
import os
import re

import numpy as np

from config import ASSISTANT, EOT, USER, TinyLLMError, TrainConfig, require
from machinery.cli import warn
from tokenizer import from_dict, grown, learn, ordinary, split_special
from utils import Corpus, make_corpus, question, split_train_val, turn


def iter_documents(path, clean=False, extensions=".txt"):
    """Yields the text of `path` in pieces: a .txt file in chunks, or documents ending with EOT."""
    require(os.path.exists(path), f"data file {path} not found")
    seen = set()

    def document(text):  # with --clean, normalise whitespace and drop exact duplicates
        if clean:
            text = clean_text(text).strip()
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            text = "" if key in seen else text
            seen.add(key)
        if text and not text.endswith(EOT):  # a conversation ends with EOT already
            text += EOT
        return text

    if os.path.isdir(path):
        yield EOT
        for file in folder_files(path, extensions):
            yield document(read_text(file))
    elif path.lower().endswith((".json", ".jsonl")):
        yield EOT
        for where, record in records(path):
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield document(record["text"])
            elif isinstance(record, dict) and ("messages" in record or "question" in record):
                yield document(chat_document(record, where))
            else:  # also a preference pair: a file of those is for dpo.py
                raise TinyLLMError(
                    f'{where}: expected an object with "text", "messages", or "question" and '
                    '"answer" (a file of "prompt", "chosen" and "rejected" is for dpo.py)'
                )
    else:
        for chunk in read_chunks(path):
            yield clean_text(chunk) if clean else chunk


def read_chunks(path, what="data file"):
    """Yields the text of a file in pieces that end at line ends, read as "utf-8-sig".

    A file that is not UTF-8 is refused, with its name in the error."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            while chunk := f.read(1 << 20):
                yield chunk + f.readline()
    except UnicodeDecodeError:
        raise TinyLLMError(f"{what} {path} is not UTF-8 text") from None


def read_text(path, what="data file"):
    """Returns the whole text of a file, read as "utf-8-sig".

    A file that is not UTF-8 is refused, with its name in the error."""
    return "".join(read_chunks(path, what))


def records(path):
    """Yields (where, record) for each line of a .jsonl file, or each item of a .json list.

    `where` names the line or the record, for error messages."""
    text = read_text(path)
    if path.lower().endswith(".jsonl"):
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                yield f"{path} line {n}", parsed(line, f"{path} line {n}")
        return
    data = parsed(text, path)
    if not isinstance(data, list):
        raise TinyLLMError(f'{path}: expected a JSON list of {{"question": ..., "answer": ...}}')
    yield from ((f"{path} record {n}", record) for n, record in enumerate(data, 1))


def parsed(text, where):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TinyLLMError(f"{where} is not valid JSON: {e}") from None


def folder_files(folder, extensions):
    endings = tuple(e.strip().lower() for e in extensions.split(",") if e.strip())
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = [n for n in sorted(files) if n.lower().endswith(endings) and n[0] != "."]
        found += [os.path.join(root, n) for n in names]
    require(found, f"folder {folder} has no {', '.join(endings) or '?'} files (--data_ext)")
    return found


def chat_document(record, where):
    """Returns a conversation record as text in the chat template.

    The record is {"messages": [{"role": "user", "content": ...}, ...]} or a question and answer."""
    asked = {"role": "user", "content": record.get("question")}
    answered = {"role": "assistant", "content": record.get("answer")}
    messages = record.get("messages", [asked, answered])
    if not isinstance(messages, list) or not messages:
        raise TinyLLMError(f'{where}: "messages" must be a list of {{"role": ..., "content": ...}}')
    for m in messages:
        m = m if isinstance(m, dict) else {}
        if m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            raise TinyLLMError(f"{where}: a message needs a role (user or assistant) and content")
    if messages[-1]["role"] != "assistant":
        raise TinyLLMError(f"{where}: a conversation must end with the assistant's answer")
    return "".join(turn(m["role"], m["content"]) for m in messages)


def first_question(ids, tokenizer):
    """Returns the ids of the first whole question in `ids`, up to where its answer begins.

    Returns None if `ids` holds no whole question."""
    ids = list(map(int, ids))
    user = tokenizer.special_tokens.get(USER)
    question = ids[ids.index(user) :] if user in ids else []
    assistant = tokenizer.special_tokens.get(ASSISTANT)
    return question[: question.index(assistant) + 1] if assistant in question else None


def clean_text(text):
    """Returns `text` with line ends unified, trailing spaces trimmed, and runs squeezed.

    A run of spaces becomes one space, and a run of blank lines becomes one blank line."""
    text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]{2,}", " ", text))


def read_corpus(cfg, tokenizer=None, vocab_size=0, grow=False):
    """Returns the Corpus of cfg.data.

    The text is tokenized by the tokenizer given, or else by a new one (of vocab_size tokens, for
    BPE). With `grow`, the given tokenizer first gains the characters and chat tokens it lacks."""
    if is_prepared(cfg.data):
        corpus = load_prepared(cfg.data)
        if tokenizer is not None and tokenizer.to_dict() != corpus.tokenizer.to_dict():
            raise TinyLLMError(f"{cfg.data} was prepared with another tokenizer than the model's")
        return corpus
    text = "".join(iter_documents(cfg.data, cfg.clean, cfg.data_ext))
    require(text.replace(EOT, "").strip(), f"data file {cfg.data} is empty")
    if tokenizer is None:  # char learns every character, BPE only from the training part
        learned_from = text if cfg.tokenizer == "char" else split_train_val(text)[0]
        tokenizer = learn(cfg.tokenizer, learned_from, vocab_size)
    tokenizer, old_ids = check_known(tokenizer, text, cfg.data, grow)
    corpus = make_corpus(text, tokenizer, cfg.loss_on == "answers")
    corpus.old_ids = old_ids
    return corpus


def check_known(tokenizer, text, path, grow=False):
    """Checks that the tokenizer knows every character and chat token of `text`.

    What it lacks is refused, or added with `grow` (tokenizer.grown). Returns the tokenizer and
    old_ids. old_ids holds the old id of each token, and None for a new one; it is None itself when
    nothing was added."""
    special = [s for s in (USER, ASSISTANT) if s in text and s not in tokenizer.special_tokens]
    chars = tokenizer.unknown_chars("".join(ordinary(text, special)))
    if not (chars or special):
        return tokenizer, None
    require(grow, f"{path} has tokens the model lacks: {''.join(chars + special)[:40]!r}")
    return grown(tokenizer, chars, special)


def preference_pairs(path):
    """Returns [(chosen text, rejected text)] in the chat template.

    The pairs come from a .jsonl (or .json) file of {"prompt", "chosen", "rejected"} records."""
    if not (path.lower().endswith((".json", ".jsonl")) and os.path.isfile(path)):
        raise TinyLLMError(f'{path}: expected a .jsonl file of "prompt", "chosen" and "rejected"')
    pairs = []
    for where, record in records(path):
        is_pair = isinstance(record, dict) and "chosen" in record
        require(is_pair, f'{where}: expected a preference pair: "prompt", "chosen", "rejected"')
        texts = [record.get(k) for k in ("prompt", "chosen", "rejected")]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise TinyLLMError(f'{where}: a pair needs "prompt", "chosen" and "rejected" texts')
        question = EOT + turn("user", texts[0])
        pairs.append(tuple(question + turn("assistant", answer) for answer in texts[1:]))
    return pairs


def is_prepared(path):
    """Returns whether `path` is a folder that tools.prepare wrote.

    Such a folder fixes the tokenizer and the splits."""
    return os.path.isfile(os.path.join(path, "meta.json"))


def prepared_meta(path):
    """Returns the meta.json of a tools.prepare folder: its tokenizer, dtype, sizes and settings."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if np.dtype(meta["dtype"]) not in (np.uint16, np.uint32):
            raise ValueError(f"unexpected dtype {meta['dtype']}")
        if not isinstance(meta["tokenizer"], dict):
            raise ValueError("no tokenizer")
        meta["val_chars"] = int(meta["val_chars"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise TinyLLMError(
            f"{meta_path} is corrupt ({type(e).__name__}: {e}); run tools.prepare again"
        ) from None
    return meta


def load_prepared(path):
    """Returns the Corpus of a tools.prepare folder.

    The splits are memory-mapped, so only the parts that batches use are read from disk."""
    meta = prepared_meta(path)
    splits = []
    for name in ("train", "val"):
        file = os.path.join(path, f"{name}.bin")
        if not os.path.isfile(file) or os.path.getsize(file) < np.dtype(meta["dtype"]).itemsize:
            raise TinyLLMError(f"{file} is missing or empty; run tools.prepare again")
        splits.append(np.memmap(file, dtype=meta["dtype"], mode="r"))
    return Corpus(from_dict(meta["tokenizer"]), *splits, meta["val_chars"] / len(splits[1]))


def validation_split(checkpoint, tokenizer, data=None):
    """Returns (corpus, data): the text the run of a checkpoint validated on, split as it was then.

    If `data` is given, it replaces the saved data path."""
    saved = checkpoint.get("train_config", {})
    kept = {k: saved[k] for k in ("clean", "data_ext", "loss_on") if k in saved}
    cfg = TrainConfig(data=data or saved.get("data", TrainConfig.data), **kept)
    corpus = read_corpus(cfg, tokenizer)
    check_long_enough(corpus.val, 1, "validation", cfg.data)
    return corpus, cfg.data


def check_long_enough(ids, block_size, name, path):
    why = f"{path}: the {name} split has {len(ids)} tokens; block_size {block_size}"
    require(len(ids) > block_size, f"{why} needs {block_size + 1}: add text or lower --block_size")


def encode_prompt(tokenizer, prompt, qa=False, say=warn):
    """Returns the ids of the prompt. Characters the vocabulary lacks are dropped with a warning."""
    if qa:  # the first turn of the chat template, up to where the answer begins
        if ASSISTANT not in tokenizer.special_tokens:
            raise TinyLLMError("--qa needs a model fine-tuned on conversations")
        prompt = EOT + question(prompt)
    missing = "".join(tokenizer.unknown_chars(prompt))
    if missing:
        pieces = split_special(prompt, tokenizer.special_tokens)  # special tokens kept whole
        pieces[::2] = [p.translate(str.maketrans("", "", missing)) for p in pieces[::2]]
        prompt = "".join(pieces)
        require(prompt, f"the model knows no character of the prompt ({missing[:40]!r})")
        say(f"dropped characters the vocabulary lacks: {missing[:40]!r}")
    return tokenizer.encode(prompt) if prompt else start_ids(tokenizer)


def start_ids(tokenizer):
    """Returns the ids that sampling starts from without a prompt.

    That is a line end, or else the first token of the vocabulary."""
    return [0] if tokenizer.unknown_chars("\n") else tokenizer.encode("\n")
