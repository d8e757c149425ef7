"""Credentials in URIs are masked in every line the pipeline prints or publishes (flows/masking.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.masking import mask_uri, mask_values

# What RFC 3986 allows in a URI's userinfo without percent-encoding ('@' too, as users type it).
USERINFO = st.text("abcXYZ019-._~!$&'()*+,;=%@", min_size=1, max_size=20)


@pytest.mark.parametrize("uri, shown", [
    ("http://user:pass@mlflow.example:5000", "http://***@mlflow.example:5000"),
    ("https://token@host/prefix/", "https://***@host/prefix/"),
    ("postgresql://bob:s3cr3t@db:5432/mlflow?sslmode=require&password=zz",
     "postgresql://***@db:5432/mlflow?sslmode=require&password=***"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature=abc&v=1",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&v=1"),
    ("sqlite:////tmp/work dir/mlflow.db", "sqlite:////tmp/work dir/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("file:///data/a@b/c", "file:///data/a@b/c"),
    ("databricks://profile", "databricks://profile"),
])
def test_mask_uri(uri, shown):
    assert mask_uri(uri) == shown


@given(USERINFO, USERINFO)
def test_no_user_or_password_survives(user, password):
    shown = mask_uri(f"run failed: API request to http://{user}:{password}@host:5000/api/2.0/x failed")
    assert shown == "run failed: API request to http://***@host:5000/api/2.0/x failed"


def test_mask_values_masks_every_value():
    assert mask_values({"registry.tracking_uri": "http://u:p@h", "train.lr": 0.1}) == {
        "registry.tracking_uri": "http://***@h", "train.lr": "0.1"}


def test_the_cli_final_lines_and_the_run_url_show_no_password():
    from flows.__main__ import mlflow_ui_line
    from flows.registry import run_url

    assert mlflow_ui_line("http://user:pass@host:5000") == "MLflow UI: http://***@host:5000"
    line = mlflow_ui_line("postgresql://user:pass@db/mlflow")
    assert "pass" not in line and "user" not in line and "--backend-store-uri postgresql://***@db/mlflow" in line
    assert run_url("https://user:pass@host/", "1", "abc") == "https://***@host/#/experiments/1/runs/abc"


@pytest.mark.slow
def test_the_cli_error_for_an_unreachable_tracking_server_shows_no_password(tmp_path):
    """`generate` against a tracking server that does not answer (MLFLOW_TRACKING_URI with credentials,
    read at the edge): one line, exit 2, the URI masked in it, MLflow's own error message included."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://alice:s3cr3t@127.0.0.1:9/", "DO_NOT_TRACK": "1",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "flows", "generate", "--model-uri", "models:/m/1", "--prompt", "hi"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --model-uri: cannot load models:/m/1 from http://***@127.0.0.1:9/: "
                                  "API request to http://***@127.0.0.1:9/api/"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "alice" not in proc.stdout + proc.stderr and "s3cr3t" not in proc.stdout + proc.stderr


def test_the_cli_final_line_opens_the_experiment_in_the_model_training_view():
    from flows.__main__ import mlflow_ui_line

    line = mlflow_ui_line("sqlite:////tmp/wd/mlflow.db", "7")
    page = "#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=losses-first"
    assert line.endswith(f"then open http://127.0.0.1:5000/{page}")
    assert mlflow_ui_line("http://h:5000", "7") == f"MLflow UI: http://h:5000; http://h:5000/{page}"
