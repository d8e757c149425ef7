"""BPETokenizer.encode_arrow: byte-level BPE on a whole Arrow column through a cache of word encodings.

Rows are cut into pieces (wordsplit.segments): ASCII pieces are split into GPT-2's words and keyed with
numpy, a batch at once (wordsplit.ascii_word_starts, word_keys), so that Python works once per new
distinct word, not once per word; the few pieces around other characters are split with the Unicode
pattern (the `regex` package) and looked up by text. Each distinct word is encoded once by the BPE model
(`tokenizers`, on that word alone) and its ids copied wherever it occurs.
"""

from __future__ import annotations

import itertools
import re

import numpy as np

from flows.wordsplit import (GPT2_SPLIT, GPT2_SPLIT_ASCII, HASHED, MAX_KEYED, ascii_word_starts, segments,
                             utf8_buffers, word_keys)

WORD_CACHE = 1_000_000  # distinct words remembered before starting over (bounds the memory)


class WordEncoder:
    """Byte-level BPE through a cache of word encodings (see the module docstring)."""

    def __init__(self, tokenizer_json: str):
        from importlib.util import find_spec

        if find_spec("pandas") is None:  # its hash table keys the words; without it (or regex), no cache
            raise ImportError("pandas")
        import regex  # `tokenizers`' pattern needs \p{L}; Python's re has no such class
        from tokenizers import Tokenizer, pre_tokenizers

        self._split_unicode = regex.compile(GPT2_SPLIT).findall
        self._split_ascii = re.compile(GPT2_SPLIT_ASCII).findall  # the same on ASCII text, twice as fast
        self._model = Tokenizer.from_str(tokenizer_json)  # on one word: bytes to symbols, no further split
        self._model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._model.encode_special_tokens = True
        self._reset()

    def _reset(self) -> None:
        self._index: dict[str, int] = {}  # word -> row of the tables below
        # ASCII words of up to 16 bytes by wordsplit.word_keys key, sorted: key, row, and (for hashed keys)
        # the word's bytes to check the hash against.
        self._keys = np.zeros(0, np.uint64)
        self._key_rows = np.zeros(0, np.int64)
        self._key_low = np.zeros(0, np.uint64)
        self._key_high = np.zeros(0, np.uint64)
        self._start = np.zeros(0, np.int64)  # where the word's ids begin in _ids
        self._len = np.zeros(0, np.int32)
        self._ids = np.zeros(0, np.int32)

    def _add(self, words: list[str]) -> int:
        """Encode new words into the tables; returns the row of the first."""
        first = len(self._len)
        encodings = self._model.encode_batch_fast(words, add_special_tokens=False)
        lens = np.fromiter((len(e.ids) for e in encodings), np.int32, len(words))
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32, int(lens.sum()))
        self._start = np.concatenate([self._start, len(self._ids) + np.cumsum(lens) - lens])
        self._len = np.concatenate([self._len, lens])
        self._ids = np.concatenate([self._ids, ids])
        return first

    def _rows_of(self, words: list[str]) -> np.ndarray:
        """Table rows of words, encoding the new ones."""
        get = self._index.get
        idx = np.array([get(w, -1) for w in words], np.int64)
        missing = np.flatnonzero(idx < 0).tolist()
        if missing:
            new = list(dict.fromkeys(words[i] for i in missing))
            self._index.update(zip(new, range(self._add(new), len(self._len))))
            idx[missing] = [self._index[words[i]] for i in missing]
        return idx

    def _gather(self, idx: np.ndarray, words_per_text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lens = self._len[idx]
        ends = np.cumsum(lens)
        # Each word's ids, copied from the table in order: position = word start + offset within the word.
        ids = self._ids[np.repeat(self._start[idx] - (ends - lens), lens) + np.arange(int(ends[-1]) if len(ends) else 0)]
        words_before = np.concatenate([[0], np.cumsum(words_per_text, dtype=np.int64)])
        return ids, np.diff(np.concatenate([[0], ends])[words_before])

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts concatenated, ids per text)."""
        if len(self._len) > WORD_CACHE:
            self._reset()
        rows = [self._split_ascii(t) if t.isascii() else self._split_unicode(t) for t in texts]
        idx = self._rows_of(list(itertools.chain.from_iterable(rows)))
        return self._gather(idx, np.fromiter(map(len, rows), np.int64, len(rows)))

    def encode_ascii(self, data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """encode on ASCII rows given as UTF-8 bytes and row offsets, split and looked up with numpy: Python
        works once per new distinct word, not once per word (wordsplit.py)."""
        import pandas as pd

        if len(self._len) > WORD_CACHE:
            self._reset()
        starts = ascii_word_starts(data, offsets)
        lengths = np.diff(np.append(starts, len(data)))
        key, low, high = word_keys(data, starts, lengths)
        keyed = np.flatnonzero(lengths <= MAX_KEYED)
        codes, uniques = pd.factorize(key[keyed])
        first = np.empty(len(uniques), np.int64)  # a word of each distinct key, to stand for it
        first[codes] = keyed
        # Words whose hash another word of the batch, or a known word, shares go to the lookup by text.
        hashed = np.flatnonzero(lengths[keyed] > 8)
        rep = first[codes[hashed]]
        clash_words = hashed[(low[rep] != low[keyed[hashed]]) | (high[rep] != high[keyed[hashed]])]
        if len(self._keys):
            at = np.minimum(np.searchsorted(self._keys, uniques), len(self._keys) - 1)
            found = self._keys[at] == uniques
            rows = np.where(found, self._key_rows[at], -1)
            clash = found & (uniques >= HASHED) & ((self._key_low[at] != low[first]) | (self._key_high[at] != high[first]))
        else:
            found, clash = np.zeros(len(uniques), bool), np.zeros(len(uniques), bool)
            rows = np.full(len(uniques), -1, np.int64)
        new = np.flatnonzero(~found)
        if len(new):
            text = data.tobytes()
            words = [text[a: a + n].decode("ascii") for a, n in zip(starts[first[new]].tolist(), lengths[first[new]].tolist())]
            rows[new] = np.arange(self._add(words), len(self._len))
            order = new[np.argsort(uniques[new])]
            where = np.searchsorted(self._keys, uniques[order])
            self._keys = np.insert(self._keys, where, uniques[order])
            self._key_rows = np.insert(self._key_rows, where, rows[order])
            self._key_low = np.insert(self._key_low, where, low[first[order]])
            self._key_high = np.insert(self._key_high, where, high[first[order]])
        idx = np.full(len(starts), -1, np.int64)
        idx[keyed] = rows[codes]
        idx[keyed[clash[codes]]] = -1
        idx[keyed[clash_words]] = -1
        rest = np.flatnonzero(idx < 0)  # longer words, and any whose hash clashed
        if len(rest):
            text = data.tobytes()
            idx[rest] = self._rows_of([text[a: a + n].decode("ascii")
                                       for a, n in zip(starts[rest].tolist(), lengths[rest].tolist())])
        return self._gather(idx, np.diff(np.searchsorted(starts, offsets)))

    def encode_arrow(self, column, dtype) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all rows concatenated as dtype, ids per row) of an Arrow string column."""
        data, offsets = utf8_buffers(column)
        # Pieces of rows: the ASCII ones split with numpy, the few around other characters with the pattern.
        bounds, unicode = segments(data, offsets)
        sizes = np.diff(bounds)
        parts = []  # (pieces, their ids, ids per piece)
        for group in _groups(np.flatnonzero(~unicode), sizes, 1 << 19):  # small: less memory, and faster
            lo, hi = bounds[group[0]], bounds[group[-1] + 1]
            if hi - lo == sizes[group].sum():  # consecutive pieces: the bytes as they are
                parts.append((group, *self.encode_ascii(data[lo:hi], bounds[group[0]: group[-1] + 2] - lo)))
            else:
                ends = np.concatenate([[0], np.cumsum(sizes[group])])
                take = np.repeat(bounds[group] - ends[:-1], sizes[group]) + np.arange(int(ends[-1]))
                parts.append((group, *self.encode_ascii(data[take], ends)))
        for group in _groups(np.flatnonzero(unicode), sizes, 1 << 20):
            texts = [data[a: b].tobytes().decode("utf-8") for a, b in zip(bounds[group].tolist(), bounds[group + 1].tolist())]
            parts.append((group, *self.encode(texts)))
        ids, per_piece = _in_piece_order(len(sizes), parts)
        row = np.searchsorted(offsets, bounds[:-1], side="right") - 1
        return ids.astype(dtype), np.bincount(row, per_piece, minlength=len(offsets) - 1).astype(np.int64)


def _groups(pieces: np.ndarray, sizes: np.ndarray, size: int) -> list[np.ndarray]:
    """pieces in order, cut into groups of about `size` bytes."""
    if not len(pieces):
        return []
    total = np.cumsum(sizes[pieces])
    return np.split(pieces, np.flatnonzero(np.diff(total // size)) + 1)


def _in_piece_order(n: int, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids of all pieces in piece order, ids per piece) from parts that each encoded some pieces."""
    counts, source = np.zeros(n, np.int64), np.zeros(n, np.int64)
    base = 0
    for pieces, ids, per_piece in parts:
        counts[pieces] = per_piece
        source[pieces] = base + np.cumsum(per_piece) - per_piece
        base += len(ids)
    ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    if parts and not np.array_equal(np.concatenate([p[0] for p in parts]), np.arange(n)):
        start = np.cumsum(counts) - counts
        ids = ids[np.repeat(source - start, counts) + np.arange(len(ids))]
    return ids, counts
