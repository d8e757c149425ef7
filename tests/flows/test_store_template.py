"""A new SQLite MLflow store copied from the cached empty one is the store MLflow would have made."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from flows.registry.store_template import create_store

pytestmark = pytest.mark.slow  # MLflow replays its migrations once for the cached store (seconds)


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def normalized(schema: list[tuple]) -> list[tuple]:
    return [(kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
            for kind, name, sql in schema]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_a_copied_store_is_one_mlflow_made_here(tmp_path, cache, monkeypatch):
    from mlflow.tracking import MlflowClient

    assert create_store(tmp_path / "a" / "mlflow.db", cache)
    [template] = cache.glob("mlflow-*-empty.db")
    assert rows(template, "SELECT * FROM experiments") == []  # the made-here row is left out
    monkeypatch.chdir(tmp_path / "a")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    [default] = client.search_experiments()
    assert default.experiment_id == "0" and default.artifact_location == os.path.abspath("mlruns") + "/0"
    experiment = client.create_experiment("e")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
    # the schema is MLflow's own for a new store: same tables and migration head
    client_made = tmp_path / "b.db"
    MlflowClient(tracking_uri=f"sqlite:///{client_made}").search_experiments()
    schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    # (MLflow's own migrations write a table's constraints in an order that varies between processes:
    # they come from a set; so two stores MLflow made are compared line by line, order aside)
    assert normalized(rows(template, schema)) == normalized(rows(client_made, schema))
    assert rows(template, "SELECT * FROM alembic_version") == rows(client_made, "SELECT * FROM alembic_version")


def test_a_second_store_reuses_the_cache_and_a_failure_leaves_the_store_to_mlflow(tmp_path, cache):
    assert create_store(tmp_path / "one.db", cache)
    [template] = cache.glob("mlflow-*-empty.db")
    made = template.stat().st_mtime_ns
    assert create_store(tmp_path / "two.db", cache) and template.stat().st_mtime_ns == made
    (tmp_path / "blocked").write_text("a file where the cache directory should be")
    assert not create_store(tmp_path / "three.db", tmp_path / "blocked")
    assert not (tmp_path / "three.db").exists()
