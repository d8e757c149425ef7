"""The document table: every document of a corpus as UTF-8 pieces in one Arrow stream file.

`DocumentWriter` appends pieces (columns text, doc, end) in record batches of a few megabytes, so memory
stays bounded whatever the corpus size, and records per document the split it belongs to: a document is
held out for validation when the sha256 of its UTF-8 bytes, read as a fraction of 2**64, falls below
`val_fraction`. The decision depends on the document alone, so adding documents to a corpus never moves
old ones between splits. `CharAlphabet` collects the characters a char tokenizer needs on the same pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema([("text", pa.large_string()), ("doc", pa.int64()), ("end", pa.bool_())])
BATCH_BYTES = 8 << 20


def is_val_document(text: bytes | str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split (a pure function of its content)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return _is_val_digest(hashlib.sha256(data).digest(), val_fraction)


def _is_val_digest(digest: bytes, val_fraction: float) -> bool:
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


class CharAlphabet:
    """The set of characters in a stream of UTF-8 pieces; cheap for mostly-ASCII text."""

    def __init__(self):
        self._ascii = b""  # ASCII bytes seen so far: deleted from each piece before looking closer
        self._chars: set[str] = set()
        self._seen: np.ndarray | None = None  # code points seen, for pieces with much non-ASCII text

    def add(self, piece: bytes) -> None:
        rest = piece.translate(None, self._ascii)
        if not rest:
            return
        if len(rest) < 1 << 16:
            new = set(rest.decode("utf-8"))
        else:
            if self._seen is None:
                self._seen = np.zeros(0x110000, bool)
            codes = np.frombuffer(rest.decode("utf-8").encode("utf-32-le"), np.uint32)
            self._seen[codes] = True
            new = {chr(c) for c in np.unique(codes[codes < 0x80]).tolist()}
        self._ascii += bytes(sorted(ord(c) for c in new if c.isascii()))
        self._chars |= new

    def chars(self) -> list[str]:
        found = set(self._chars)
        if self._seen is not None:
            found.update(map(chr, np.flatnonzero(self._seen).tolist()))
        return sorted(found)


@dataclass
class DocumentTable:
    """What the writer produced: the file, its rows, and per-split document and byte counts."""

    path: Path
    rows: int
    doc_val: np.ndarray  # bool per document: held out for validation
    documents: dict[str, int]
    bytes: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return self.bytes["train"] + self.bytes["val"]

    def iter_batches(self) -> Iterator[pa.RecordBatch]:
        """The record batches, read (not memory-mapped) one at a time, so each is freed after use."""
        with pa.OSFile(str(self.path)) as f:
            yield from pa.ipc.open_stream(f)


class DocumentWriter:
    """Appends document pieces to an Arrow stream file; see the module docstring."""

    def __init__(self, path: Path, val_fraction: float, alphabet: CharAlphabet | None = None):
        self.path, self.val_fraction, self.alphabet = Path(path), val_fraction, alphabet
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
        self._pieces: list[bytes] = []
        self._docs: list[int] = []
        self._ends: list[bool] = []
        self._buffered = 0
        self._hash = hashlib.sha256()
        self._doc_bytes = 0
        self._doc_val: list[bool] = []
        self.rows = 0
        self.documents = {"train": 0, "val": 0}
        self.bytes = {"train": 0, "val": 0}

    def add(self, piece: bytes, end: bool) -> None:
        """Append a non-empty piece of the current document; `end` closes the document."""
        self._pieces.append(piece)
        self._docs.append(len(self._doc_val))
        self._ends.append(end)
        self._buffered += len(piece)
        self._hash.update(piece)
        self._doc_bytes += len(piece)
        if self.alphabet is not None:
            self.alphabet.add(piece)
        if end:
            split = "val" if _is_val_digest(self._hash.digest(), self.val_fraction) else "train"
            self._doc_val.append(split == "val")
            self.documents[split] += 1
            self.bytes[split] += self._doc_bytes
            self._hash, self._doc_bytes = hashlib.sha256(), 0
        if self._buffered >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pieces:
            return
        offsets = np.zeros(len(self._pieces) + 1, np.int64)
        np.cumsum([len(p) for p in self._pieces], out=offsets[1:])
        text = pa.LargeStringArray.from_buffers(len(self._pieces), pa.py_buffer(offsets),
                                                pa.py_buffer(b"".join(self._pieces)))
        batch = pa.RecordBatch.from_arrays(
            [text, pa.array(np.asarray(self._docs, np.int64)), pa.array(self._ends, pa.bool_())], schema=SCHEMA)
        self._writer.write_batch(batch)
        self.rows += len(self._pieces)
        self._pieces, self._docs, self._ends, self._buffered = [], [], [], 0

    def close(self) -> DocumentTable:
        self._flush()
        self._writer.close()
        self._sink.close()
        return DocumentTable(self.path, self.rows, np.asarray(self._doc_val, bool), dict(self.documents),
                             dict(self.bytes))
