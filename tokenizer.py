"""Tokenizers: text to token ids and back. Each one saves itself as plain data
(to_dict), so a checkpoint carries its tokenizer and loads with weights_only=True."""

from config import TinyLLMError


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters seen."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def unknown_chars(self, text):
        return sorted(set(text) - set(self.stoi))

    def to_dict(self):
        return {"kind": "char", "chars": self.chars}


def tokenizer_from_dict(d):
    if d.get("kind") == "char":
        return CharTokenizer(d["chars"])
    raise TinyLLMError(f"unknown tokenizer kind {d.get('kind')!r} in checkpoint")
