"""Data staging: the prepared token arrays, where every Ray worker can read them.

The driver copies the prepared data directory once under the run's storage path (local or an object
store), keyed by its content fingerprint; a worker on a node that cannot see the driver's directory
copies the staged copy to its local temp directory once per node. Both copies go through a temporary
name and a rename, so a concurrent or interrupted copy never leaves a half-written directory behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from flows.data import PreparedData


def staged_data_uri(storage_path: str, fingerprint: str) -> str:
    return f"{storage_path.rstrip('/')}/datasets/{fingerprint}"


def stage_data(data: PreparedData, storage_path: str) -> None:
    """Copy the prepared data under the storage path, where workers on other nodes can reach it."""
    import pyarrow.fs as pafs

    dest = staged_data_uri(storage_path, data.fingerprint)
    fs, dest_path = pafs.FileSystem.from_uri(dest if "://" in dest else os.path.abspath(dest))
    if fs.get_file_info(f"{dest_path}/meta.json").type != pafs.FileType.NotFound:
        return
    if os.path.abspath(data.path) == os.path.abspath(dest_path):
        return
    tmp = f"{dest_path}.tmp-{os.getpid()}"
    fs.create_dir(tmp, recursive=True)
    pafs.copy_files(data.path, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    try:
        fs.move(tmp, dest_path)
    except OSError:
        fs.delete_dir(tmp)  # another driver staged it first


def localize_data(data: PreparedData, storage_path: str) -> PreparedData:
    """The prepared data as a local directory on this node: as prepared when that path exists here
    (same machine or a shared filesystem), else copied from its staged copy under the storage path."""
    if (Path(data.path) / "meta.json").is_file():
        return data
    import pyarrow.fs as pafs

    source = staged_data_uri(storage_path, data.fingerprint)
    local = Path(tempfile.gettempdir()) / "attention-pipeline" / "data" / data.fingerprint
    if not (local / "meta.json").is_file():
        fs, src_path = pafs.FileSystem.from_uri(source if "://" in source else os.path.abspath(source))
        tmp = Path(f"{local}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(src_path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(tmp, local)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another worker on this node won
    return data.model_copy(update={"path": str(local)})
