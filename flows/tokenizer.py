"""Tokenizers the pipeline trains with, all saved as JSON (tokenizer.json), never pickled.

Every kind has the interface evaluation, the registry's pyfunc model and the CLI use: `encode(str) ->
list[int]`, `decode(list[int]) -> str`, `vocab_size`, `eot_id` and `kind`. The end-of-text token separates
documents and decodes to nothing, so the UTF-8 bytes of decoded tokens are exactly the bytes of the text
they cover (what bits per byte divides by). Data preparation also uses `encode_arrow` (a whole Arrow string
column at once, vectorised) and `token_bytes` (UTF-8 bytes per id).

- char: one id per character seen in the corpus, in code-point order, then end-of-text.
- byte: the 256 byte values of UTF-8, then end-of-text (257 ids).
- bpe: byte-level BPE with GPT-2 pre-tokenization, as Hugging Face `tokenizers` trains it; tokenizer.json is
  that library's own format, with end-of-text as the special token `<|endoftext|>`. Data preparation trains
  it with flows/bpe_train.py (the same result as the library's BpeTrainer, faster) and encodes whole Arrow
  columns with flows/bpe_encode.py (the same ids as the library's encode, faster).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from flows.errors import UserError
from flows.wordsplit import utf8_buffers

EOT = "<|endoftext|>"
KINDS = ("char", "byte", "bpe")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32: the dtype of train.bin and val.bin."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _code_points(data: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Code points of the valid UTF-8 multi-byte characters beginning at data[starts]."""
    lead = data[starts].astype(np.uint32)
    length = 2 + (lead >= 0xE0) + (lead >= 0xF0)
    cp = lead & np.where(length == 2, 0x1F, np.where(length == 3, 0x0F, 0x07)).astype(np.uint32)
    for k in (1, 2, 3):
        more = length > k
        cp[more] = (cp[more] << 6) | (data[starts[more] + k] & 0x3F)
    return cp


def _not_unicode(text: str, err: UnicodeEncodeError) -> UserError:
    """The error for a str that has no UTF-8 form (a lone surrogate, as JSON's "\\ud800" decodes to)."""
    return UserError(f"text is not valid Unicode: {text[err.start]!r} at character {err.start} ({err.reason})")


class CharTokenizer:
    """One id per character of the corpus (in code-point order) plus end-of-text, the last id."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = list(chars)
        if any(not isinstance(ch, str) or len(ch) != 1 for ch in self.chars) or len(set(self.chars)) != len(self.chars):
            raise UserError("char tokenizer: 'chars' must hold distinct single characters")
        self.eot_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        codes = np.fromiter(map(ord, self.chars), np.int64, len(self.chars))
        # Code point -> id; -1 marks characters outside the vocabulary (a missing one, or past the end).
        self._lut = np.full(max(128, int(codes.max(initial=0)) + 2), -1, np.int32)
        self._lut[codes] = np.arange(len(codes), dtype=np.int32)
        self._pieces = self.chars + [""]
        # Byte -> id for ASCII (ids in code-point order put ASCII characters first, all below 128);
        # 0xFF marks an ASCII byte outside the vocabulary, 0xFE any byte of a multi-byte character.
        self._ascii_table = bytes([min(int(i), 0xFF) if i >= 0 else 0xFF for i in self._lut[:128]] + [0xFE] * 128)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    def _ids(self, codepoints: np.ndarray) -> np.ndarray:
        looked_up = codepoints
        if codepoints.dtype != np.uint8:  # past the table: the last entry, which is -1
            looked_up = np.minimum(codepoints, np.uint32(len(self._lut) - 1))
        ids = self._lut[looked_up]
        if ids.size and ids.min() < 0:  # named as they are, not as clamped for the lookup
            unknown = sorted({chr(c) for c in codepoints[ids < 0][:1000].tolist()})
            raise UserError(f"text has characters outside the char vocabulary: {''.join(unknown)[:20]!r}")
        return ids

    def encode(self, text: str) -> list[int]:
        try:
            codepoints = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        except UnicodeEncodeError as err:
            raise _not_unicode(text, err) from None
        return self._ids(codepoints).tolist()

    def decode(self, ids) -> str:
        n = len(self._pieces)
        return "".join(self._pieces[i] for i in ids if 0 <= i < n)

    def encode_arrow(self, column) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all rows concatenated, ids per row) of an Arrow string column."""
        data, offsets = utf8_buffers(column)
        dtype = token_dtype(self.vocab_size)
        ids = np.frombuffer(data.tobytes().translate(self._ascii_table), np.uint8)
        top = int(ids.max(initial=0))
        if top == 0xFF:
            self._ids(data[ids == 0xFF])  # raises, naming the characters
        if top < 0xFE:  # all ASCII: one byte, one character
            return ids.astype(dtype), np.diff(offsets)
        # Multi-byte characters: the id goes where the first byte was, continuation bytes are dropped.
        high = np.flatnonzero(data >= 0x80)
        first = data[high] >= 0xC0
        starts, continuations = high[first], high[~first]
        out = ids.astype(dtype)
        out[starts] = self._ids(_code_points(data, starts))
        keep = np.ones(len(data), bool)
        keep[continuations] = False
        return out[keep], np.diff(offsets) - np.diff(np.searchsorted(continuations, offsets))

    def token_bytes(self) -> np.ndarray:
        return np.array([len(ch.encode("utf-8")) for ch in self.chars] + [0], np.int64)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars, "eot": EOT}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False))


class ByteTokenizer:
    """The 256 byte values of the UTF-8 encoding, then end-of-text (id 256)."""

    kind = "byte"
    eot_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as err:
            raise _not_unicode(text, err) from None

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def encode_arrow(self, column) -> tuple[np.ndarray, np.ndarray]:
        data, offsets = utf8_buffers(column)
        return data.astype(np.uint16), np.diff(offsets)

    def token_bytes(self) -> np.ndarray:
        return np.array([1] * 256 + [0], np.int64)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "eot": EOT}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))


class BPETokenizer:
    """Byte-level BPE from Hugging Face `tokenizers`; end-of-text is the special token `<|endoftext|>`."""

    kind = "bpe"

    def __init__(self, tok):
        # A literal "<|endoftext|>" in a document is text, not a document boundary.
        tok.encode_special_tokens = True
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise UserError(f"bpe tokenizer has no {EOT} token")
        self._tok = tok
        self.eot_id = eot
        self.vocab_size = tok.get_vocab_size()
        self._words = None  # encode_arrow's word cache, built on first use

    @classmethod
    def train(cls, batches: Iterator[list[str]], vocab_size: int, *, show_progress: bool = False) -> "BPETokenizer":
        """Train on batches of texts to at most vocab_size ids (fewer when the corpus runs out of merges).
        flows.bpe_train gives `tokenizers`' BpeTrainer's result faster; without the `pandas` package,
        BpeTrainer runs (show_progress: its progress bars)."""
        from importlib.util import find_spec

        if not find_spec("pandas"):
            return cls(train_with_tokenizers(batches, vocab_size, show_progress=show_progress))
        from flows.bpe_train import train_bpe

        return cls(train_bpe(batches, vocab_size, EOT))

    @classmethod
    def from_str(cls, text: str) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def __getstate__(self) -> dict:  # for datasets' worker processes
        return {"json": self._tok.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(type(self).from_str(state["json"])._tok)

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")  # `tokenizers` would fail on a lone surrogate with a bare TypeError
        except UnicodeEncodeError as err:
            raise _not_unicode(text, err) from None
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def encode_arrow(self, column) -> tuple[np.ndarray, np.ndarray]:
        """encode on every row, several times faster (flows/bpe_encode.py): rows are split into words as the
        byte-level pre-tokenizer splits them (with numpy, flows/wordsplit.py) and each
        distinct word is encoded once by the BPE model, then copied. The ids equal encode's. Without the
        `pandas` package, every row goes through `tokenizers`."""
        dtype = token_dtype(self.vocab_size)
        if self._words is None:
            try:
                from flows.bpe_encode import WordEncoder

                self._words = WordEncoder(self._tok.to_str())
            except ImportError:
                self._words = False
        if not self._words:
            texts = column.to_pylist()
            rows = [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]
            counts = np.fromiter(map(len, rows), np.int64, len(rows))
            return np.fromiter(itertools.chain.from_iterable(rows), dtype, int(counts.sum())), counts
        return self._words.encode_arrow(column, dtype)

    def token_bytes(self) -> np.ndarray:
        # Byte-level tokens spell one byte per character; special tokens stand for no text.
        table = np.zeros(self.vocab_size, np.int64)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for token, i in self._tok.get_vocab().items():
            table[i] = 0 if token in special else len(token)
        return table

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))


def train_with_tokenizers(batches: Iterator[list[str]], vocab_size: int, *, show_progress: bool = False):
    """Byte-level BPE with GPT-2 pre-tokenization trained by `tokenizers`' own BpeTrainer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(batches, trainer)
    return tok


def new_tokenizer(kind: str, chars: Iterable[str] = ()) -> CharTokenizer | ByteTokenizer:
    """A char (from its alphabet) or byte tokenizer; bpe ones are trained with `BPETokenizer.train`."""
    if kind == "char":
        return CharTokenizer(sorted(set(chars)))
    if kind == "byte":
        return ByteTokenizer()
    raise UserError(f"data.tokenizer: unknown tokenizer {kind!r} (choose one of {', '.join(KINDS)})")


def load_tokenizer(path: str | Path):
    """Read tokenizer.json (a file, or the directory holding it) written by any tokenizer's `save`."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text)
    except FileNotFoundError:
        raise UserError(f"tokenizer file not found: {p}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{p}: not a JSON tokenizer file ({err})") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "char":
        return CharTokenizer(data.get("chars", []))
    if kind == "byte":
        return ByteTokenizer()
    if kind is None and isinstance(data, dict) and isinstance(data.get("model"), dict) \
            and data["model"].get("type") == "BPE":
        return BPETokenizer.from_str(text)
    raise UserError(f"{p}: unknown tokenizer kind {kind!r}")
