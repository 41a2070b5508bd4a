"""Text to token ids and back: a model only ever sees integers.

Three tokenizers share the same methods. CharTokenizer makes one token per character; read it
first. BPETokenizer uses byte-level BPE learned from your text (train_bpe). GPT2Tokenizer is the
tokenizer of OpenAI's GPT-2. The two byte-level tokenizers encode with tiktoken, which is fast
because it is written in Rust. Every tokenizer ends its vocabulary with special tokens, such as
<|endoftext|> and the roles of a chat, with one id each.
"""

import heapq
import re
from collections import Counter

import regex  # comes with tiktoken; it supports \p{L} and possessive ++
import tiktoken

from config import BPE_VOCAB_SIZE, EOT, SPECIAL_TOKENS, TinyLLMError, require


class Tokenizer:
    """The base of every tokenizer: n_ordinary ordinary tokens, then the special tokens."""

    def __init__(self, n_ordinary, special_tokens):
        self.special_tokens = {s: n_ordinary + i for i, s in enumerate(special_tokens)}
        self.vocab_size = n_ordinary + len(self.special_tokens)
        self.eot_id = self.special_tokens.get(EOT)

    def unknown_chars(self, text):  # a byte-level tokenizer encodes any text
        return []


def split_special(text, special_tokens):
    """Splits text into [text, special, text, ...].

    re.split keeps the special tokens because the pattern puts them in a group."""
    if not special_tokens:
        return [text]
    return re.split("(" + "|".join(map(re.escape, special_tokens)) + ")", text)


def ordinary(text, special_tokens):
    """Returns the pieces of text between the special tokens."""
    return split_special(text, special_tokens)[::2]


# ------------------------------------------------------------------------------------ characters


class CharTokenizer(Tokenizer):
    """One token per character: the characters of the text, sorted, then the special tokens."""

    def __init__(self, chars, special_tokens=(EOT,)):
        self.chars = list(chars)  # id -> character
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}  # character -> id
        super().__init__(len(self.chars), special_tokens)

    @classmethod
    def from_text(cls, text, special_tokens=(EOT,)):
        return cls(sorted(set("".join(ordinary(text, special_tokens)))), special_tokens)

    def encode(self, text):
        ids = []
        for part in split_special(text, self.special_tokens):  # text and special tokens alternate
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            else:
                ids += [self.stoi[ch] for ch in part]
        return ids

    def decode(self, ids):
        names = {i: s for s, i in self.special_tokens.items()}
        return "".join(self.chars[i] if i < len(self.chars) else names[i] for i in ids)

    def unknown_chars(self, text):
        return sorted(set("".join(ordinary(text, self.special_tokens))) - set(self.stoi))

    def to_dict(self):
        return {"kind": "char", "chars": self.chars, "special_tokens": list(self.special_tokens)}


# ---------------------------------------------------------------------------- byte-level BPE

# GPT-2's pre-tokenisation cuts text into pieces; merges never cross from one piece to the next
GPT2_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"


def replace_pair(ids, pair, new_id):
    """Returns ids with every non-overlapping pair, from left to right, replaced by new_id."""
    out = []
    i = 0
    while i < len(ids):
        hit = i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair
        out.append(new_id if hit else ids[i])
        i += 2 if hit else 1
    return out


def train_bpe(text, vocab_size, special_tokens=(EOT,), verbose=False):
    """Learns byte-level BPE from text and returns the bytes of each token, in rank order.

    The first 256 tokens are the single bytes. Each round then merges the most frequent pair into
    a new token; a tie goes to the pair whose bytes sort first. It stops at vocab_size -
    len(special_tokens) tokens. This is textbook BPE made fast: each distinct word is counted once,
    the pair counts live in a heap, and only the words that hold the merged pair are recounted.
    Speed matters here: a run with --tokenizer bpe waits for its tokens before its first step."""
    n_merges = vocab_size - 256 - len(special_tokens)
    require(n_merges >= 0, f"bpe needs vocab_size >= {256 + len(special_tokens)}, got {vocab_size}")
    # 1. count the distinct words; merges never cross a word or a special token
    chunks = ordinary(text, special_tokens)
    word_counts = Counter(word for chunk in chunks for word in regex.findall(GPT2_PATTERN, chunk))
    words = [list(w.encode("utf-8")) for w in word_counts]
    freqs = list(word_counts.values())
    # 2. count every adjacent pair, and note which words hold it
    tokens = [bytes([b]) for b in range(256)]
    token_id = {t: i for i, t in enumerate(tokens)}
    counts = Counter()
    where = {}
    for w, (ids, n) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            counts[pair] += n
            where.setdefault(pair, set()).add(w)

    # 3. a heap of (count, pair). A changed count pushes a new entry; an entry that no longer
    # matches `counts` is stale and is skipped when popped
    def entry(pair):
        return (-counts[pair], tokens[pair[0]], tokens[pair[1]], pair)

    heap = [entry(pair) for pair in counts]
    heapq.heapify(heap)
    while len(tokens) < vocab_size - len(special_tokens) and heap:
        neg_count, _, _, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg_count:
            continue
        merged = tokens[pair[0]] + tokens[pair[1]]
        new_id = token_id.setdefault(merged, len(tokens))  # two pairs can spell the same bytes
        if new_id == len(tokens):
            tokens.append(merged)
            if verbose and (new_id - 255) % 100 == 0:
                print(f"bpe merge {new_id - 255}/{n_merges}: {merged!r} x{-neg_count}", flush=True)
        # 4. rewrite only the words holding the pair, and adjust the counts
        delta = Counter()
        for w in where.pop(pair):
            old = words[w]
            n = freqs[w]  # read once: this loop is the hot path of learning a BPE vocabulary
            words[w] = new = replace_pair(old, pair, new_id)
            old_pairs = list(zip(old, old[1:]))
            new_pairs = list(zip(new, new[1:]))
            for p in old_pairs:
                delta[p] -= n
            for p in new_pairs:
                delta[p] += n
            for p in set(old_pairs) - set(new_pairs) - {pair}:
                where[p].discard(w)
            for p in set(new_pairs) - set(old_pairs):
                where.setdefault(p, set()).add(w)
        for p, d in delta.items():
            if d:
                counts[p] += d
                if counts[p] > 0:
                    heapq.heappush(heap, entry(p))
                else:  # the pair is in no word any more
                    del counts[p]
                    where.pop(p, None)
    return tokens


class ByteLevelTokenizer(Tokenizer):
    """A tokenizer over bytes: any text encodes, but ids can end in the middle of a character.

    Subclasses set self.enc, a tiktoken Encoding."""

    def encode(self, text):
        return self.enc.encode(text, allowed_special="all")  # "<|endoftext|>" -> eot_id

    def decode(self, ids):
        return self.enc.decode(ids, errors="replace")  # a character cut in two decodes as U+FFFD

    def encoding(self, name, pattern, ranks):  # a tiktoken Encoding with our special tokens
        return tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )


class BPETokenizer(ByteLevelTokenizer):
    """Our trained BPE: ids 0..len(tokens)-1 are the tokens in rank order; special tokens follow."""

    def __init__(self, tokens, pattern=GPT2_PATTERN, special_tokens=(EOT,)):
        self.tokens = [bytes(t) for t in tokens]
        self.pattern = pattern
        ranks = {t: i for i, t in enumerate(self.tokens)}
        require(len(ranks) == len(self.tokens), "the bpe tokenizer has duplicate tokens")
        super().__init__(len(self.tokens), special_tokens)
        self.enc = self.encoding(f"tinyllm-bpe-{self.vocab_size}", pattern, ranks)

    def to_dict(self):  # bytes as hex, because a checkpoint holds only plain data
        return {
            "kind": "bpe",
            "pattern": self.pattern,
            "tokens": [t.hex() for t in self.tokens],
            "special_tokens": dict(self.special_tokens),
        }


class GPT2Tokenizer(ByteLevelTokenizer):
    """OpenAI's GPT-2 tokenizer: 50,257 tokens, <|endoftext|> last; our special tokens follow."""

    def __init__(self, special_tokens=(EOT,)):
        try:
            gpt2 = tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network, or a broken cache
            raise TinyLLMError(
                f"could not fetch the GPT-2 tokenizer files ({type(e).__name__}); "
                "train.py can use --tokenizer bpe or char"
            ) from None
        special = [EOT] + [s for s in special_tokens if s != EOT]
        super().__init__(gpt2.eot_token, special)  # GPT-2's <|endoftext|> is its last token
        self.enc = gpt2
        if len(special) > 1:  # tiktoken adds special tokens by building a new Encoding
            self.enc = self.encoding("gpt2-chat", gpt2._pat_str, gpt2._mergeable_ranks)

    def to_dict(self):
        return {"kind": "gpt2", "special_tokens": list(self.special_tokens)}


# ------------------------------------------------------------ making, saving, growing a tokenizer


def learn(kind, text, vocab_size=0, verbose=False):
    """Returns a new tokenizer of the given kind for text.

    A "char" tokenizer takes the characters of the text, "bpe" learns BPE from it, and "gpt2" is
    the GPT-2 tokenizer. It has the special tokens found in the text, and always <|endoftext|>."""
    special = [s for s in SPECIAL_TOKENS if s == EOT or s in text]
    if kind == "char":
        return CharTokenizer.from_text(text, special)
    if kind == "bpe":
        tokens = train_bpe(text, vocab_size or BPE_VOCAB_SIZE, special, verbose)
        return BPETokenizer(tokens, GPT2_PATTERN, special)
    return from_dict({"kind": kind, "special_tokens": special})


def from_dict(d):
    """Returns the tokenizer that a to_dict() describes, from a checkpoint or a prepared folder."""
    kind = d.get("kind")
    try:
        special = d.get("special_tokens", [EOT] if kind == "gpt2" else [])
        if isinstance(special, dict):  # bpe saves them as name -> id
            special = sorted(special, key=special.get)
        if not all(isinstance(s, str) for s in special):
            raise ValueError("special_tokens must be strings")
        if kind == "char":
            if list("".join(d["chars"])) != d["chars"] or len(set(d["chars"])) != len(d["chars"]):
                raise ValueError("chars must be distinct single characters")
            return CharTokenizer(d["chars"], special)
        if kind == "bpe":
            return BPETokenizer([bytes.fromhex(h) for h in d["tokens"]], d["pattern"], special)
        if kind == "gpt2":
            return GPT2Tokenizer(special)
    except (KeyError, TypeError, ValueError, AttributeError, regex.error) as e:
        raise TinyLLMError(f"the {kind} tokenizer is malformed ({type(e).__name__}: {e})") from None
    raise TinyLLMError(f"unknown tokenizer kind {kind!r} (expected char, bpe or gpt2)")


def grown(tokenizer, chars, special):
    """Returns (tokenizer, old_ids): the tokenizer grown by new characters and special tokens, and
    the old id of each token, or None for a new one.

    Only a char tokenizer takes new characters. A fine-tune needs this when its text holds tokens
    that the tokenizer of the model lacks."""
    d = tokenizer.to_dict() | {"special_tokens": list(tokenizer.special_tokens) + special}
    if chars:  # only a char tokenizer lacks characters
        d["chars"] = tokenizer.chars + chars
    ordinary_size = tokenizer.vocab_size - len(tokenizer.special_tokens)
    # each old token keeps its old id; new characters and new special tokens get None
    old_ids = list(range(ordinary_size)) + [None] * len(chars)
    old_ids += list(tokenizer.special_tokens.values()) + [None] * len(special)
    return from_dict(d), old_ids
