"""Reading a source's documents: every file kind and the Hub, as pieces of valid UTF-8.

Files are read by their extension: .jsonl/.ndjson, .json, .csv, .tsv and .parquet hold one document per
row in `data.text_column`; any other file is one plain-text document. A text file comes out in pieces of
about a megabyte, each cut after a newline, so nothing ever holds a whole large file in memory. Bytes
that are not UTF-8 stop the read with the file and byte offset, or are replaced (`data.decode_errors`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from flows.data.sources import Source, file_kind, hub_error
from flows.errors import UserError

CHUNK_BYTES = 1 << 20  # a text file is read in pieces of about this size, each ending after a newline


def _open(path: str) -> BinaryIO:
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    try:
        return open(path, "rb")
    except OSError as err:
        raise UserError(f"data.source: cannot read {path}: {err.strerror or err}") from None


def _utf8(piece: bytes, name: str, offset: int, errors: str) -> bytes:
    if piece.isascii():
        return piece
    try:
        piece.decode("utf-8")
        return piece
    except UnicodeDecodeError as err:
        if errors == "strict":
            raise UserError(f"{name}: bytes that are not UTF-8 at byte offset {offset + err.start} "
                            "(set data.decode_errors=replace to replace them)") from None
        return piece.decode("utf-8", "replace").encode("utf-8")


def _pieces(f: BinaryIO, name: str, errors: str, *, whole_lines: bool = False) -> Iterator[bytes]:
    """Valid UTF-8 pieces of a file, each ending after a newline; in a text file, a line longer than four
    chunks is cut at a character boundary (a JSON Lines or CSV file keeps its lines whole)."""
    carry, offset = b"", 0
    while True:
        block = f.read(CHUNK_BYTES)
        data = carry + block if carry else block
        if not block:
            if data:
                yield _utf8(data, name, offset, errors)
            return
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if whole_lines or len(data) < 4 * CHUNK_BYTES:
                carry = data
                continue
            cut = len(data) - 1
            while cut > 0 and data[cut] & 0xC0 == 0x80:  # before the last character's first byte
                cut -= 1
        yield _utf8(data[:cut], name, offset, errors)
        carry, offset = data[cut:], offset + cut


def _text_documents(path: str, errors: str) -> Iterator[tuple[bytes, bool]]:
    with _open(path) as f:
        prev = None
        for piece in _pieces(f, path, errors):
            if prev is not None:
                yield prev, False
            prev = piece
        if prev is not None:
            yield prev, True


def _row_text(value, name: str, where: str, column: str, errors: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{name} {where}: data.text_column {column!r} holds {type(value).__name__}, not text")
    try:
        return value.encode("utf-8") or None
    except UnicodeEncodeError:  # a lone surrogate from a JSON \\ud800 escape
        if errors == "strict":
            raise UserError(f"{name} {where}: text that is not valid Unicode "
                            "(set data.decode_errors=replace to replace it)") from None
        return value.encode("utf-8", "replace") or None


def _missing_column(name: str, column: str, columns) -> UserError:
    shown = ", ".join(map(str, columns)) or "none"
    return UserError(f"data.text_column: {column!r} is not a column of {name}; columns there: {shown}")


def _json_rows(rows, name: str, column: str, errors: str, label: str) -> Iterator[bytes]:
    for n, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{name} {label} {n}: expected a JSON object, got {type(row).__name__}")
        if column not in row:
            raise _missing_column(f"{name} ({label} {n})", column, row.keys())
        text = _row_text(row[column], name, f"{label} {n}", column, errors)
        if text:
            yield text


def _jsonl_documents(path: str, column: str, errors: str) -> Iterator[bytes]:
    def rows() -> Iterator[tuple[int, object]]:
        line_no = 0
        with _open(path) as f:
            for piece in _pieces(f, path, errors, whole_lines=True):
                for line in piece.split(b"\n"):
                    line_no += 1
                    if line.strip():
                        try:
                            yield line_no, json.loads(line)
                        except ValueError as err:
                            raise UserError(f"{path} line {line_no}: not valid JSON ({err})") from None
                line_no -= 1  # the piece ended with a newline: its last "line" was empty
    yield from _json_rows(rows(), path, column, errors, "line")


def _json_documents(path: str, column: str, errors: str) -> Iterator[bytes]:
    """A .json file holding an array of objects (read whole), or JSON Lines under a .json name."""
    with _open(path) as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_documents(path, column, errors)
        return
    with _open(path) as f:
        text = b"".join(_pieces(f, path, errors))
    try:
        rows = json.loads(text)
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    yield from _json_rows(enumerate(rows), path, column, errors, "item")


class _PieceStream(io.RawIOBase):
    """A binary file object over byte pieces (pyarrow's CSV reader reads the validated UTF-8 through it)."""

    def __init__(self, pieces: Iterator[bytes]):
        self._pieces, self._buf = pieces, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._buf = memoryview(piece)
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n


def _csv_documents(path: str, column: str, errors: str, delimiter: str) -> Iterator[bytes]:
    import itertools

    import pyarrow as pa
    import pyarrow.csv as pacsv

    with _open(path) as f:
        pieces = _pieces(f, path, errors, whole_lines=True)
        first = next(pieces, b"")
        header = next(csv.reader(io.StringIO(first.decode("utf-8")), delimiter=delimiter), None)
        if header is None:
            return  # an empty file holds no documents
        if column not in header:
            raise _missing_column(path, column, header)
        try:
            reader = pacsv.open_csv(
                _PieceStream(itertools.chain([first], pieces)),
                read_options=pacsv.ReadOptions(block_size=16 << 20),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(include_columns=[column],
                                                     column_types={column: pa.large_string()}))
            for batch in reader:
                for text in batch.column(0).cast(pa.large_binary()).to_pylist():
                    if text:
                        yield text
        except pa.ArrowInvalid as err:
            raise UserError(f"{path}: {str(err).splitlines()[0]}") from None


def _parquet_documents(path: str, column: str, errors: str) -> Iterator[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as err:
            raise UserError(f"{path}: not a Parquet file ({str(err).splitlines()[0]})") from None
        schema = pf.schema_arrow
        if column not in schema.names:
            raise _missing_column(path, column, schema.names)
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise UserError(f"{path}: data.text_column {column!r} holds {kind}, not text")
        row = 0
        for batch in pf.iter_batches(batch_size=4096, columns=[column]):
            for text in batch.column(0).cast(pa.large_binary()).to_pylist():
                if text:
                    yield _utf8(text, f"{path} row {row}", 0, errors)
                row += 1


def _hf_documents(source: Source, column: str, config: str | None, split: str, errors: str,
                  cache_dir: Path) -> Iterator[bytes]:
    from datasets import load_dataset

    try:
        ds = load_dataset(source.repo_id, config, split=split, streaming=True, revision=source.revision,
                          cache_dir=str(cache_dir))
        for batch in ds.iter(batch_size=1000):
            if column not in batch:
                raise _missing_column(source.spec, column, batch.keys())
            for n, value in enumerate(batch[column]):
                text = _row_text(value, source.spec, f"row {n}", column, errors)
                if text:
                    yield text
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - translated when the user can act on it
        raise (hub_error(source, err) or err) from None


def iter_documents(source: Source, *, text_column: str, decode_errors: str, config: str | None = None,
                   split: str = "train", cache_dir: Path) -> Iterator[tuple[bytes, bool]]:
    """(UTF-8 piece, whether it ends its document) for every document of the source, in order."""
    if source.kind == "hf":
        for text in _hf_documents(source, text_column, config, split, decode_errors, cache_dir):
            yield text, True
        return
    for path in source.files:
        kind = file_kind(path)
        if kind == "text":
            yield from _text_documents(path, decode_errors)
            continue
        if kind == "jsonl":
            rows = _jsonl_documents(path, text_column, decode_errors)
        elif kind == "json":
            rows = _json_documents(path, text_column, decode_errors)
        elif kind == "parquet":
            rows = _parquet_documents(path, text_column, decode_errors)
        else:
            rows = _csv_documents(path, text_column, decode_errors, "\t" if kind == "tsv" else ",")
        for text in rows:
            yield text, True
