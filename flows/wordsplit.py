"""GPT-2's pre-tokenization with numpy: word boundaries and word keys for a whole batch of UTF-8 text at
once, with no Python object per word (the fast paths of bpe prep: bpe_encode.py, bpe_train.py).

`word_starts` gives the same words as `tokenizers`' byte-level pre-tokenizer, which splits text with
GPT-2's pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`. Its
alternatives, at each position, in order:

- ` ?\\p{L}+`, ` ?\\p{N}+`, ` ?[^\\s\\p{L}\\p{N}]+`: a run of letters, of digits or of other characters
  ("punctuation", apostrophes and combining marks included), taking one space before it along;
- `'s|'t|'re|'ve|'m|'ll|'d`: a contraction, where a word would start at an apostrophe (a punctuation run
  swallows apostrophes inside it), even inside a longer word ("'set" is "'s", "et");
- `\\s+(?!\\S)|\\s+`: a run of whitespace; before a word its last character is left to that word (a space
  as its prefix, any other whitespace as a word of its own).

So each character's class (letter, digit, whitespace, other) decides the words. ASCII classes are a
table: "whitespace" is \\t \\n \\x0b \\x0c \\r and space, as `tokenizers`' \\s in ASCII (\\x1c-\\x1f are
punctuation there, unlike in Python's re). Other characters are classed by `tokenizers`' own
regular expressions (\\p{L}, \\p{N}, \\s), once per distinct code point, so that its Unicode tables
decide, as they do in its pre-tokenizer.

`word_keys` packs each ASCII word of up to 8 bytes exactly into one uint64 (7 bits a character, the
length in the top bits); other words of up to 16 bytes get a hash, with bit 63 set, and their bytes to
check it against; longer words have no key.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


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


LETTER, DIGIT, WHITESPACE, OTHER = 0, 1, 2, 3  # a character's class: runs of one class make a word
_RUN_OF_BYTE = np.full(256, OTHER, np.uint8)  # ASCII bytes' classes (the rest are set per character)
_RUN_OF_BYTE[ord("a"): ord("z") + 1] = LETTER
_RUN_OF_BYTE[ord("A"): ord("Z") + 1] = LETTER
_RUN_OF_BYTE[ord("0"): ord("9") + 1] = DIGIT
_RUN_OF_BYTE[list(b"\t\n\x0b\x0c\r ")] = WHITESPACE
_RUN_TABLE = bytes(_RUN_OF_BYTE.tolist())  # for bytes.translate, several times faster than indexing
_UNKNOWN = 255
_CODE_POINT_RUN = None  # every code point's class, filled in as code points are met (_UNKNOWN: not yet)
_APOSTROPHE = ord("'")
_ONE_LETTER = np.zeros(256, bool)
_ONE_LETTER[list(b"stmd")] = True  # 's 't 'm 'd
MAX_KEYED = 16  # longest word word_keys gives a key
_MIX = np.uint64(0x9E3779B97F4A7C15)
HASHED = np.uint64(1 << 63)  # the bit word_keys sets in hashed keys
_TOP_BITS = np.uint64(0x8080808080808080)  # zero in ASCII bytes
_MASK = np.array([(1 << (8 * min(k, 8))) - 1 for k in range(MAX_KEYED + 2)], np.uint64)  # the first k bytes of 8
# A length of up to 8 in the top bits of bytes 0 to 3 (zero in ASCII text).
_LENGTH_BITS = np.array([sum(((n >> b) & 1) << (8 * b + 7) for b in range(4)) for n in range(9)], np.uint64)


def _classes(code_points: np.ndarray) -> np.ndarray:
    """The class of each (non-ASCII) code point, by `tokenizers`' own \\p{L}, \\p{N} and \\s."""
    global _CODE_POINT_RUN
    if _CODE_POINT_RUN is None:
        _CODE_POINT_RUN = np.full(0x110000, _UNKNOWN, np.uint8)
    classes = _CODE_POINT_RUN[code_points]
    new = np.unique(code_points[classes == _UNKNOWN])
    if len(new):
        from tokenizers import Regex, pre_tokenizers

        surrogate = (new >= 0xD800) & (new < 0xE000)  # not text (only invalid UTF-8 gets here)
        _CODE_POINT_RUN[new[surrogate]] = OTHER
        new = new[~surrogate]
        text = "".join(map(chr, new.tolist()))
        for pattern, kind in ((r"\p{L}", LETTER), (r"\p{N}", DIGIT), (r"\s", WHITESPACE)):
            matched = np.ones(len(new), bool)  # what the pattern does not remove
            for _, (a, b) in pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text):
                matched[a:b] = False
            _CODE_POINT_RUN[new[matched]] = kind
        rest = new[_CODE_POINT_RUN[new] == _UNKNOWN]
        _CODE_POINT_RUN[rest] = OTHER
        classes = _CODE_POINT_RUN[code_points]
    return classes


def byte_classes(data: np.ndarray) -> np.ndarray:
    """The class of the character each byte of UTF-8 text belongs to."""
    run = np.frombuffer(data.tobytes().translate(_RUN_TABLE), np.uint8)
    lead = np.flatnonzero(data >= 0xC0)  # the first bytes of multi-byte characters
    if not len(lead):
        return run
    run = run.copy()
    n = len(data)
    first = data[lead].astype(np.int32)
    size = 2 + (first >= 0xE0) + (first >= 0xF0)
    code = first & np.where(size == 2, 0x1F, np.where(size == 3, 0x0F, 0x07))
    for k in range(1, 4):
        more = data[np.minimum(lead + k, n - 1)].astype(np.int32) & 0x3F
        code = np.where(size > k, (code << 6) | more, code)
    classes = _classes(np.minimum(code, 0x10FFFF))  # (clipped: only valid UTF-8 has meaning here)
    run[lead] = classes
    for k in range(1, 4):  # continuation bytes take their character's class
        longer = size > k
        run[np.minimum(lead[longer] + k, n - 1)] = classes[longer]
    return run


def word_starts(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Start positions of the words of rows of text, in order: `data` is their UTF-8, `offsets` the n+1
    row boundaries into it. A row's first word starts at the row's start."""
    n = len(data)
    if n == 0:
        return np.zeros(0, np.int64)
    run = byte_classes(data)
    start = np.empty(n, bool)
    start[0] = True
    np.not_equal(run[1:], run[:-1], out=start[1:])
    rows = offsets[:-1][offsets[:-1] < n]
    row_start = np.zeros(n, bool)
    row_start[rows] = True
    start[rows] = True
    change = np.flatnonzero(start)  # where a run or a row begins: the word starts, before the fixes below
    # The first non-whitespace after whitespace (in its row): the whitespace's last character stands on
    # its own, or, when it is a space, begins the word that follows. (The character before a run's start
    # is the previous run's.)
    kinds = run[change]
    after = change[1:][(kinds[:-1] == WHITESPACE) & (kinds[1:] != WHITESPACE)]
    after = after[~row_start[after]]
    last = after - 1
    for _ in range(3):  # back to the first byte of a multi-byte character
        inside = (data[last] & 0xC0) == 0x80
        last[inside] -= 1
    start[last] = True
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
    """(key, low, high) per word: low and high are its first and next 8 bytes (zero past its end). key is
    low with the length for ASCII words of up to 8 bytes (exact), a hash of (low, high, length) with bit 63
    set for other words of up to 16 bytes (to be checked against low, high and length), and meaningless
    beyond (callers look those words up another way)."""
    padded = np.zeros(len(data) + MAX_KEYED, np.uint8)
    padded[: len(data)] = data
    # Element i: the 8 bytes from data[i] on, as one little-endian number (an unaligned view, no copy).
    windows = np.ndarray((len(data) + MAX_KEYED - 7,), np.dtype("<u8"), buffer=padded, strides=(1,))
    size = np.minimum(lengths, MAX_KEYED + 1)
    low = windows[starts] & _MASK[size]
    high = windows[starts + 8] & _MASK[np.maximum(size - 8, 0)]
    exact = (size <= 8) & (low & _TOP_BITS == 0)
    key = low | _LENGTH_BITS[np.minimum(size, 8)]
    hashed = np.flatnonzero(~exact)
    if len(hashed):
        tail = high[hashed] ^ (size[hashed].astype(np.uint64) << np.uint64(56))
        mixed = (low[hashed] * _MIX) ^ ((tail ^ (tail >> np.uint64(29))) * _MIX)
        key[hashed] = (mixed ^ (mixed >> np.uint64(31))) | HASHED
    return key, low, high


class Words(NamedTuple):
    """The words of a batch, keyed and grouped (`distinct_words`)."""

    starts: np.ndarray   # where each word starts in the batch's bytes
    lengths: np.ndarray  # its length in bytes
    low: np.ndarray      # word_keys' low and high
    high: np.ndarray
    keyed: np.ndarray    # the words with a key (up to MAX_KEYED bytes)
    codes: np.ndarray    # per keyed word, its key's index in uniques
    uniques: np.ndarray  # the distinct keys
    first: np.ndarray    # per distinct key, a keyed word that stands for it
    same: np.ndarray     # per keyed word: its bytes are its key's first word's (False: a hash clash)


def distinct_words(data: np.ndarray, offsets: np.ndarray) -> Words:
    """Split rows of UTF-8 (`data`, with n+1 `offsets`) into words and group those with a key by key; a
    word whose hashed key another word shares with other bytes is marked (callers look it up by text)."""
    import pandas as pd

    starts = word_starts(data, offsets)
    lengths = np.diff(np.append(starts, len(data)))
    key, low, high = word_keys(data, starts, lengths)
    keyed = np.flatnonzero(lengths <= MAX_KEYED)
    codes, uniques = pd.factorize(key[keyed])
    first = np.empty(len(uniques), np.int64)
    first[codes] = keyed
    rep = first[codes]
    same = (low[rep] == low[keyed]) & (high[rep] == high[keyed]) & (lengths[rep] == lengths[keyed])
    return Words(starts, lengths, low, high, keyed, codes, uniques, first, same)

