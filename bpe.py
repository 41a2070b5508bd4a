"""Byte-level tokenizers, encoded by tiktoken (fast, in Rust): BPE learned from your text
(--tokenizer bpe) and OpenAI's GPT-2 (--tokenizer gpt2). train_bpe is textbook BPE made fast:
distinct words counted once, pair counts in a heap, only the merged words recounted."""

import heapq
from collections import Counter

import regex  # tiktoken's dependency: it knows \p{L} and possessive ++
import tiktoken

from config import EOT, TinyLLMError
from utils import split_special

# GPT-2's pre-tokenisation: merges never cross the pieces it cuts text into
GPT2_PATTERN = (
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"
    r"|\s++$|\s+(?!\S)|\s"
)


def replace_pair(ids, pair, new_id):
    """Every non-overlapping pair in ids, left to right, replaced by new_id."""
    out, i = [], 0
    while i < len(ids):
        hit = i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair
        out.append(new_id if hit else ids[i])
        i += 2 if hit else 1
    return out


def train_bpe(text, vocab_size, special_tokens=(EOT,), verbose=False):
    """The tokens' bytes by rank: the 256 bytes, then one merge a round of the most frequent pair
    (a tie to the pair whose bytes sort first), vocab_size - len(special_tokens) tokens in all."""
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise TinyLLMError(f"bpe needs vocab_size >= {256 + len(special_tokens)}, got {vocab_size}")
    # 1. distinct words with their counts: merges never cross a word (nor a special token)
    chunks = split_special(text, special_tokens)[::2]
    word_counts = Counter(word for chunk in chunks for word in regex.findall(GPT2_PATTERN, chunk))
    words, freqs = [list(w.encode("utf-8")) for w in word_counts], list(word_counts.values())
    # 2. every adjacent pair's count, and the words holding it
    tokens = [bytes([b]) for b in range(256)]
    token_id = {t: i for i, t in enumerate(tokens)}
    counts, where = Counter(), {}
    for w, (ids, n) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            counts[pair] += n
            where.setdefault(pair, set()).add(w)

    # 3. a heap of (count, pair); a changed count pushes a new entry, and one that no longer
    # matches `counts` is stale, skipped when popped
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
            old, n = words[w], freqs[w]
            words[w] = new = replace_pair(old, pair, new_id)
            old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
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
                else:  # gone from every word
                    del counts[p]
                    where.pop(p, None)
    return tokens


class ByteLevelTokenizer:
    """Any text encodes; ids can end mid-character. Subclasses set self.enc (tiktoken's)."""

    def encode(self, text):
        return self.enc.encode(text, allowed_special="all")  # "<|endoftext|>" -> eot_id

    def decode(self, ids):
        return self.enc.decode(ids, errors="replace")  # a split character shows as U+FFFD

    def unknown_chars(self, text):
        return []


class BPETokenizer(ByteLevelTokenizer):
    """Our trained BPE: ids 0..len(tokens)-1 are the tokens by rank, then the special tokens."""

    def __init__(self, tokens, pattern=GPT2_PATTERN, special_tokens=(EOT,)):
        self.tokens, self.pattern = [bytes(t) for t in tokens], pattern
        ranks = {t: i for i, t in enumerate(self.tokens)}
        if len(ranks) != len(self.tokens):
            raise TinyLLMError("the bpe tokenizer has duplicate tokens")
        self.special_tokens = {s: len(self.tokens) + i for i, s in enumerate(special_tokens)}
        self.vocab_size = len(self.tokens) + len(self.special_tokens)
        self.eot_id = self.special_tokens.get(EOT)
        self.enc = tiktoken.Encoding(
            name=f"tinyllm-bpe-{self.vocab_size}",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )

    def to_dict(self):  # bytes as hex: a checkpoint holds plain data only
        return {
            "kind": "bpe",
            "pattern": self.pattern,
            "tokens": [t.hex() for t in self.tokens],
            "special_tokens": dict(self.special_tokens),
        }


class GPT2Tokenizer(ByteLevelTokenizer):
    """OpenAI's GPT-2 tokenizer: 50,257 tokens, <|endoftext|> the last; our special tokens after."""

    def __init__(self, special_tokens=(EOT,)):
        try:
            gpt2 = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline, or a broken cache
            raise TinyLLMError(
                f"could not fetch the GPT-2 tokenizer files ({type(e).__name__}); "
                "train.py can use --tokenizer bpe or char"
            ) from None
        more = {s: gpt2.n_vocab + i for i, s in enumerate(t for t in special_tokens if t != EOT)}
        self.special_tokens = {EOT: gpt2.eot_token, **more}
        self.enc = gpt2
        if more:  # tiktoken's own way to extend an encoding
            self.enc = tiktoken.Encoding(
                name="gpt2-chat",
                pat_str=gpt2._pat_str,
                mergeable_ranks=gpt2._mergeable_ranks,
                special_tokens=self.special_tokens,
            )
        self.vocab_size, self.eot_id = self.enc.n_vocab, gpt2.eot_token

    def to_dict(self):
        return {"kind": "gpt2", "special_tokens": list(self.special_tokens)}
