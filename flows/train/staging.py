"""Data staging: the prepared token arrays, where every Ray worker can read them.

The driver publishes the prepared data directory once under the run's storage path (a filesystem path
or an object-store URI such as s3://bucket/prefix), at `<storage>/datasets/<fingerprint>/`. A staged
copy counts only once its commit marker `_COMMITTED` is there: the marker is written last and lists
every file with its size, so a copy whose upload was interrupted (a driver SIGKILLed half-way) is
never read, and the next driver uploads it again. On a filesystem the copy is written under a
temporary name, marker included, and renamed into place whole. An object store has no rename: the
files are uploaded under the final prefix, each object whole, then the marker; drivers staging the
same fingerprint upload the same bytes (the fingerprint is the content's), so they cannot spoil each
other's copy. A worker on a node that cannot see the driver's directory downloads the committed
copy to its local temp directory once per node, through a temporary name and a rename too.
Filesystems come from `pyarrow.fs.FileSystem.from_uri`, as in Ray Train, so an S3-compatible endpoint
and its keys come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from flows.data import PreparedData

COMMITTED = "_COMMITTED"  # written last; readers use a staged copy only when it is there


def staged_data_uri(storage_path: str, fingerprint: str) -> str:
    return f"{storage_path.rstrip('/')}/datasets/{fingerprint}"


def _filesystem(storage_path: str, fingerprint: str):
    """(pyarrow filesystem, path of the staged copy on it)."""
    import pyarrow.fs as pafs

    uri = storage_path if "://" in storage_path else os.path.abspath(storage_path)
    fs, root = pafs.FileSystem.from_uri(uri)
    return fs, f"{root.rstrip('/')}/datasets/{fingerprint}"


def read_manifest(fs, path: str) -> dict[str, int] | None:
    """{file name: size} from the commit marker of the staged copy at `path`, or None without one."""
    import pyarrow.fs as pafs

    marker = f"{path}/{COMMITTED}"
    if fs.get_file_info(marker).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(marker) as f:
        return {str(k): int(v) for k, v in json.loads(f.read())["files"].items()}


def stage_data(data: PreparedData, storage_path: str) -> None:
    """Publish the prepared data under the storage path, where workers on other nodes can reach it
    (nothing to do when a committed copy is already there)."""
    import pyarrow.fs as pafs

    fs, dest = _filesystem(storage_path, data.fingerprint)
    if read_manifest(fs, dest) is not None:
        return
    local = isinstance(fs, pafs.LocalFileSystem)
    if local and os.path.abspath(data.path) == os.path.abspath(dest):
        return
    files = {p.name: p.stat().st_size for p in sorted(Path(data.path).iterdir()) if p.is_file()}
    if COMMITTED in files:
        raise ValueError(f"{data.path}: a prepared dataset must not hold a file named {COMMITTED}")
    if local:
        _publish_by_rename(fs, data.path, dest, files)
    else:
        _publish_in_place(fs, data.path, dest, files)


def _marker(files: dict[str, int]) -> bytes:
    return json.dumps({"files": files}, indent=1, sort_keys=True).encode()


def _write_marker(fs, path: str, files: dict[str, int]) -> None:
    with fs.open_output_stream(f"{path}/{COMMITTED}") as out:
        out.write(_marker(files))


def _publish_by_rename(fs, source: str, dest: str, files: dict[str, int]) -> None:
    """A filesystem: the whole copy, marker included, in a temporary directory renamed into place."""
    import pyarrow.fs as pafs

    if fs.get_file_info(dest).type == pafs.FileType.Directory:
        _adopt_unmarked_copy(fs, dest, files)
        return
    tmp = f"{dest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fs.create_dir(tmp, recursive=True)
    try:
        pafs.copy_files(source, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        _write_marker(fs, tmp, files)
        fs.move(tmp, dest)
    except OSError:
        fs.delete_dir(tmp)
        if read_manifest(fs, dest) is None:  # not another driver's win: a real failure
            raise


def _adopt_unmarked_copy(fs, dest: str, files: dict[str, int]) -> None:
    """A directory without a marker on a filesystem is a copy staged before there were markers (only
    ever renamed into place whole): commit it when it holds exactly the prepared files."""
    import pyarrow.fs as pafs

    found = {Path(i.path).name: i.size for i in fs.get_file_info(pafs.FileSelector(dest))
             if i.type == pafs.FileType.File and not Path(i.path).name.startswith(COMMITTED)}
    if found != files:
        raise OSError(f"{dest} holds {found}, not the prepared files {files}, and no {COMMITTED} marker: "
                      "it is not a staged copy of this dataset; delete it")
    tmp = f"{dest}/{COMMITTED}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as out:
        out.write(_marker(files))
    fs.move(tmp, f"{dest}/{COMMITTED}")  # a rename: a reader never sees half a marker


def _publish_in_place(fs, source: str, dest: str, files: dict[str, int]) -> None:
    """An object store (no rename): every object under the final prefix, overwriting what an
    interrupted upload left there, then the marker."""
    import pyarrow.fs as pafs

    for name in files:
        pafs.copy_files(f"{source}/{name}", f"{dest}/{name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    uploaded = {name: fs.get_file_info(f"{dest}/{name}").size for name in files}
    if uploaded != files:
        raise OSError(f"staging {source} to {dest}: uploaded sizes {uploaded} differ from the local files {files}")
    _write_marker(fs, dest, files)


def localize_data(data: PreparedData, storage_path: str) -> PreparedData:
    """The prepared data as a local directory on this node: as prepared when that path exists here
    (same machine or a shared filesystem), else downloaded from its committed staged copy."""
    if (Path(data.path) / "meta.json").is_file():
        return data
    local = Path(tempfile.gettempdir()) / "attention-pipeline" / "data" / data.fingerprint
    if not (local / "meta.json").is_file():
        _download(data, storage_path, local)
    return data.model_copy(update={"path": str(local)})


def _download(data: PreparedData, storage_path: str, local: Path) -> None:
    fs, source = _filesystem(storage_path, data.fingerprint)
    files = read_manifest(fs, source)
    if files is None:
        raise FileNotFoundError(
            f"prepared data {data.fingerprint}: {data.path} is not on this node and its staged copy "
            f"{staged_data_uri(storage_path, data.fingerprint)} has no {COMMITTED} marker (its staging "
            "did not finish, or train.storage_path is not the same storage on every node)")
    tmp = Path(f"{local}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for name, size in files.items():
            with fs.open_input_stream(f"{source}/{name}") as src, open(tmp / name, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 23)
            if (got := (tmp / name).stat().st_size) != size:
                raise OSError(f"{source}/{name}: downloaded {got} bytes, its {COMMITTED} marker says {size}")
        os.rename(tmp, local)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (local / "meta.json").is_file():  # not another worker's win on this node: a real failure
            raise
