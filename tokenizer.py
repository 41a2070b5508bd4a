"""Tokenizers: text to token ids and back. Each one saves itself as plain data (to_dict), so a
checkpoint carries its tokenizer (and checkpoints hold nothing that could run code on loading).

Three kinds, all with the same interface (encode, decode, vocab_size, eot_id, unknown_chars,
to_dict):
  char  one token per character seen in the training text (the default; read this one first)
  bpe   byte-level BPE learned from your text (the merges: bpe.py), encoded by tiktoken
  gpt2  OpenAI's GPT-2 tokenizer via tiktoken (needs its files, i.e. network once)"""

import regex
import tiktoken

from bpe import GPT2_PATTERN, special_regex, split_special, train_bpe
from config import EOT, TinyLLMError


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters seen, plus
    "<|endoftext|>" as one extra id, so any char model can later learn document ends
    (e.g. when fine-tuned on Q&A data)."""

    def __init__(self, chars, special_tokens=()):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(special_tokens)}
        self.vocab_size = len(self.chars) + len(self.special_tokens)
        self.eot_id = self.special_tokens.get(EOT)

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set("".join(split_special(text, [EOT])))), [EOT])

    def encode(self, text):
        if not self.special_tokens:
            return [self.stoi[ch] for ch in text]
        ids = []
        for k, part in enumerate(regex.split(special_regex(self.special_tokens), text)):  # text, special, text, ...
            ids.extend([self.special_tokens[part]] if k % 2 else [self.stoi[ch] for ch in part])
        return ids

    def decode(self, ids):
        names = {i: s for s, i in self.special_tokens.items()}
        return "".join(self.chars[i] if i < len(self.chars) else names[i] for i in ids)

    def unknown_chars(self, text):
        """The characters of text this vocabulary has no token for, sorted."""
        return sorted(set("".join(split_special(text, list(self.special_tokens)))) - set(self.stoi))

    def extended(self, text):
        """For fine-tuning on new text: a tokenizer that also knows the characters of text it
        lacks, appended after the known ones. Returns (tokenizer, old_ids, added), where
        old_ids[i] is the id token i had before (None for an added character)."""
        added = self.unknown_chars(text)
        bigger = CharTokenizer(self.chars + added, list(self.special_tokens))
        old_ids = list(range(len(self.chars))) + [None] * len(added) + list(self.special_tokens.values())
        return bigger, old_ids, added

    def to_dict(self):
        return {"kind": "char", "chars": self.chars, "special_tokens": list(self.special_tokens)}


# -----------------------------------------------------------------------------
# Byte-level tokenizers, encoded by tiktoken (a fast Rust encoder)

class ByteLevelTokenizer:
    """Byte-level: any text encodes, and a slice of ids can end mid-character. Subclasses set
    self.enc, a tiktoken.Encoding."""

    def encode(self, text):
        return self.enc.encode(text, allowed_special="all")  # "<|endoftext|>" in text -> eot_id

    def decode(self, ids):
        return self.enc.decode(ids, errors="replace")  # a split character shows as U+FFFD, no crash

    def unknown_chars(self, text):
        return []


class BPETokenizer(ByteLevelTokenizer):
    """Our trained byte-level BPE; tiktoken does the encoding (the tests check it gives the ids
    of the textbook algorithm: repeatedly merge the adjacent pair of lowest rank).
    Ids: 0..len(tokens)-1 are the byte tokens by rank, then the special tokens in order."""

    def __init__(self, tokens, pattern=GPT2_PATTERN, special_tokens=(EOT,)):
        self.tokens = [bytes(t) for t in tokens]
        self.pattern = pattern
        ranks = {t: i for i, t in enumerate(self.tokens)}
        if len(ranks) != len(self.tokens):
            raise TinyLLMError("bpe tokenizer has duplicate tokens (corrupt checkpoint?)")
        self.special_tokens = {s: len(self.tokens) + i for i, s in enumerate(special_tokens)}
        self.vocab_size = len(self.tokens) + len(self.special_tokens)
        self.eot_id = self.special_tokens.get(EOT)
        self.enc = tiktoken.Encoding(name=f"tinyllm-bpe-{self.vocab_size}", pat_str=pattern,
                                     mergeable_ranks=ranks, special_tokens=self.special_tokens)

    @classmethod
    def train(cls, text, vocab_size, pattern=GPT2_PATTERN, special_tokens=(EOT,), verbose=False):
        return cls(train_bpe(text, vocab_size, pattern, special_tokens, verbose), pattern, special_tokens)

    def to_dict(self):
        # plain data only (torch.load weights_only=True refuses bytes); bytes are stored as hex
        return {"kind": "bpe", "pattern": self.pattern, "tokens": [t.hex() for t in self.tokens],
                "special_tokens": dict(self.special_tokens)}


class GPT2Tokenizer(ByteLevelTokenizer):
    """OpenAI's GPT-2 tokenizer (50,257 tokens, "<|endoftext|>" = 50256). tiktoken downloads
    its files on first use and caches them, so this needs network at least once."""

    def __init__(self):
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline: a requests/connection error, or a broken cache
            raise TinyLLMError(f"could not fetch the GPT-2 tokenizer files ({type(e).__name__}); "
                               "use --tokenizer bpe or --tokenizer char instead") from e
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token

    def to_dict(self):
        return {"kind": "gpt2"}


# -----------------------------------------------------------------------------

def start_ids(tokenizer):
    """Where sampling starts without a prompt: a line end (byte-level tokenizers can always
    encode one; a char vocabulary without it starts from its first character)."""
    if isinstance(tokenizer, CharTokenizer) and "\n" not in tokenizer.stoi:
        return [0]
    return tokenizer.encode("\n")


def make_tokenizer(kind, text, vocab_size, verbose=False):
    """A new tokenizer of the given kind; text and vocab_size are used where they apply."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size, verbose=verbose)
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise TinyLLMError(f"unknown tokenizer {kind!r}: choose char, bpe or gpt2")


def tokenizer_from_dict(d):
    """The tokenizer a checkpoint (or a prepare.py meta.json) describes, checked field by field."""
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
