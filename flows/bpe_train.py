"""Byte-level BPE training that gives `tokenizers`' BpeTrainer's result (the same vocabulary and merges,
so the same tokenizer.json), several times faster on two cores (BPETokenizer.train's fast path).

`tokenizers` spends most of its training time counting words: about 1.5 microseconds of Rust per word
occurrence, in its pre-tokenizer. Here the words are counted with numpy (wordsplit.py: the text split
and keyed a whole batch at once), and the merges are then computed from the counts as BpeTrainer computes them:

- ids: the special tokens, then the alphabet (every byte's character, in code-point order), then one
  id per merge;
- repeatedly, the pair of adjacent symbols with the highest count over all words (count times
  occurrences; ties to the smaller pair of ids) is merged in the words a queue entry lists for it, and
  the counts of the neighbouring pairs are updated; an entry whose count went stale goes back into the
  queue with the current count; words where a pair appears anew are queued with it as a new entry;
- until the vocabulary is full or no pair is left.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

import numpy as np


def _byte_chars() -> str:
    """The character GPT-2's byte-level alphabet gives each byte value, as a str.translate table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return "".join(chars[b] for b in range(256))


BYTE_CHARS = _byte_chars()
_TRANSLATE = {i: c for i, c in enumerate(BYTE_CHARS)}


def byte_level(word: str) -> str:
    """The word as the byte-level pre-tokenizer spells it: one alphabet character per UTF-8 byte."""
    return word.encode("utf-8").decode("latin-1").translate(_TRANSLATE)


def count_words(batches: Iterable[list[str]]) -> Counter:
    """Occurrences of each GPT-2 word of the texts (words as they are, not byte-level)."""
    import pyarrow as pa

    from flows.wordsplit import MAX_KEYED, distinct_words, utf8_buffers

    counts: Counter = Counter()
    for texts in batches:
        data, offsets = utf8_buffers(pa.array(texts, pa.large_string()))
        starts, lengths, _, _, keyed, codes, uniques, first, same = distinct_words(data, offsets)
        per_key = np.bincount(codes[same], minlength=len(uniques))
        text = data.tobytes()
        for s, n, c in zip(starts[first].tolist(), lengths[first].tolist(), per_key.tolist()):
            if c:
                counts[text[s: s + n].decode("utf-8")] += c
        rest = np.concatenate([np.flatnonzero(lengths > MAX_KEYED), keyed[~same]])
        counts.update(text[s: s + n].decode("utf-8") for s, n in zip(starts[rest].tolist(), lengths[rest].tolist()))
    return counts


def train_merges(word_counts: dict[str, int], vocab_size: int, special_tokens: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """(tokens by id, merges as pairs of ids in order) from byte-level words and their counts."""
    tokens = list(dict.fromkeys(special_tokens))
    ids = {t: i for i, t in enumerate(tokens)}
    for ch in sorted(set(BYTE_CHARS).union(*word_counts)):
        if ch not in ids:
            ids[ch] = len(tokens)
            tokens.append(ch)
    words = [[ids[ch] for ch in w] for w in word_counts]
    counts = list(word_counts.values())
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, (w, c) in enumerate(zip(words, counts)):
        for pair in zip(w, w[1:]):
            pair_count[pair] += c
            where[pair].add(i)
    queue: list = []  # (-count, pair, order, words): the highest count first, then the smaller pair
    order = 0
    for pair, positions in where.items():
        if pair_count[pair] > 0:
            queue.append((-pair_count[pair], pair, order, positions))
            order += 1
    heapq.heapify(queue)
    merges: list[tuple[int, int]] = []
    while len(ids) < vocab_size and queue:
        negative, pair, _, positions = heapq.heappop(queue)
        count = pair_count[pair]
        if -negative != count:
            heapq.heappush(queue, (-count, pair, order, positions))
            order += 1
            continue
        if count < 1:
            break
        a, b = pair
        token = tokens[a] + tokens[b]
        new = ids.get(token)
        if new is None:
            new = ids[token] = len(tokens)
            tokens.append(token)
        merges.append((pair, new))
        added: dict[tuple[int, int], set[int]] = defaultdict(set)
        for i in positions:
            w, c, out, k = words[i], counts[i], [], 0
            while k < len(w):
                if w[k] == a and k + 1 < len(w) and w[k + 1] == b:
                    if out:
                        pair_count[out[-1], a] -= c
                        pair_count[out[-1], new] += c
                        added[out[-1], new].add(i)
                    if k + 2 < len(w):
                        pair_count[b, w[k + 2]] -= c
                        pair_count[new, w[k + 2]] += c
                        added[new, w[k + 2]].add(i)
                    out.append(new)
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            words[i] = out
        for p, positions in added.items():
            if pair_count[p] > 0:
                heapq.heappush(queue, (-pair_count[p], p, order, positions))
                order += 1
    # A pair merged twice (two queue entries for it) keeps its later rank, as `tokenizers` keeps it.
    rank = {pair: r for r, (pair, _) in enumerate(merges)}
    return tokens, sorted(rank, key=rank.__getitem__)


def train_bpe(batches: Iterator[list[str]], vocab_size: int, special_token: str):
    """A `tokenizers` Tokenizer: byte-level BPE with GPT-2 pre-tokenization, trained on the texts."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    counts = count_words(batches)
    tokens, merges = train_merges({byte_level(w): c for w, c in counts.items()}, vocab_size, [special_token])
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [(tokens[a], tokens[b]) for a, b in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(special_token, special=True, normalized=False)])
    return tok

