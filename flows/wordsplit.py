"""GPT-2's pre-tokenization of ASCII text with numpy: word boundaries and word keys for a whole batch at
once, with no Python object per word (BPETokenizer.encode_arrow's fast path).

`ascii_word_starts` gives the same words as `tokenizers`' byte-level pre-tokenizer (the GPT-2 pattern,
flows.tokenizer.GPT2_SPLIT) on ASCII text. The pattern's alternatives, at each position, in order:

- ` ?[A-Za-z]+`, ` ?[0-9]+`, ` ?[^\\s A-Za-z0-9]+`: a run of letters, of digits or of other characters
  ("punctuation", apostrophes included), taking one space before it along;
- `'s|'t|'re|'ve|'m|'ll|'d`: a contraction, where a word would start at an apostrophe (a punctuation run
  swallows apostrophes inside it), even inside a longer word ("'set" is "'s", "et");
- `\\s+(?!\\S)|\\s+`: a run of whitespace; before a word its last character is left to that word (a space
  as its prefix, any other whitespace as a word of its own).

"Whitespace" is \\t \\n \\x0b \\x0c \\r and space (what `tokenizers`' \\s matches in ASCII; \\x1c-\\x1f
are punctuation there, unlike in Python's re).

`word_keys` packs each word of up to 8 characters exactly into one uint64 (7 bits a character, the
length in the top byte); longer words of up to 16 characters get a hash of both halves, with bit 63 set,
and their halves to check it against; longer words have no key.
"""

from __future__ import annotations

import numpy as np

# The split of `tokenizers`' byte-level pre-tokenizer (GPT-2's); the second is the same on ASCII text.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_WS = r"\t\n\x0b\x0c\r "  # what \s matches in ASCII there (not \x1c-\x1f, unlike Python's re)
GPT2_SPLIT_ASCII = (  # letters first: no other branch starts with one, so the result is the same, sooner
    rf""" ?[A-Za-z]+| ?[0-9]+|'(?:s|t|re|ve|m|ll|d)| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+""")

def utf8_buffers(column) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes of all rows, row offsets into them) of an Arrow string column, without copying rows."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_string(arr.type) or pa.types.is_binary(arr.type):
        width = np.int32
    elif pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        width = np.int64
    else:
        arr, width = arr.cast(pa.large_string()), np.int64
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, width)[arr.offset: arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return data[offsets[0]: offsets[-1]], offsets - offsets[0]


LETTER, DIGIT, SPACE, OTHER_WS, PUNCT = 0, 1, 2, 3, 4
_CLASS = np.full(256, PUNCT, np.uint8)
_CLASS[ord("a"): ord("z") + 1] = LETTER
_CLASS[ord("A"): ord("Z") + 1] = LETTER
_CLASS[ord("0"): ord("9") + 1] = DIGIT
_CLASS[list(b"\t\n\x0b\x0c\r")] = OTHER_WS
_CLASS[ord(" ")] = SPACE
_RUN = np.array([0, 1, 2, 2, 3], np.uint8)  # runs: letters, digits, whitespace, punctuation
_RUN_OF_BYTE = _RUN[_CLASS]
_RUN_TABLE = bytes(_RUN_OF_BYTE.tolist())  # for bytes.translate, several times faster than indexing
_APOSTROPHE = ord("'")
_ONE_LETTER = np.zeros(256, bool)
_ONE_LETTER[list(b"stmd")] = True  # 's 't 'm 'd
MAX_KEYED = 16  # longest word word_keys gives a key
_MIX = np.uint64(0x9E3779B97F4A7C15)
HASHED = np.uint64(1 << 63)  # the bit word_keys sets in hashed keys
_MASK = np.array([(1 << (8 * min(k, 8))) - 1 for k in range(10)], np.uint64)  # the first k bytes of 8
# A length of up to 17 in the top bits of bytes 0 to 4 (zero in ASCII text).
_LENGTH_BITS = np.array([sum(((n >> b) & 1) << (8 * b + 7) for b in range(5)) for n in range(MAX_KEYED + 2)], np.uint64)


def ascii_word_starts(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Start positions of the words of ASCII rows, in order: `data` is their UTF-8 (all bytes < 0x80),
    `offsets` the n+1 row boundaries into it. A row's first word starts at the row's start."""
    n = len(data)
    if n == 0:
        return np.zeros(0, np.int64)
    run = np.frombuffer(data.tobytes().translate(_RUN_TABLE), np.uint8)
    start = np.empty(n, bool)
    start[0] = True
    np.not_equal(run[1:], run[:-1], out=start[1:])
    rows = offsets[:-1][offsets[:-1] < n]
    row_start = np.zeros(n, bool)
    row_start[rows] = True
    start[rows] = True
    change = np.flatnonzero(start)  # where a run or a row begins: the word starts, before the fixes below
    # The first non-space after whitespace (in its row): the whitespace's last character stands on its
    # own, or, when it is a space, begins the word that follows. (The character before a run's start is
    # the previous run's.)
    kinds = run[change]
    after = change[1:][(kinds[:-1] == 2) & (kinds[1:] != 2)]
    after = after[~row_start[after]]
    start[after - 1] = True
    start[after[data[after - 1] == ord(" ")]] = False
    # Contractions: an apostrophe where a word starts, then s t m d, or re ve ll, all in its row.
    apostrophes = change[data[change] == _APOSTROPHE]
    apostrophes = apostrophes[start[apostrophes]]
    row_end = offsets[np.searchsorted(offsets, apostrophes, side="right")]
    first = data[np.minimum(apostrophes + 1, n - 1)]
    second = data[np.minimum(apostrophes + 2, n - 1)]
    short = _ONE_LETTER[first] & (apostrophes + 2 <= row_end)
    long_ = (((first == ord("r")) | (first == ord("v"))) & (second == ord("e"))
             | (first == ord("l")) & (second == ord("l"))) & (apostrophes + 3 <= row_end)
    for found, size in ((apostrophes[short], 2), (apostrophes[long_], 3)):
        for inside in range(1, size):
            start[found + inside] = False
        end = found + size
        start[end[end < n]] = True
    return np.flatnonzero(start)


def word_keys(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key, low, high) per word: low and high are its first and next 8 bytes (zero past its end; high
    also holds the length, in top bits of bytes, which are free in ASCII, and is zero for words of up to
    8 bytes); key is low with the length for words of up to 8 bytes (exact), a hash of (low, high) with
    bit 63 set for 9 to 16, and meaningless beyond (callers look those words up another way)."""
    padded = np.zeros(len(data) + MAX_KEYED, np.uint8)
    padded[: len(data)] = data
    # Element i: the 8 bytes from data[i] on, as one little-endian number (an unaligned view, no copy).
    windows = np.ndarray((len(data) + MAX_KEYED - 7,), np.dtype("<u8"), buffer=padded, strides=(1,))
    size = np.minimum(lengths, MAX_KEYED + 1)
    low = windows[starts]
    low &= _MASK[np.minimum(size, 8)]
    key = low | _LENGTH_BITS[size]
    longer = np.flatnonzero(size > 8)
    high = np.zeros(len(starts), np.uint64)
    if len(longer):
        tail = windows[starts[longer] + 8] & _MASK[size[longer] - 8] | _LENGTH_BITS[size[longer]]
        high[longer] = tail
        mixed = (low[longer] * _MIX) ^ ((tail ^ (tail >> np.uint64(29))) * _MIX)
        key[longer] = (mixed ^ (mixed >> np.uint64(31))) | HASHED
    return key, low, high


def segments(data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut rows into pieces that split into words on their own exactly as inside their row: (boundaries,
    non_ascii) with a flag per piece, True for the few pieces around non-ASCII characters (for the Unicode
    pattern), False for ASCII ones (for ascii_word_starts). Empty rows have no piece.

    A cut goes only between two ASCII characters that GPT-2's pattern always separates and that no
    alternative looks past: a letter, a digit or punctuation next to a character of another of these
    classes, not after an apostrophe (which may start a contraction) and not next to whitespace or \\x1c to
    \\x1f (whitespace in some Unicode tables)."""
    rows = np.unique(offsets)
    high = np.flatnonzero(data >= 0x80)
    if not len(high):
        return rows, np.zeros(len(rows) - 1, bool)
    # Cuts are looked for in the rows that hold non-ASCII bytes only (all rows when those are most).
    holding = np.unique(np.searchsorted(rows, high, side="right") - 1)
    sizes = rows[holding + 1] - rows[holding]
    if sizes.sum() * 2 > len(data):
        where, part = None, data
    else:
        where = np.repeat(rows[holding] - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes) + np.arange(int(sizes.sum()))
        part = data[where]
    run = _RUN_OF_BYTE[part]
    plain = (part < 0x80) & (run != 2) & ((part < 0x1C) | (part > 0x1F))
    ok = plain[:-1] & plain[1:] & (run[:-1] != run[1:]) & (part[:-1] != _APOSTROPHE)
    if where is None:
        safe = np.flatnonzero(ok) + 1
    else:
        safe = where[1:][ok & (where[1:] == where[:-1] + 1)]
    row = np.searchsorted(offsets, high, side="right")
    row_start, row_end = offsets[row - 1], offsets[row]
    before = np.searchsorted(safe, high, side="right")
    start = np.maximum(np.concatenate([[0], safe])[before], row_start)
    end = np.minimum(np.concatenate([safe, [len(data)]])[before], row_end)
    # Overlapping pieces (sorted by start and by end) become one.
    new = np.concatenate([[True], start[1:] >= end[:-1]])
    start = start[new]
    end = np.maximum.accumulate(end)[np.concatenate([np.flatnonzero(new)[1:] - 1, [len(end) - 1]])]
    bounds = np.unique(np.concatenate([rows, start, end]))
    return bounds, np.isin(bounds[:-1], start)
