"""A new SQLite MLflow store as a copy of an empty one, instead of MLflow's migrations on every new store.

MLflow creates a SQLite store's tables by replaying its schema migrations one by one the first time a
client opens it: about 2 s of CPU (more on a busy machine) that every new workdir paid on its first
run. `create_store(db)` copies an empty store instead, which MLflow itself made once per MLflow
version and which is cached under ~/.cache/attention-pipeline. Its one row that depends on where it
was made, the Default experiment (its artifact location is the creating process's ./mlruns), is
deleted from the cached copy: MLflow adds that row itself when it opens a store without it, as it
does for a new one. MLflow still opens and checks every store as before (tracking.py); whatever
fails here leaves the store to MLflow's own first use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

from flows.registry.lock import file_lock

CACHE_DIR = Path("~/.cache/attention-pipeline")


def create_store(db: Path, cache_dir: Path = CACHE_DIR) -> bool:
    """Put an empty, fully migrated store at db (which must not exist); False if it could not (MLflow
    then creates it on first use). Call it under the store's own lock."""
    try:
        template = _template(cache_dir.expanduser())
        db.parent.mkdir(parents=True, exist_ok=True)
        tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}")
        shutil.copyfile(template, tmp)
        os.replace(tmp, db)  # whole or not at all
        return True
    except (OSError, sqlite3.Error):
        return False


def _template(cache_dir: Path) -> Path:
    """The cached empty store of this MLflow version, made (once, under a lock) if missing."""
    from importlib.metadata import version

    path = cache_dir / f"mlflow-{version('mlflow')}-empty.db"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(f"{path.name}.lock")):
        if not path.is_file():
            _make_template(path)
    return path


def _make_template(path: Path) -> None:
    from mlflow.tracking import MlflowClient

    made = path.with_name(f".{path.name}.made-{os.getpid()}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    for stale in (made, tmp):
        stale.unlink(missing_ok=True)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{made}").search_experiments(max_results=1)  # MLflow migrates
        with contextlib.closing(sqlite3.connect(made)) as src, contextlib.closing(sqlite3.connect(tmp)) as dst:
            src.backup(dst)  # a consistent copy, whatever connections MLflow keeps open
            dst.execute("DELETE FROM experiments WHERE experiment_id = 0")  # made again where it is opened
            dst.commit()
        os.replace(tmp, path)
    finally:
        for leftover in (made, tmp):
            leftover.unlink(missing_ok=True)
