"""Training text and its tokens: files, folders, conversations in the chat template, tools.prepare
folders; and prompts. Files are read as "utf-8-sig" (no byte-order mark) with CRLF as LF: the same
tokens everywhere."""

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
    """The source's text in pieces: a .txt file in chunks, or documents each ending with EOT."""
    require(os.path.exists(path), f"data file {path} not found")
    seen = set()

    def document(text):  # with --clean: whitespace normalised, an exact duplicate dropped
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
            else:  # a preference pair too: a file of them is dpo.py's
                raise TinyLLMError(
                    f'{where}: expected an object with "text", "messages", or "question" and '
                    '"answer" (a file of "prompt", "chosen" and "rejected" is for dpo.py)'
                )
    else:
        for chunk in read_chunks(path):
            yield clean_text(chunk) if clean else chunk


def read_chunks(path, what="data file"):
    """A text file's text in pieces that end at line ends, read as "utf-8-sig"; one that is not
    UTF-8 refused by its name."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            while chunk := f.read(1 << 20):
                yield chunk + f.readline()  # a piece ends at a line end
    except UnicodeDecodeError:
        raise TinyLLMError(f"{what} {path} is not UTF-8 text") from None


def read_text(path, what="data file"):
    """A text file's whole text, read as "utf-8-sig"; one that is not UTF-8 refused by its name."""
    return "".join(read_chunks(path, what))


def records(path):
    """(where, record) of a .jsonl file's lines, or of a .json file's list: where names it."""
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
    """{"messages": [{"role": "user", "content": ...}, ...]} or a Q&A record, as chat template."""
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
    """The ids of the first whole question in ids, up to where its answer begins; else None."""
    ids = list(map(int, ids))
    user = tokenizer.special_tokens.get(USER)
    question = ids[ids.index(user) :] if user in ids else []
    assistant = tokenizer.special_tokens.get(ASSISTANT)
    return question[: question.index(assistant) + 1] if assistant in question else None


def clean_text(text):
    """Line ends unified, trailing spaces trimmed, runs of spaces and of blank lines squeezed."""
    text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]{2,}", " ", text))


def read_corpus(cfg, tokenizer=None, vocab_size=0, grow=False):
    """cfg.data's Corpus: tokenized by the tokenizer given (grown by what the text holds that it
    lacks, if grow) or by a new one, of vocab_size tokens if BPE."""
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
    """Check that the tokenizer knows every character and chat token of text. What it lacks is
    refused, or with grow added (tokenizer.grown). Returns the tokenizer and old_ids: each token's
    id before, None for a new one; old_ids is None when nothing was added."""
    special = [s for s in (USER, ASSISTANT) if s in text and s not in tokenizer.special_tokens]
    chars = tokenizer.unknown_chars("".join(ordinary(text, special)))
    if not (chars or special):
        return tokenizer, None
    require(grow, f"{path} has tokens the model lacks: {''.join(chars + special)[:40]!r}")
    return grown(tokenizer, chars, special)


def preference_pairs(path):
    """[(chosen text, rejected text)] in the chat template, of a .jsonl (or .json) file of
    {"prompt", "chosen", "rejected"} records."""
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
    """Whether path is a folder tools.prepare wrote: its tokenizer and splits are fixed."""
    return os.path.isfile(os.path.join(path, "meta.json"))


def prepared_meta(path):
    """A tools.prepare folder's meta.json: its tokenizer, dtype, sizes and settings."""
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
    """A tools.prepare folder's Corpus: the splits are read from disk only where batches fall."""
    meta = prepared_meta(path)
    splits = []
    for name in ("train", "val"):
        file = os.path.join(path, f"{name}.bin")
        if not os.path.isfile(file) or os.path.getsize(file) < np.dtype(meta["dtype"]).itemsize:
            raise TinyLLMError(f"{file} is missing or empty; run tools.prepare again")
        splits.append(np.memmap(file, dtype=meta["dtype"], mode="r"))
    return Corpus(from_dict(meta["tokenizer"]), *splits, meta["val_chars"] / len(splits[1]))


def validation_split(checkpoint, tokenizer, data=None):
    """(corpus, data): the text a checkpoint's run validated on (or data), split as it was."""
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
    """The prompt's ids, characters the vocabulary lacks dropped with a warning."""
    if qa:  # the chat template's first turn, up to where the answer begins
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
    """Where sampling starts without a prompt: a line end, or else the vocabulary's first token."""
    return [0] if tokenizer.unknown_chars("\n") else tokenizer.encode("\n")
