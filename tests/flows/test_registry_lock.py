"""The champion lock's files and their exclusion (no MLflow, no Prefect: milliseconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.registry.lock import champion_lock, file_lock, lock_path

TRY_LOCK = ("import fcntl, sys\nwith open(sys.argv[1], 'a+b') as f:\n"
            "    try:\n        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "    except BlockingIOError:\n        sys.exit(3)\n")


def taken_by_another_process(path: Path) -> bool:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(path)], timeout=60).returncode == 3


def test_a_sqlite_store_is_locked_beside_its_database(tmp_path):
    path = lock_path(f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=120", "lm")
    assert path.parent == tmp_path and path.name.startswith("mlflow.db.champion-lm-")


@pytest.mark.parametrize("name", ["team/lm", "it's", "a b", "../../etc", "x" * 300])
def test_any_model_name_makes_one_safe_file_name(tmp_path, name):
    path = lock_path(f"sqlite:///{tmp_path / 'mlflow.db'}", name)
    assert path.parent == tmp_path and len(path.name) < 120
    assert path != lock_path(f"sqlite:///{tmp_path / 'mlflow.db'}", name + "2")


def test_a_tracking_server_is_locked_per_uri_without_its_credentials(tmp_path):
    one = lock_path("http://user:secret@mlflow:5000/", "lm", lock_dir=tmp_path)
    assert one.parent == tmp_path and "secret" not in str(one)
    assert one == lock_path("http://user:secret@mlflow:5000", "lm", lock_dir=tmp_path)
    assert one != lock_path("http://other:5000", "lm", lock_dir=tmp_path)


def test_the_lock_excludes_other_processes_while_held_and_only_then(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    path = lock_path(uri, "lm")
    with champion_lock(uri, "lm", use_prefect=False):
        assert taken_by_another_process(path)
    assert not taken_by_another_process(path)


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    path = tmp_path / "x.lock"
    with pytest.raises(RuntimeError), file_lock(path):
        raise RuntimeError("the gate failed")
    assert not taken_by_another_process(path)
