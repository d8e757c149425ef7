"""Corpus sources: what `data.source` names, and how its content is fingerprinted.

A source is `python-stdlib`, local files (a path, a directory or a glob), remote files behind an fsspec
URI (`s3://bucket/prefix/*.parquet`, `gs://...`, `memory://...`), or a Hugging Face Hub dataset
(`hf:owner/name`). `resolve_source` only lists and checks (the CLI calls it before anything starts);
`source_digest` hashes local files' bytes, remote files' ETags or checksums, and a Hub dataset's commit.
Reading the documents is readers.py's job.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from flows.errors import UserError

STDLIB = "python-stdlib"
ROW_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
             ".parquet": "parquet", ".pq": "parquet"}
_HF_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class Source:
    """A resolved `data.source`: its kind and files (local paths or fsspec URLs), or a Hub dataset."""

    spec: str
    kind: Literal["stdlib", "local", "remote", "hf"]
    files: tuple[str, ...] = ()
    repo_id: str = ""
    revision: str = ""  # hf: the commit the data comes from, fixed when the source is fingerprinted

    def describe(self) -> dict:
        out: dict = {"spec": self.spec, "kind": self.kind}
        if self.kind == "hf":
            out.update(repo_id=self.repo_id, revision=self.revision)
        else:
            out["files"] = len(self.files)
        return out

    @property
    def has_rows(self) -> bool:
        return self.kind == "hf" or any(file_kind(f) != "text" for f in self.files)

    def __iter__(self) -> Iterator[Path]:
        """The local files, as Paths (what resolve_source used to return); TypeError for other sources."""
        if self.kind not in ("stdlib", "local"):
            raise TypeError(f"data.source {self.spec} is not local files")
        return iter(map(Path, self.files))


def file_kind(path: str) -> str:
    """jsonl, json, csv, tsv or parquet by extension; anything else is plain text."""
    return ROW_KINDS.get(os.path.splitext(path)[1].lower(), "text")


def stdlib_files() -> list[Path]:
    """The top-level *.py modules of the running interpreter's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_source(source: str) -> Source:
    """Cheap validation of data.source (listing files, no reading or downloading); UserError when unusable."""
    if source == STDLIB:
        files = stdlib_files()
        if not files:
            raise UserError("data.source: python-stdlib found no *.py files in this interpreter's stdlib")
        return Source(source, "stdlib", tuple(map(str, files)))
    if source.startswith("hf:"):
        repo_id = source[3:]
        if not _HF_NAME.match(repo_id):
            raise UserError(f"data.source: {source!r} is not a Hugging Face dataset name (hf:owner/name)")
        if hub_offline():
            raise UserError(offline_message(source))
        return Source(source, "hf", repo_id=repo_id)
    if "://" in source:
        return _resolve_remote(source)
    expanded = os.path.expanduser(source)
    if any(ch in expanded for ch in "*?["):
        files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"data.source: glob {source!r} matched no files")
        return Source(source, "local", tuple(files))
    p = Path(expanded)
    if p.is_dir():
        files = sorted(str(q) for q in p.rglob("*") if q.is_file() and _visible(q, p))
        if not files:
            raise UserError(f"data.source: directory {source} holds no files")
        return Source(source, "local", tuple(files))
    if not p.exists():
        raise UserError(f"data.source: path not found: {source}")
    return Source(source, "local", (str(p),))


def _resolve_remote(source: str) -> Source:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source)
    except ImportError as err:  # e.g. "Install s3fs to access S3"
        raise UserError(f"data.source: {source}: {err}") from None
    except ValueError as err:
        raise UserError(f"data.source: {source}: {err}") from None
    try:
        if any(ch in path for ch in "*?["):
            found = fs.glob(path, detail=True)
            files = sorted(name for name, info in found.items() if info.get("type") == "file")
            if not files:
                raise UserError(f"data.source: glob {source!r} matched no files")
        elif fs.isdir(path):
            files = sorted(f for f in fs.find(path) if not os.path.basename(f).startswith("."))
            if not files:
                raise UserError(f"data.source: directory {source} holds no files")
        elif fs.exists(path):
            files = [path]
        else:
            raise UserError(f"data.source: path not found: {source}")
    except (FileNotFoundError, PermissionError) as err:
        raise UserError(f"data.source: {source}: {err}") from None
    return Source(source, "remote", tuple(fs.unstrip_protocol(f) for f in files))


# ---- the Hugging Face Hub -------------------------------------------------------------------------

def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def offline_message(source: str) -> str:
    return (f"data.source: {source}: the Hugging Face Hub cannot be reached (offline); download the dataset "
            "elsewhere and point data.source at local .parquet/.jsonl files")


def _is_connection_error(err: BaseException | None) -> bool:
    names = ("Connect", "Timeout", "NetworkError", "OfflineModeIsEnabled", "LocalEntryNotFound")
    while err is not None:
        if any(n in type(err).__name__ for n in names):
            return True
        err = err.__cause__ or err.__context__
    return False


def hub_error(source: Source, err: Exception) -> UserError | None:
    if _is_connection_error(err):
        return UserError(offline_message(source.spec))
    name = type(err).__name__
    if name in ("RepositoryNotFoundError", "GatedRepoError", "DatasetNotFoundError"):
        return UserError(f"data.source: {source.spec}: no such dataset on the Hugging Face Hub, or it is private "
                         "or gated (log in with `hf auth login`)")
    if name == "RevisionNotFoundError" or isinstance(err, ValueError):
        return UserError(f"data.source: {source.spec}: {str(err).splitlines()[0]}")
    return None


def pin_revision(source: Source) -> Source:
    """For hf sources, the Hub commit the data will come from (one metadata call); others unchanged."""
    if source.kind != "hf" or source.revision:
        return source
    if hub_offline():
        raise UserError(offline_message(source.spec))
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(source.repo_id)
    except Exception as err:  # noqa: BLE001 - translated when the user can act on it
        raise (hub_error(source, err) or err) from None
    return replace(source, revision=info.sha)


# ---- fingerprints ---------------------------------------------------------------------------------

def source_digest(source: Source) -> str:
    """sha256 over the source's content: file names and bytes (local), ETags/checksums (remote), commit (hf)."""
    h = hashlib.sha256(source.kind.encode() + b"\0")  # not the spec: the same files by another path reuse
    if source.kind == "hf":
        h.update(source.repo_id.encode() + b"@" + source.revision.encode())
    elif source.kind == "remote":
        import fsspec

        for url in source.files:
            fs, path = fsspec.core.url_to_fs(url)
            info = fs.info(path)
            tag = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "crc32c") if info.get(k)), None)
            h.update(f"{os.path.basename(path)}\0{tag or fs.checksum(path)}\0".encode())
    else:
        for f in source.files:
            h.update(f"{os.path.basename(f)}\0{_file_sha256(f)}\0".encode())
    return h.hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
    except OSError as err:
        raise UserError(f"data.source: cannot read {path}: {err.strerror or err}") from None
    return h.hexdigest()
