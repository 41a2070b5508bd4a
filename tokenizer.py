"""Text to token ids and back. The default, and the one to read: one token per character.

A model only ever sees integers: the tokenizer turns text into a list of ids, one per token,
and turns ids back into text. A character tokenizer needs no training: its vocabulary is the
set of characters in the training text. Two byte-level tokenizers share its interface
(encode, decode, vocab_size, eot_id, unknown_chars, to_dict) and are a deep dive
(machinery/bpe.py): --tokenizer bpe learns merges of frequent byte pairs from your text, and
--tokenizer gpt2 is OpenAI's. Each tokenizer saves itself as plain data (to_dict), so a
checkpoint carries the tokenizer its model was trained with."""

import re

from config import BPE_VOCAB_SIZE, EOT, TinyLLMError


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters seen, plus
    "<|endoftext|>" as one extra id after them, so any char model can later learn where a
    document ends (when fine-tuned on Q&A data, say)."""

    def __init__(self, chars, special_tokens=()):
        self.chars = list(chars)                              # id -> character
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}  # character -> id
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(special_tokens)}
        self.vocab_size = len(self.chars) + len(self.special_tokens)
        self.eot_id = self.special_tokens.get(EOT)

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text.replace(EOT, ""))), [EOT])  # "<|endoftext|>" is one token, not 13 characters

    def encode(self, text):
        ids = []
        for k, part in enumerate(self.split_special(text)):  # text, special, text, special, ..., text
            ids.extend([self.special_tokens[part]] if k % 2 else [self.stoi[ch] for ch in part])
        return ids

    def decode(self, ids):
        names = {i: s for s, i in self.special_tokens.items()}
        return "".join(self.chars[i] if i < len(self.chars) else names[i] for i in ids)

    def split_special(self, text):
        """text cut around its special tokens: [text, special, text, special, ..., text]."""
        if not self.special_tokens:
            return [text]
        return re.split("(" + "|".join(map(re.escape, self.special_tokens)) + ")", text)

    def unknown_chars(self, text):
        """The characters of text this vocabulary has no token for, sorted."""
        return sorted(set("".join(self.split_special(text)[::2])) - set(self.stoi))

    def to_dict(self):
        return {"kind": "char", "chars": self.chars, "special_tokens": list(self.special_tokens)}


def make_tokenizer(kind, text, vocab_size, verbose=False):
    """A new tokenizer of the given kind; text and vocab_size are used where they apply (bpe:
    vocab_size 0 means BPE_VOCAB_SIZE)."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    from machinery.bpe import BPETokenizer, GPT2Tokenizer  # the byte-level ones: a deep dive, kept out of this file
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size or BPE_VOCAB_SIZE, verbose=verbose)
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise TinyLLMError(f"unknown tokenizer {kind!r}: choose char, bpe or gpt2")
