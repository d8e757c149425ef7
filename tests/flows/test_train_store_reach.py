"""flows.train.store_reach: which tracking URIs are files on the driver's machine, how the workers get
them (absolute), and the checks that keep rank 0 from ever opening a store of its own. The cluster
side (a node that cannot see the store) is tested on real Ray nodes in tests/integration/test_multinode.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.train.store_reach import (
    absolute_store_uri,
    check_workers_reach_store,
    local_store_path,
    require_store_here,
    store_holds_run,
)


@pytest.mark.parametrize("uri, path", [
    ("sqlite:////abs/workdir/mlflow.db", "/abs/workdir/mlflow.db"),
    ("sqlite:///mlflow.db?timeout=120", "mlflow.db"),
    ("file:///abs/mlruns", "/abs/mlruns"),
    ("/abs/mlruns", "/abs/mlruns"),
    ("mlruns", "mlruns"),
    ("http://127.0.0.1:5000", None),
    ("https://user:secret@mlflow.example.com", None),
    ("databricks", None),  # MLflow reads these bare words as remote stores, not as paths
    ("databricks-uc", None),
])
def test_local_store_path(uri, path):
    assert local_store_path(uri) == (Path(path) if path else None)


def test_a_relative_store_becomes_absolute_and_a_server_stays_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_store_uri("sqlite:///mlflow.db?timeout=5") == f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=5"
    assert absolute_store_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_store_uri("file:mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_store_uri("mlruns") == str(tmp_path / "mlruns")
    for uri in ("sqlite:////abs/mlflow.db", "http://127.0.0.1:5000"):
        assert absolute_store_uri(uri) == uri


def test_store_holds_run_reads_a_sqlite_store_and_creates_nothing(tmp_path):
    import sqlite3

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as conn:  # MLflow's runs table, reduced to its key (test_multinode: the real one)
        conn.execute("CREATE TABLE runs (run_uuid VARCHAR(32) PRIMARY KEY)")
        conn.execute("INSERT INTO runs VALUES ('abc')")
    assert store_holds_run(str(db), "abc")
    assert not store_holds_run(str(db), "other")  # another store at the same path: not the flow's
    (tmp_path / "not-a-db").write_text("plain text")
    assert not store_holds_run(str(tmp_path / "not-a-db"), "abc")
    assert not store_holds_run(str(tmp_path / "absent.db"), "abc")
    assert not (tmp_path / "absent.db").exists()


def test_a_file_store_holds_a_run_when_its_directory_is_there(tmp_path):
    (tmp_path / "mlruns" / "7" / "abc").mkdir(parents=True)
    (tmp_path / "mlruns" / "7" / "abc" / "meta.yaml").write_text("run_id: abc\n")
    assert store_holds_run(str(tmp_path / "mlruns"), "abc")
    assert not store_holds_run(str(tmp_path / "mlruns"), "other")


def test_rank_0_never_creates_a_local_store(tmp_path):
    with pytest.raises(RuntimeError, match="does not exist on this node"):
        require_store_here(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "mlflow.db").exists()
    (tmp_path / "mlflow.db").touch()
    require_store_here(f"sqlite:///{tmp_path / 'mlflow.db'}")
    require_store_here("http://127.0.0.1:1")  # a server: nothing to check here


def test_without_ray_or_with_a_server_the_driver_asks_no_node(tmp_path):
    import ray

    started = ray.is_initialized()
    check_workers_reach_store(f"sqlite:///{tmp_path / 'mlflow.db'}", "run")  # a local Ray will be single-node
    check_workers_reach_store("http://127.0.0.1:1", "run")
    assert ray.is_initialized() == started  # it neither started Ray nor failed without it
