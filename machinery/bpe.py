"""Byte-level tokenizers: BPE learned from your text (--tokenizer bpe) and OpenAI's GPT-2
(--tokenizer gpt2), both encoded by tiktoken. A deep dive: the default run uses characters
(utils.py) and never calls this.

The textbook algorithm: start from the 256 byte values, count every adjacent pair of tokens in
the text, merge the most frequent pair into a new token, and repeat until the vocabulary is
full. train_bpe does exactly that, fast: it counts over each distinct pre-token ("word") once,
keeps the pair counts in a heap, and after each merge recounts only the words that held the
merged pair.
"""

import heapq
from collections import Counter

import regex  # the `regex` package (a tiktoken dependency): it knows \p{L} and possessive ++
import tiktoken

from config import EOT, TinyLLMError


# GPT-2's pre-tokenisation regex, exactly as in tiktoken's gpt2 encoding: it cuts text into
# contractions, words, numbers, punctuation runs and whitespace, each with an optional
# leading space. BPE merges never cross these pieces, so " the" and "the." stay apart.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def special_regex(special_tokens):
    return "(" + "|".join(regex.escape(s) for s in special_tokens) + ")"


def split_special(text, special_tokens):
    """Cut the text at the special tokens (dropping them), so no merge ever spans one."""
    if not special_tokens:
        return [text]
    return regex.split(special_regex(special_tokens), text)[::2]


def _merge(ids, pair, new_id):
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _merge_words(words, freqs, where, pair, new_id, counts):
    """Merge pair into new_id in every word that contains it, and update counts and where by the
    difference between each word's old and new pairs. Returns the pairs whose count changed
    and is still positive (they need a fresh heap entry)."""
    delta = Counter()
    for w in where.pop(pair):
        old, n = words[w], freqs[w]
        new = _merge(old, pair, new_id)
        words[w] = new
        old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
        for p in old_pairs:
            delta[p] -= n
        for p in new_pairs:
            delta[p] += n
        for p in set(old_pairs) - set(new_pairs):
            if p != pair:
                where[p].discard(w)
        for p in set(new_pairs) - set(old_pairs):
            where.setdefault(p, set()).add(w)
    changed = []
    for p, d in delta.items():
        if d == 0:
            continue
        counts[p] += d
        if counts[p] > 0:
            changed.append(p)
        else:  # the pair is gone from every word
            del counts[p]
            where.pop(p, None)
    return changed


def train_bpe(text, vocab_size, pattern=GPT2_PATTERN, special_tokens=(EOT,), verbose=False):
    """Learn a byte-level BPE vocabulary from `text`.

    Returns the list of token byte strings in rank order: tokens[i] is the bytes of token i.
    The first 256 are the single bytes 0..255, each later one is the merge of two earlier ones.
    vocab_size counts the special tokens too, so len(tokens) == vocab_size - len(special_tokens)
    (or fewer, if the text runs out of pairs to merge).

    Each round merges the most frequent adjacent pair. Ties go to the pair whose byte strings
    (left, right) sort first, so the result is fully deterministic.
    """
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise TinyLLMError(f"bpe vocab_size must be at least {256 + len(special_tokens)} "
                           f"(256 bytes + {len(special_tokens)} special), got {vocab_size}")

    # 1. pre-tokenise into unique pieces ("words") with their counts; BPE only ever sees
    #    one word at a time, so each distinct word is processed once, weighted by its count
    word_counts = Counter()
    for chunk in split_special(text, special_tokens):
        word_counts.update(regex.findall(pattern, chunk))
    words = [list(w.encode("utf-8")) for w in word_counts]  # each word as a list of token ids
    freqs = list(word_counts.values())

    # 2. count every adjacent pair, and remember which words contain it
    tokens = [bytes([b]) for b in range(256)]
    token_id = {t: i for i, t in enumerate(tokens)}
    counts = Counter()
    where = {}  # pair -> set of word indices containing it
    for w, (ids, n) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            counts[pair] += n
            where.setdefault(pair, set()).add(w)

    # 3. a max-heap of (count, pair), keyed for the tie rule. Instead of updating entries in
    #    place we push a fresh one whenever a count changes; an entry whose count no longer
    #    matches `counts` is stale and skipped when popped ("lazy invalidation").
    def entry(pair):
        return (-counts[pair], tokens[pair[0]], tokens[pair[1]], pair)
    heap = [entry(pair) for pair in counts]
    heapq.heapify(heap)

    target = vocab_size - len(special_tokens)
    while len(tokens) < target and heap:
        neg_count, _, _, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg_count:
            continue  # stale entry
        # the new token is the two byte strings glued. Should those bytes already be a token
        # (two different pairs spelling the same string; rare), reuse its id: ranks are unique
        merged = tokens[pair[0]] + tokens[pair[1]]
        new_id = token_id.get(merged)
        if new_id is None:
            new_id = len(tokens)
            tokens.append(merged)
            token_id[merged] = new_id
            if verbose and (new_id - 255) % 100 == 0:
                print(f"bpe merge {new_id - 255}/{n_merges}: {merged!r} (count {-neg_count})", flush=True)

        # 4. rewrite only the words that contain the pair, then adjust the pair counts
        for p in _merge_words(words, freqs, where, pair, new_id, counts):
            heapq.heappush(heap, entry(p))
    return tokens


# ----------------------------------------------------------------------------- the tokenizers, encoded by tiktoken (a fast Rust encoder)

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


def gpt2_encoding():
    """tiktoken's GPT-2 encoding: from its cache, or downloaded on first use."""
    return tiktoken.get_encoding("gpt2")


class GPT2Tokenizer(ByteLevelTokenizer):
    """OpenAI's GPT-2 tokenizer (50,257 tokens, "<|endoftext|>" = 50256). tiktoken downloads
    its files on first use and caches them, so this needs network at least once."""

    def __init__(self):
        try:
            self.enc = gpt2_encoding()
        except Exception as e:  # offline: a requests/connection error, or a broken cache
            raise TinyLLMError(f"could not fetch the GPT-2 tokenizer files ({type(e).__name__}); "
                               "use --tokenizer bpe or --tokenizer char instead") from e
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token

    def to_dict(self):
        return {"kind": "gpt2"}
