"""The pipeline against real servers, as users run it on a schedule.

Started here (module-scoped, stopped in `finally`): a Prefect server (`prefect server start`) and an
MLflow tracking server (`mlflow server`, artifacts served by the server), both on 127.0.0.1 and both
on PostgreSQL when it answers at 127.0.0.1:5432, else on SQLite. Then `prefect deploy` creates the
deployments of prefect.yaml, a process worker (`prefect worker start --run-once`) runs the `smoke`
deployment to completion with MLFLOW_TRACKING_URI=http://..., and `python -m flows serve` registers the
nightly schedule. The smoke run is tiny (1 layer, 12 steps, one Ray worker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "attention-process"


def base_env(**extra: str) -> dict[str, str]:
    """The environment of every process started here: no cluster, no outside tracking, no telemetry."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_PROFILE"}}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_USAGE_STATS_ENABLED="0",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """A server in its own process group, so stop() ends it and every process it forked."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def sigkill_tree(proc: subprocess.Popen, what: str = "the driver") -> None:
    """SIGKILL proc alone, as a crash would, and check that everything it started goes with it (its
    reaper's job) within a minute; whatever is left is killed here, then reported."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline, left = time.monotonic() + 60, tree
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:  # the test cleans up what it started, whatever the verdict
        p.kill()
    assert not left, f"left running after {what} died: {left}"


def stop(proc: subprocess.Popen) -> None:
    """End proc, its process group, and any descendant that left the group (a worker's flow run, its Ray)."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # a test server's state is thrown away: no need to wait for a slow drain
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def databases(request, postgres_url, tmp_path_factory):
    """Backend URLs for both servers: new PostgreSQL databases when reachable, else SQLite files."""
    if postgres_url is not None:
        make = request.getfixturevalue("postgres_database")
        prefect_db, mlflow_db = make("prefect_test"), make("mlflow_test")
        return {"kind": "postgresql", "prefect_db": prefect_db, "mlflow_db": mlflow_db,
                "prefect": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{prefect_db}",
                # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; name the driver the project installs
                "mlflow": f"{postgres_url.replace('postgresql://', 'postgresql+psycopg2://')}/{mlflow_db}"}
    root = tmp_path_factory.mktemp("sqlite")
    return {"kind": "sqlite", "prefect": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
            "mlflow": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def servers(databases, prefect_home, free_port, tmp_path_factory):
    """Both servers, started together (their start-ups overlap) and stopped whatever happens."""
    logs = tmp_path_factory.mktemp("logs")
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_env = base_env(PREFECT_HOME=str(prefect_home), PREFECT_API_DATABASE_CONNECTION_URL=databases["prefect"],
                           PREFECT_UI_ENABLED="false")
    mlflow_cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                  "--backend-store-uri", databases["mlflow"], "--serve-artifacts",
                  "--artifacts-destination", str(artifacts)]
    procs = []
    try:
        procs.append(start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                            str(prefect_port)], prefect_env, logs / "prefect-server.log"))
        procs.append(start(mlflow_cmd, base_env(), logs / "mlflow-server.log", cwd=artifacts))
        wait_until_healthy(f"http://127.0.0.1:{prefect_port}/api/health", procs[0], logs / "prefect-server.log")
        wait_until_healthy(f"http://127.0.0.1:{mlflow_port}/health", procs[1], logs / "mlflow-server.log")
        yield {"prefect": f"http://127.0.0.1:{prefect_port}/api", "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        for proc in procs:
            stop(proc)


@pytest.fixture(scope="module")
def prefect_server(servers) -> str:
    return servers["prefect"]


@pytest.fixture(scope="module")
def mlflow_server(servers) -> str:
    return servers["mlflow"]


def prefect_cli(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=PROJECT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def api(url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(url)


@pytest.fixture(scope="module")
def smoke_run(prefect_server, mlflow_server, prefect_home, tmp_path_factory):
    """`prefect deploy` from prefect.yaml, then a process worker runs one smoke flow run to its end."""
    run_dir = tmp_path_factory.mktemp("worker-dir")  # $ATTENTION_PIPELINE_DIR: the smoke workdir lands here
    env = base_env(PREFECT_HOME=str(prefect_home), PREFECT_API_URL=prefect_server,
                   MLFLOW_TRACKING_URI=mlflow_server, ATTENTION_PIPELINE_DIR=str(run_dir))
    prefect_cli("work-pool", "create", POOL, "--type", "process", env=env)
    prefect_cli("--no-prompt", "deploy", "--name", "smoke", env=env)
    with api(prefect_server) as client:
        deployment = client.read_deployment_by_name("attention-pipeline/smoke")
        flow_run = client.create_flow_run_from_deployment(deployment.id)
    log = tmp_path_factory.mktemp("logs") / "worker.log"
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--run-once",
                    "--limit", "1"], env, log, cwd=run_dir)
    try:
        worker.wait(timeout=420)
    finally:
        stop(worker)
    with api(prefect_server) as client:
        flow_run = client.read_flow_run(flow_run.id)
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()[-6000:]}"
    return {"flow_run": flow_run, "deployment": deployment, "run_dir": run_dir, "env": env}


def test_smoke_deployment_completes_on_a_process_worker(smoke_run, prefect_server):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run, deployment = smoke_run["flow_run"], smoke_run["deployment"]
    assert flow_run.deployment_id == deployment.id
    assert flow_run.name.startswith("python-stdlib-char-1x32-")
    assert flow_run.parameters["config"]["registry"]["model_name"] == "attention-transformer-smoke"
    smoke_dir = smoke_run["run_dir"] / "workdir" / "smoke"
    assert (smoke_dir / "data").is_dir() and (smoke_dir / "ray_results").is_dir()
    assert not (smoke_dir / "mlflow.db").exists()  # tracking went to the server
    with api(prefect_server) as client:
        runs_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        tasks = {t.name.rsplit("-", 1)[0]: t for t in client.read_task_runs(flow_run_filter=runs_filter)}
        artifacts = {a.key for a in client.read_artifacts(flow_run_filter=runs_filter)}
    assert set(tasks) == {"prepare_dataset", "train_model", "evaluate_model", "register_model"}
    assert all(t.state.is_completed() for t in tasks.values())
    assert {"pipeline-summary", "mlflow-run"} <= artifacts


def test_the_mlflow_server_holds_the_run_metrics_artifacts_and_champion(smoke_run, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    flow_run = smoke_run["flow_run"]
    experiment = client.get_experiment_by_name("attention-pipeline-smoke")
    (run,) = client.search_runs([experiment.experiment_id])
    tags = run.data.tags
    assert tags["prefect.flow_run_id"] == str(flow_run.id)
    assert tags["prefect.deployment_name"] == "smoke"
    assert tags["prefect.deployment_id"] == str(flow_run.deployment_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [3, 6, 9, 12]
    assert "eval_bits_per_byte" in run.data.metrics
    figures = Path(client.download_artifacts(run.info.run_id, "figures", str(tmp_path)))
    assert {p.name for p in figures.iterdir()} == {"loss_curves.png", "attention_heatmaps.png"}
    champion = client.get_model_version_by_alias("attention-transformer-smoke", "champion")
    assert champion.run_id == run.info.run_id and champion.tags["gate.decision"] == "promoted"


def test_generate_loads_the_champion_from_the_server_without_pickle(smoke_run, mlflow_server):
    env = base_env(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    proc = subprocess.run([sys.executable, "-m", "flows", "generate", "--model-uri",
                           "models:/attention-transformer-smoke@champion", "--prompt", "def ",
                           "--max-new-tokens", "12", "--seed", "1"],
                          env=env, cwd=smoke_run["run_dir"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("def ") and len(proc.stdout) > len("def \n")


def test_nightly_deploys_with_its_schedule_and_config(smoke_run, prefect_server):
    """Deployed only now, when no worker polls: a run it schedules is never picked up here."""
    prefect_cli("--no-prompt", "deploy", "--name", "nightly", env=smoke_run["env"])
    with api(prefect_server) as client:
        deployment = client.read_deployment_by_name("attention-pipeline/nightly")
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "Europe/Berlin", True)
    assert deployment.parameters["config"]["train"] == {"max_steps": 2000, "num_workers": 2}
    assert deployment.work_pool_name == POOL
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1


def test_serve_registers_the_nightly_schedule(prefect_server, prefect_home, tmp_path):
    env = base_env(PREFECT_HOME=str(prefect_home), PREFECT_API_URL=prefect_server)
    log = tmp_path / "serve.log"
    proc = start([sys.executable, "-m", "flows", "serve", "--set", f"workdir={tmp_path / 'wd'}"], env, log,
                 cwd=tmp_path)
    workdir = str(tmp_path / "wd")
    try:
        deployment = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # until serve has created (or updated) `nightly` with its config
            assert proc.poll() is None, log.read_text()[-3000:]
            with api(prefect_server) as client:
                try:
                    deployment = client.read_deployment_by_name("attention-pipeline/nightly")
                except Exception:  # noqa: BLE001 - not created yet
                    deployment = None
            if deployment is not None and deployment.parameters["config"]["workdir"] == workdir:
                break
            time.sleep(1)
        assert deployment is not None and deployment.parameters["config"]["workdir"] == workdir, \
            log.read_text()[-3000:]
    finally:
        stop(proc)
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    assert deployment.parameters["config"]["train"]["max_steps"] == 2000  # the rest of nightly's config
    assert deployment.entrypoint == "flows.pipeline.training_pipeline_flow"


def test_both_servers_store_in_postgresql(smoke_run, databases):
    if databases["kind"] != "postgresql":
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432: the servers ran on SQLite")
    import psycopg2

    def scalar(db: str, sql: str):
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchone()[0]
        finally:
            conn.close()

    flow_run_id = str(smoke_run["flow_run"].id)
    assert scalar(databases["prefect_db"], f"SELECT count(*) FROM flow_run WHERE id = '{flow_run_id}'") == 1
    assert scalar(databases["mlflow_db"], "SELECT count(*) FROM tags WHERE key = 'prefect.flow_run_id' "
                  f"AND value = '{flow_run_id}'") == 1
    assert scalar(databases["mlflow_db"], "SELECT count(*) FROM model_versions") == 1
