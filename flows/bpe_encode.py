"""BPETokenizer.encode_arrow: byte-level BPE on a whole Arrow column through a cache of word encodings.

Rows are split into GPT-2's words and keyed with numpy, a batch at once (wordsplit.distinct_words), so that Python works once per new distinct word, not once per word; words too long for a key
(or whose hash clashes) are looked up by text. Each distinct word is encoded once by the BPE model
(`tokenizers`, on that word alone) and its ids copied wherever it occurs.
"""

from __future__ import annotations

import itertools

import numpy as np

from flows.wordsplit import HASHED, distinct_words, utf8_buffers

WORD_CACHE = 1_000_000  # distinct words remembered before starting over (bounds the memory)
GROUP_BYTES = 1 << 19  # rows are encoded in groups of about this size: less memory, and faster


class WordEncoder:
    """Byte-level BPE through a cache of word encodings (see the module docstring)."""

    def __init__(self, tokenizer_json: str):
        import pandas  # noqa: F401  (keys the words: without it, no cache)
        from tokenizers import Tokenizer, pre_tokenizers

        self._model = Tokenizer.from_str(tokenizer_json)  # on one word: bytes to symbols, no further split
        self._model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._model.encode_special_tokens = True
        self._reset()

    def _reset(self) -> None:
        self._index: dict[bytes, int] = {}  # word -> row of the tables below
        # Words of up to 16 bytes by wordsplit.word_keys key, sorted: key, row, and (for hashed keys) the
        # word's bytes and length to check the hash against.
        self._keys = np.zeros(0, np.uint64)
        self._key_rows = np.zeros(0, np.int64)
        self._key_low = np.zeros(0, np.uint64)
        self._key_high = np.zeros(0, np.uint64)
        self._key_len = np.zeros(0, np.int64)
        self._start = np.zeros(0, np.int64)  # where the word's ids begin in _ids
        self._len = np.zeros(0, np.int32)
        self._ids = np.zeros(0, np.int32)

    def _add(self, words: list[bytes]) -> int:
        """Encode new words into the tables; returns the row of the first."""
        first = len(self._len)
        encodings = self._model.encode_batch_fast([w.decode("utf-8") for w in words], add_special_tokens=False)
        lens = np.fromiter((len(e.ids) for e in encodings), np.int32, len(words))
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32, int(lens.sum()))
        self._start = np.concatenate([self._start, len(self._ids) + np.cumsum(lens) - lens])
        self._len = np.concatenate([self._len, lens])
        self._ids = np.concatenate([self._ids, ids])
        return first

    def _rows_of(self, words: list[bytes]) -> np.ndarray:
        """Table rows of words, encoding the new ones."""
        get = self._index.get
        idx = np.array([get(w, -1) for w in words], np.int64)
        missing = np.flatnonzero(idx < 0).tolist()
        if missing:
            new = list(dict.fromkeys(words[i] for i in missing))
            self._index.update(zip(new, range(self._add(new), len(self._len))))
            idx[missing] = [self._index[words[i]] for i in missing]
        return idx

    def _gather(self, idx: np.ndarray, words_per_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lens = self._len[idx]
        ends = np.cumsum(lens)
        # Each word's ids, copied from the table in order: position = word start + offset within the word.
        ids = self._ids[np.repeat(self._start[idx] - (ends - lens), lens) + np.arange(int(ends[-1]) if len(ends) else 0)]
        words_before = np.concatenate([[0], np.cumsum(words_per_row, dtype=np.int64)])
        return ids, np.diff(np.concatenate([[0], ends])[words_before])

    def encode_utf8(self, data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all rows concatenated, ids per row) of rows given as UTF-8 bytes and row offsets, split and
        looked up with numpy: Python works once per new distinct word, not once per word (wordsplit.py)."""
        if len(self._len) > WORD_CACHE:
            self._reset()
        starts, lengths, low, high, keyed, codes, uniques, first, same = distinct_words(data, offsets)
        if len(self._keys):
            at = np.minimum(np.searchsorted(self._keys, uniques), len(self._keys) - 1)
            found = self._keys[at] == uniques
            rows = np.where(found, self._key_rows[at], -1)
            clash = found & (uniques >= HASHED) & ((self._key_low[at] != low[first]) | (self._key_high[at] != high[first])
                                                   | (self._key_len[at] != lengths[first]))
        else:
            found, clash = np.zeros(len(uniques), bool), np.zeros(len(uniques), bool)
            rows = np.full(len(uniques), -1, np.int64)
        text = data.tobytes()
        new = np.flatnonzero(~found)
        if len(new):
            words = [text[a: a + n] for a, n in zip(starts[first[new]].tolist(), lengths[first[new]].tolist())]
            rows[new] = np.arange(self._add(words), len(self._len))
            order = new[np.argsort(uniques[new])]
            where = np.searchsorted(self._keys, uniques[order])
            self._keys = np.insert(self._keys, where, uniques[order])
            self._key_rows = np.insert(self._key_rows, where, rows[order])
            self._key_low = np.insert(self._key_low, where, low[first[order]])
            self._key_high = np.insert(self._key_high, where, high[first[order]])
            self._key_len = np.insert(self._key_len, where, lengths[first[order]])
        idx = np.full(len(starts), -1, np.int64)
        idx[keyed] = rows[codes]
        # Words whose hash another word of the batch, or a known word, shares go to the lookup by text.
        idx[keyed[clash[codes] | ~same]] = -1
        rest = np.flatnonzero(idx < 0)  # longer words, and any whose hash clashed
        if len(rest):
            idx[rest] = self._rows_of([text[a: a + n] for a, n in zip(starts[rest].tolist(), lengths[rest].tolist())])
        return self._gather(idx, np.diff(np.searchsorted(starts, offsets)))

    def encode_arrow(self, column, dtype) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all rows concatenated as dtype, ids per row) of an Arrow string column."""
        data, offsets = utf8_buffers(column)
        ids, counts = [], []
        for lo, hi in _groups(offsets, GROUP_BYTES):
            a, b = offsets[lo], offsets[hi]
            group_ids, group_counts = self.encode_utf8(data[a:b], offsets[lo: hi + 1] - a)
            ids.append(group_ids.astype(dtype))
            counts.append(group_counts)
        if not ids:
            return np.zeros(0, dtype), np.zeros(0, np.int64)
        return np.concatenate(ids), np.concatenate(counts).astype(np.int64)


def _groups(offsets: np.ndarray, size: int) -> list[tuple[int, int]]:
    """(first row, row past the last) of consecutive groups of rows of about `size` bytes, at least one row each."""
    rows = len(offsets) - 1
    if rows <= 0:
        return []
    cuts = np.searchsorted(offsets, np.arange(size, int(offsets[-1]), size), side="right") - 1
    bounds = np.unique(np.concatenate([[0], cuts[cuts > 0], [rows]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
