"""prepare_dataset: a corpus in, train.bin/val.bin/tokenizer.json/meta.json out, content-addressed.

1. Fingerprint the source content (hashed once per run: a source the caller already pinned is not hashed
   again) and the settings; an existing `<workdir>/data/<fingerprint>/` is reused.
2. Read the documents into an Arrow table (documents.py), each document's split decided by its content;
   a corpus whose documents all land in one split (a single file, say) is split by its tail instead,
   nanoGPT's convention: the last `val_fraction` of its tokens.
3. Build the tokenizer: char from the characters of the whole corpus (an alphabet, no statistics, so
   validation text is always encodable); byte; bpe trained on the training split only.
4. Tokenize with datasets' batched `map` on all cores; each batch writes its tokens to part files.
5. Concatenate the parts into train.bin and val.bin, write tokenizer.json and meta.json (which records
   each file's size and checksum), and fsync them all (integrity.py).

All of it happens in a private temporary directory under `<workdir>/data`, locked while its process lives
and renamed into place at the end: a prep killed at any moment leaves no `<fingerprint>` directory (its
leftovers are removed by the next prep), and of two concurrent preps of the same inputs the first rename
wins and the other returns that result. A prep that fails on bad input leaves nothing behind. A published
directory is reused only after its files match meta.json (sizes and checksums); one that does not is set
aside (one check at a time per directory) and rebuilt, with a warning naming the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from flows.config import PipelineConfig
from flows.data.documents import CharAlphabet, DocumentTable, DocumentWriter
from flows.data.integrity import fsync_dir, fsync_files, record_files, verify_prepared
from flows.data.readers import iter_documents
from flows.data.sources import Source, pin_source, resolve_source
from flows.errors import UserError
from flows.tokenizer import KINDS, BPETokenizer, new_tokenizer, token_dtype

FORMAT_VERSION = 2
TMP_PREFIX = ".tmp-"
MAP_BATCH_BYTES = 8 << 20  # text per tokenization batch
PROC_BYTES = 8 << 20  # corpora smaller than this per extra process are tokenized in fewer processes

log = logging.getLogger(__name__)


class PreparedData(BaseModel):
    """What train/evaluate need to know about a prepared dataset (JSON-serialisable)."""

    path: str
    fingerprint: str
    tokenizer: str
    vocab_size: int
    dtype: str
    train_tokens: int
    val_tokens: int
    val_bytes: int
    train_bytes: int = 0
    train_documents: int = 0
    val_documents: int = 0
    split: str = "tail"  # "hash": documents by content hash; "tail": the last val_fraction of the tokens
    reused: bool = False

    def bin_path(self, split: str) -> Path:
        return Path(self.path) / f"{split}.bin"

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.bin_path(split), dtype=self.dtype, mode="r")


def _settings(cfg: PipelineConfig, source: Source) -> dict:
    d = cfg.data
    if d.tokenizer not in KINDS:
        raise UserError(f"data.tokenizer: unknown tokenizer {d.tokenizer!r} (choose one of {', '.join(KINDS)})")
    s: dict = {"tokenizer": d.tokenizer, "val_fraction": d.val_fraction, "decode_errors": d.decode_errors}
    if d.tokenizer == "bpe":
        if d.vocab_size < 257:
            raise UserError(f"data.vocab_size: {d.vocab_size} is too small for bpe (256 bytes + end-of-text)")
        s.update(vocab_size=d.vocab_size, bpe_train_bytes=d.bpe_train_bytes)
    if source.has_rows:
        s["text_column"] = d.text_column
    if source.kind == "hf":
        s.update(config=d.config, split=d.split)
    return s


def fingerprint(source: Source, settings: dict) -> str:
    """16 hex digits of sha256 over the format version, the settings and the pinned source's digest."""
    if not source.digest:
        raise ValueError(f"fingerprint: {source.spec} is not pinned (call pin_source first)")
    h = hashlib.sha256(json.dumps({"v": FORMAT_VERSION, **settings}, sort_keys=True).encode())
    h.update(source.digest.encode())
    return h.hexdigest()[:16]


def dataset_fingerprint(cfg: PipelineConfig, source: Source) -> str:
    """The fingerprint prepare_dataset(cfg, source) gives, from a pinned source (no I/O); UserError when
    cfg.data's settings are invalid."""
    return fingerprint(source, _settings(cfg, source))


def prepare_dataset(cfg: PipelineConfig, source: Source | None = None) -> PreparedData:
    """Prepare (or reuse) the token arrays for cfg.data; see the module docstring. `source` is cfg.data.source
    as the caller already parsed, resolved or pinned it: what it already has is not listed or hashed again."""
    if source is not None and source.spec != cfg.data.source:
        raise ValueError(f"prepare_dataset: source {source.spec!r} is not cfg.data.source {cfg.data.source!r}")
    source = resolve_source(source or cfg.data.source)
    settings = _settings(cfg, source)  # invalid settings fail before a Hub call or a hash
    source = pin_source(source)
    fp = fingerprint(source, settings)
    root = cfg.workdir_path / "data"
    out = root / fp
    if out.exists() and verify_prepared(out) is None:
        return _load(out, cfg, reused=True)
    with _Workspace(root) as ws:
        if out.exists() and not ws.set_aside(out):  # another prep rebuilt it meanwhile
            return _load(out, cfg, reused=True)
        meta = _build(cfg, source, settings, fp, ws.path)
        data = PreparedData(path=str(out), **meta["summary"])
        _check_block_size(data, cfg)
        if not ws.publish(out):  # a concurrent prep of the same inputs finished first: use its result
            return _load(out, cfg, reused=True)
    return data


def _load(out: Path, cfg: PipelineConfig, *, reused: bool) -> PreparedData:
    meta = json.loads((out / "meta.json").read_text())
    data = PreparedData(path=str(out), reused=reused, **meta["summary"])
    _check_block_size(data, cfg)
    return data


def _check_block_size(data: PreparedData, cfg: PipelineConfig) -> None:
    need = cfg.model.block_size + 1
    if data.val_tokens < need or data.train_tokens < need:
        raise UserError(
            f"model.block_size: corpus too small for block_size={cfg.model.block_size}: "
            f"train has {data.train_tokens} tokens, val has {data.val_tokens}, each needs at least {need} "
            f"(use a smaller model.block_size, a larger data.val_fraction or more text)"
        )


def _build(cfg: PipelineConfig, source: Source, settings: dict, fp: str, tmp: Path) -> dict:
    """Steps 2-5 inside the workspace; returns meta.json's content, with the files in tmp/'out'."""
    d = cfg.data
    alphabet = CharAlphabet() if d.tokenizer == "char" else None
    writer = DocumentWriter(tmp / "documents.arrow", d.val_fraction, alphabet)
    for piece, end in iter_documents(source, text_column=d.text_column, decode_errors=d.decode_errors,
                                     config=d.config, split=d.split, cache_dir=tmp / "hf_cache"):
        writer.add(piece, end)
    table = writer.close()
    if not table.rows:
        raise UserError(f"data.source: {source.spec} holds no text (an empty corpus)")
    # Content-hash splitting needs documents on both sides; otherwise split the token stream by its tail.
    tail = not (table.documents["train"] and table.documents["val"])

    if d.tokenizer == "bpe":
        with _progress() as show:
            tok = BPETokenizer.train(_bpe_training_texts(table, tail, d.val_fraction, d.bpe_train_bytes),
                                     d.vocab_size, show_progress=show)
    else:
        tok = new_tokenizer(d.tokenizer, alphabet.chars() if alphabet else ())
    parts = tmp / "parts"
    parts.mkdir()
    _tokenize(table, tok, tail=tail, parts=parts, fp=fp, num_proc=d.num_proc)

    out = tmp / "out"
    out.mkdir()
    dtype = token_dtype(tok.vocab_size)
    splits = _assemble(parts, out, dtype, tail=tail, val_fraction=d.val_fraction)
    if tail:
        splits = _tail_counts(out, dtype, tok, table, splits)
    else:
        splits = {k: {"documents": table.documents[k], "bytes": table.bytes[k], **v} for k, v in splits.items()}
    tok.save(out / "tokenizer.json")
    files = record_files(out)
    summary = dict(fingerprint=fp, tokenizer=tok.kind, vocab_size=tok.vocab_size, dtype=dtype.name,
                   train_tokens=splits["train"]["tokens"], val_tokens=splits["val"]["tokens"],
                   val_bytes=splits["val"]["bytes"], train_bytes=splits["train"]["bytes"],
                   train_documents=splits["train"]["documents"], val_documents=splits["val"]["documents"],
                   split="tail" if tail else "hash")
    meta = {"fingerprint": fp, "format_version": FORMAT_VERSION, "source": source.describe(),
            "settings": settings, "split": summary["split"], "splits": splits, "vocab_size": tok.vocab_size,
            "dtype": dtype.name, "versions": _versions(), "summary": summary, "files": files}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    fsync_files(out)  # durable before the rename publishes it
    return meta


def _bpe_training_texts(table: DocumentTable, tail: bool, val_fraction: float, limit: int | None):
    """Batches of training-split texts: every k-th piece, so that about `limit` bytes spread over the split."""
    train_bytes = int(table.total_bytes * (1 - val_fraction)) if tail else table.bytes["train"]
    stride = max(1, math.ceil(train_bytes / limit)) if limit else 1
    seen_bytes, n = 0, 0
    for batch in table.iter_batches():
        texts = []
        for text, doc in zip(batch.column("text").to_pylist(), batch.column("doc").to_pylist()):
            if tail:
                if seen_bytes >= train_bytes:
                    break
                size = len(text.encode("utf-8"))
                if seen_bytes + size > train_bytes:  # the piece the cut runs through: its head only
                    text = text.encode("utf-8")[: train_bytes - seen_bytes].decode("utf-8", "ignore")
                seen_bytes += size
            elif table.doc_val[doc]:
                continue
            if n % stride == 0:
                texts.append(text)
            n += 1
        if texts:
            yield texts


def _num_proc(requested: int | None, total_bytes: int, batches: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = requested or min(cores, max(1, total_bytes // PROC_BYTES))
    return max(1, min(n, batches))


def _tokenize(table: DocumentTable, tok, *, tail: bool, parts: Path, fp: str, num_proc: int | None) -> None:
    from datasets import Dataset

    ds = Dataset.from_file(str(table.path)).with_format("arrow")
    batch_rows = max(1, int(len(ds) * MAP_BATCH_BYTES / max(table.total_bytes, 1)))
    procs = _num_proc(num_proc, table.total_bytes, math.ceil(len(ds) / batch_rows))
    with _progress():
        ds.map(_encode_batch, batched=True, batch_size=batch_rows, with_indices=True,
               num_proc=procs if procs > 1 else None, load_from_cache_file=False,
               new_fingerprint=f"{fp}-{tok.kind}-tokens", desc=f"Tokenizing ({tok.kind})",
               fn_kwargs={"tok": tok, "doc_val": table.doc_val, "tail": tail, "parts": str(parts)})


def _encode_batch(batch, indices, *, tok, doc_val: np.ndarray, tail: bool, parts: str) -> None:
    """Tokens of one batch of pieces (end-of-text after each document's last) into part files."""
    ids, counts = tok.encode_arrow(batch.column("text"))
    ends = batch.column("end").to_numpy(zero_copy_only=False)
    bounds = np.cumsum(counts)  # where each row's tokens end
    if ends.any():
        ids = np.insert(ids, bounds[ends], tok.eot_id)
        bounds += np.cumsum(ends)
    stem = os.path.join(parts, f"{indices[0]:012d}")
    if tail:
        ids.tofile(f"{stem}.all.bin")
        return None
    # Write each run of consecutive rows of one split as a slice.
    val = doc_val[batch.column("doc").to_numpy()]
    first_rows = np.flatnonzero(np.concatenate([[True], val[1:] != val[:-1]]))
    starts = np.concatenate([[0], bounds])[first_rows]
    stops = np.concatenate([starts[1:], [len(ids)]])
    with open(f"{stem}.train.bin", "wb") as train, open(f"{stem}.val.bin", "wb") as held_out:
        for row, start, stop in zip(first_rows.tolist(), starts.tolist(), stops.tolist()):
            (held_out if val[row] else train).write(ids[start:stop])
    return None


def _append(dst, src: Path, offset: int = 0) -> None:
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while offset < size:
            sent = os.sendfile(dst.fileno(), f.fileno(), offset, size - offset)
            if not sent:
                break
            offset += sent


def _assemble(parts: Path, out: Path, dtype: np.dtype, *, tail: bool, val_fraction: float) -> dict:
    """train.bin and val.bin from the part files, in corpus order; returns {split: {"tokens": n}}."""
    names = ("all",) if tail else ("train", "val")
    for name in names:
        with open(out / ("train.bin" if name == "all" else f"{name}.bin"), "wb") as dst:
            for src in sorted(parts.glob(f"*.{name}.bin")):
                _append(dst, src)
    if tail:  # cut the stream: train.bin keeps its head, val.bin gets the last val_fraction
        n = (out / "train.bin").stat().st_size // dtype.itemsize
        n_train = int(n * (1 - val_fraction))
        with open(out / "val.bin", "wb") as dst:
            _append(dst, out / "train.bin", n_train * dtype.itemsize)
        os.truncate(out / "train.bin", n_train * dtype.itemsize)
    return {k: {"tokens": (out / f"{k}.bin").stat().st_size // dtype.itemsize} for k in ("train", "val")}


def _tail_counts(out: Path, dtype: np.dtype, tok, table: DocumentTable, splits: dict) -> dict:
    """Bytes and documents on each side of a tail split, from the tokens of val.bin."""
    sizes = tok.token_bytes()
    val_bytes, val_docs = 0, 0
    with open(out / "val.bin", "rb") as f:
        while (chunk := np.fromfile(f, dtype, count=1 << 22)).size:
            val_bytes += int(sizes[chunk].sum())
            val_docs += int((chunk == tok.eot_id).sum())
    train = np.memmap(out / "train.bin", dtype, mode="r") if splits["train"]["tokens"] else None
    cut_inside = train is not None and int(train[-1]) != tok.eot_id
    documents = int(len(table.doc_val))
    return {"train": {"documents": documents - val_docs + int(cut_inside), "bytes": table.total_bytes - val_bytes,
                      **splits["train"]},
            "val": {"documents": val_docs, "bytes": val_bytes, **splits["val"]}}


def _versions() -> dict:
    from importlib.metadata import version

    libs = {name: version(name) for name in ("datasets", "tokenizers", "pyarrow", "numpy")}
    return {"python": sys.version.split()[0], **libs}


@contextmanager
def _progress():
    """datasets' progress bars (and the bpe trainer's) only on an interactive terminal."""
    import datasets
    from datasets.utils.logging import is_progress_bar_enabled

    was, show = is_progress_bar_enabled(), sys.stderr.isatty()
    (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    try:
        yield show
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


class _Workspace:
    """A temporary directory under <workdir>/data, flock-ed while its process lives; see the module docstring."""

    def __init__(self, root: Path):
        self.root = root
        self._created: list[Path] = []
        self._fd: int | None = None

    def __enter__(self) -> "_Workspace":
        for d in reversed([self.root, *self.root.parents]):
            if not d.exists():
                d.mkdir(exist_ok=True)
                self._created.append(d)
        remove_stale_workspaces(self.root)
        self.path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
        # The lock file appears under its final name already locked, so "lock exists and is free" always
        # means its process is gone.
        self._fd = os.open(self.path / ".lock-new", os.O_CREAT | os.O_WRONLY, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.rename(self.path / ".lock-new", self.path / "lock")
        return self

    def publish(self, out: Path) -> bool:
        """Rename the finished files into place; False when another prep did it first."""
        try:
            os.rename(self.path / "out", out)
        except OSError:
            if (out / "meta.json").is_file():
                return False
            raise
        fsync_dir(self.root)  # the rename itself survives a crash
        return True

    def set_aside(self, out: Path) -> bool:
        """Move a published directory that does not match its meta.json into this workspace (removed with
        it), warning with the reason; False when, checked again under the lock, it matches now."""
        fd = os.open(self.root / f".check-{out.name}.lock", os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one check-and-set-aside at a time, so a rebuilt one is kept
            if not out.exists():
                return True
            if (problem := verify_prepared(out)) is None:
                return False
            log.warning("prepared data does not match its meta.json, rebuilding it: %s", problem)
            os.rename(out, self.path / "damaged")
            fsync_dir(self.root)
            return True
        finally:
            os.close(fd)

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
        if exc_type is not None:  # failed: leave no directory we created behind either
            for d in reversed(self._created):
                try:
                    d.rmdir()
                except OSError:
                    break


def remove_stale_workspaces(root: Path) -> list[Path]:
    """Remove the temporary directories of preps that died (their lock is free); returns those removed."""
    removed = []
    for d in root.glob(f"{TMP_PREFIX}*"):
        try:
            fd = os.open(d / "lock", os.O_RDONLY)
        except OSError:
            continue  # no lock yet (being created) or already gone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live prep holds it
        else:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            os.close(fd)
    return removed
