"""Byte-level tokenizers, encoded by tiktoken (fast, in Rust): BPE learned from your text (--tokenizer bpe)
and OpenAI's GPT-2 (--tokenizer gpt2); the default run uses characters (utils.py). train_bpe is textbook
BPE made fast: distinct words counted once, pair counts in a heap, only merged words recounted."""

import heapq
from collections import Counter

import regex  # the `regex` package (a tiktoken dependency): it knows \p{L} and possessive ++
import tiktoken

from config import EOT, TinyLLMError


# GPT-2's pre-tokenisation regex, as in tiktoken: BPE merges never cross the pieces it cuts text into
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _merge(ids, pair, new_id):
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right."""
    out, i = [], 0
    while i < len(ids):
        hit = i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]
        out.append(new_id if hit else ids[i])
        i += 2 if hit else 1
    return out


def _merge_words(words, freqs, where, pair, new_id, counts):
    """Merge pair into new_id in every word holding it, updating counts and where; returns pairs to push again."""
    delta = Counter()
    for w in where.pop(pair):
        old, n = words[w], freqs[w]
        words[w] = new = _merge(old, pair, new_id)
        old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
        for p in old_pairs:
            delta[p] -= n
        for p in new_pairs:
            delta[p] += n
        for p in set(old_pairs) - set(new_pairs) - {pair}:  # (pair itself left `where` above)
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
    """The token byte strings by rank: the 256 bytes, then merges, vocab_size - len(special_tokens) in all (fewer
    if pairs run out). Each round merges the most frequent pair; a tie to the (left, right) bytes that sort first."""
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise TinyLLMError(f"bpe vocab_size must be at least {256 + len(special_tokens)} "
                           f"(256 bytes + {len(special_tokens)} special), got {vocab_size}")

    # 1. pre-tokenise into distinct words with their counts: merges never cross a word, so each is done once
    specials = "|".join(regex.escape(s) for s in special_tokens)
    chunks = regex.split(specials, text) if special_tokens else [text]  # no merge spans a special token
    word_counts = Counter(word for chunk in chunks for word in regex.findall(pattern, chunk))
    words = [list(w.encode("utf-8")) for w in word_counts]
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

    # 3. a max-heap of (count, pair), keyed for the tie rule. A changed count pushes a fresh entry;
    #    one that no longer matches `counts` is stale, skipped when popped ("lazy invalidation")
    def entry(pair):
        return (-counts[pair], tokens[pair[0]], tokens[pair[1]], pair)
    heap = [entry(pair) for pair in counts]
    heapq.heapify(heap)

    while len(tokens) < vocab_size - len(special_tokens) and heap:
        neg_count, _, _, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg_count:
            continue
        merged = tokens[pair[0]] + tokens[pair[1]]
        new_id = token_id.setdefault(merged, len(tokens))  # two pairs can spell the same bytes (rare): one id
        if new_id == len(tokens):
            tokens.append(merged)
            if verbose and (new_id - 255) % 100 == 0:
                print(f"bpe merge {new_id - 255}/{n_merges}: {merged!r} (count {-neg_count})", flush=True)

        # 4. rewrite only the words that contain the pair, then adjust the pair counts
        for p in _merge_words(words, freqs, where, pair, new_id, counts):
            heapq.heappush(heap, entry(p))
    return tokens


class ByteLevelTokenizer:
    """Byte-level: any text encodes, and ids can end mid-character. Subclasses set self.enc (tiktoken)."""

    def encode(self, text):
        return self.enc.encode(text, allowed_special="all")  # "<|endoftext|>" in text -> eot_id

    def decode(self, ids):
        return self.enc.decode(ids, errors="replace")  # a split character shows as U+FFFD, no crash

    def unknown_chars(self, text):
        return []


class BPETokenizer(ByteLevelTokenizer):
    """Our trained BPE, encoded by tiktoken: ids 0..len(tokens)-1 are the tokens by rank, then the special tokens."""

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
    """OpenAI's GPT-2 tokenizer: 50,257 tokens, "<|endoftext|>" = 50256."""

    def __init__(self):
        try:
            self.enc = gpt2_encoding()
        except Exception as e:  # offline: a requests/connection error, or a broken cache
            raise TinyLLMError(f"could not fetch the GPT-2 tokenizer files ({type(e).__name__}): they are downloaded "
                               "once, then cached (train.py can use --tokenizer bpe or char instead)") from e
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token

    def to_dict(self):
        return {"kind": "gpt2"}
