"""Prepared data that survives a crash and is checked before it is reused.

A prep records in meta.json, under "files", the size and an xxh3-128 checksum of every file it wrote
(`record_files`), then fsyncs the files and their directory (`fsync_files`) before the directory is
renamed into place, and the parent directory after the rename (`fsync_dir`): once a dataset is
published, a crash or a power cut cannot leave it with missing or partial files. Before a published
dataset is reused, `verify_prepared` compares it with meta.json: the sizes (one stat per file), then the
checksums (one read of each file). A dataset that does not match is rebuilt with a warning naming the
file; it is never trained on.

xxh3 (the `xxhash` package) is a fast non-cryptographic hash: it detects corruption (a truncated file,
flipped bits, a half-copied directory), not tampering. It reads a few GB/s, so the check of a 100 MB
corpus's arrays costs a fraction of a second (BENCHMARKS.md); sha256 would cost several times more.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILES = ("train.bin", "val.bin", "tokenizer.json")  # what meta.json vouches for (not itself)
CHECKSUM = "xxh3_128"
_CHUNK = 1 << 20


def file_checksum(path: str | os.PathLike) -> str:
    """The xxh3-128 digest of a file, read in 1 MiB chunks into one reused buffer."""
    import xxhash

    h = xxhash.xxh3_128()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def record_files(directory: Path) -> dict[str, dict]:
    """meta.json's "files": {name: {"bytes": size, CHECKSUM: digest}} of the files in FILES."""
    return {name: {"bytes": (directory / name).stat().st_size, CHECKSUM: file_checksum(directory / name)}
            for name in FILES}


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (files created or renamed in it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(directory: Path) -> None:
    """fsync every file in directory, then the directory itself."""
    for path in sorted(directory.iterdir()):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(directory)


def verify_prepared(directory: Path, *, checksums: bool = True) -> str | None:
    """None when the dataset in directory matches its meta.json; else one line naming what does not."""
    meta_path = directory / "meta.json"
    try:
        files = json.loads(meta_path.read_text())["files"]
        expected = {name: (int(files[name]["bytes"]), str(files[name][CHECKSUM])) for name in FILES}
    except FileNotFoundError:
        return f"{meta_path} is missing"
    except (OSError, ValueError) as err:
        return f"{meta_path} cannot be read ({type(err).__name__}: {err})"
    except (KeyError, TypeError):
        return f"{meta_path} records no size and checksum of each file (prepared by an older version)"
    for name, (size, _) in expected.items():
        try:
            found = (directory / name).stat().st_size
        except FileNotFoundError:
            return f"{directory / name} is missing"
        if found != size:
            return f"{directory / name} has {found} bytes, meta.json records {size}"
    if checksums:
        for name, (_, digest) in expected.items():
            if file_checksum(directory / name) != digest:
                return f"{directory / name} does not match its {CHECKSUM} checksum in meta.json"
    return None
