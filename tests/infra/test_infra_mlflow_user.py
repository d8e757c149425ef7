"""The MLflow login the pipeline holds is not the admin's, and it is enough for the pipeline.

A real `mlflow server --app-name basic-auth` with the committed infra/mlflow/basic_auth.ini (its user
database moved to a temporary path) and the admin from MLFLOW_AUTH_ADMIN_* as infra/compose.yaml sets
them; infra/mlflow/create_pipeline_user.py (the `mlflow-init` one-shot) runs against it as the admin.
Then, as the pipeline's user: what the pipeline does (an experiment, a run with a metric and an
artifact through the server, a registered model version with an alias) works, and managing users
does not.
"""

from __future__ import annotations

import configparser
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "mlflow" / "create_pipeline_user.py"
ADMIN = "admin"
PIPELINE = "pipeline"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "RAY_ADDRESS"))}
    return {**env, "DO_NOT_TRACK": "1", **extra}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, free_port):
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = configparser.ConfigParser()
    ini.read(ROOT / "infra" / "mlflow" / "basic_auth.ini")
    ini["mlflow"]["database_uri"] = f"sqlite:///{root / 'basic_auth.db'}"
    with open(root / "basic_auth.ini", "w") as f:
        ini.write(f)
    admin_password = secrets.token_urlsafe(16)
    port = free_port()
    env = clean_env(MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"), MLFLOW_AUTH_ADMIN_USERNAME=ADMIN,
                    MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                    MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(16))
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name=basic-auth", "--host=127.0.0.1",
           f"--port={port}", f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
           f"--artifacts-destination={root / 'artifacts'}", "--workers=1"]
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server not healthy:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url, admin_password
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its state is thrown away: no need to wait for a drain
        proc.wait(timeout=10)


def create_pipeline_user(url: str, admin_password: str, password: str, monkeypatch, capsys) -> tuple[int, str]:
    """The script as mlflow-init runs it (in this process: no second interpreter and MLflow import)."""
    import runpy

    with monkeypatch.context() as env:
        for key, value in dict(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=admin_password,
                               MLFLOW_PIPELINE_USERNAME=PIPELINE, MLFLOW_PIPELINE_PASSWORD=password).items():
            env.setenv(key, value)
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr()
    return exit_.value.code, out.out + out.err


def test_the_pipeline_user_does_the_pipeline_work_and_nothing_of_an_admin(auth_server, monkeypatch, capsys, tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    url, admin_password = auth_server
    first, second = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    code, created = create_pipeline_user(url, admin_password, first, monkeypatch, capsys)
    assert code == 0 and f"created MLflow user {PIPELINE}" in created, created
    code, rerun = create_pipeline_user(url, admin_password, second, monkeypatch, capsys)  # a restart, a new password
    assert code == 0 and "exists" in rerun, rerun
    assert not [p for p in (first, second, admin_password) if p in created + rerun]

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", PIPELINE)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", first)
    with pytest.raises(MlflowException, match="error code 401"):
        MlflowClient(tracking_uri=url).search_experiments()  # the old password is gone
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", second)

    # What flows/registry does, in its order: experiment, run, metrics, a logged model with artifacts
    # (through the server's artifact proxy), a registered model version from it, the champion alias.
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    experiment_id = client.create_experiment("pipeline-user-check")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "train_loss", 1.5, step=1)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.txt").write_text("weights")
    client.log_artifact(run.info.run_id, str(tmp_path / "model" / "weights.txt"), artifact_path="pack")
    model = client.create_logged_model(experiment_id, name="model", source_run_id=run.info.run_id)
    client.log_model_artifacts(model.model_id, str(tmp_path / "model"))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("pipeline-user-model")
    version = client.create_model_version("pipeline-user-model", model.artifact_location, run_id=run.info.run_id,
                                          model_id=model.model_id)
    client.set_logged_model_tags(model.model_id, {"checked": "yes"})
    client.set_registered_model_alias("pipeline-user-model", "champion", version.version)
    assert client.get_model_version_by_alias("pipeline-user-model", "champion").version == version.version

    auth = get_app_client("basic-auth", tracking_uri=url)
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|ermission denied"):
        auth.create_user("intruder", secrets.token_urlsafe(16))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
    assert auth.get_user(PIPELINE).is_admin is False
