"""Run limits on real runs: impossible requests, a stage past its time limit, a node lost for good.

(a) `python -m flows run` asking for what the Ray it would use can never hold (64 workers on this
2-CPU machine, or a GPU where there is none), on a local Ray and on a joined two-node cluster: one
line on stderr naming the key, what was asked and what the machine or cluster has, exit code 2, no
MLflow run left RUNNING; a cluster that refuses this client's Ray token is one line too. (b) A whole pipeline run on the cluster whose training outlives train.timeout_s:
it fails naming the stage and the key, its MLflow run is FAILED, and neither a Ray Train worker actor
nor a worker process is left on the cluster, which stays up (on a cluster a leftover worker would hold
its CPUs for good); then the same limit with this process as the driver, which stays connected (Ray
ends a job's actors when its driver exits): the workers are gone and the CPUs free while it lives. (c) A node SIGKILLed for good, process group and all, after a checkpoint of a run
with a worker on it: the run ends with an error naming train.startup_timeout_s and what the cluster
has left, instead of waiting for the node forever.

The cluster is two real `ray start` nodes of one CPU each (test_submit_cluster.py's LocalCluster)
with the session's Ray token, shared by the module; (c) kills its second node, so it runs last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.test_driver_loss import registered_steps
from tests.integration.test_servers import PROJECT, base_env
from tests.integration.test_submit_cluster import LocalCluster

pytestmark = pytest.mark.integration

CORPUS = "".join(f"def f{i}(x):\n    return x * {i % 9} + {i % 7}\n\nclass Request:\n    import os\n" for i in range(400))
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=4",
        "train.warmup_steps=2", "train.max_steps=1000000", "train.checkpoint_interval=5", "train.log_interval=5",
        "train.eval_interval=1000000", "train.eval_batches=1", "eval.max_tokens=1024", "eval.max_new_tokens=4",
        "eval.batch_size=8", "registry.experiment=run-limits", "registry.model_name=run-limits-lm"]
WORKER = "RayTrainWorker"  # Ray Train's worker actor: its process's title names it


class SessionTokenCluster(LocalCluster):
    """LocalCluster with this session's Ray token: this process joins it as a driver too (conftest.py)."""

    def __init__(self):
        super().__init__(num_cpus_per_node=1)
        self.token = self.env["RAY_AUTH_TOKEN"] = os.environ["RAY_AUTH_TOKEN"]

    def worker_processes(self) -> list[psutil.Process]:
        """The cluster's processes running a Ray Train worker actor now."""
        found = []
        for p in self._our_processes():
            try:
                if WORKER in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:  # gone meanwhile
                pass
        return found

    def alive_workers(self) -> list[dict]:
        return [a for a in self.state("actors", class_name=WORKER) if a["state"] != "DEAD"]


@pytest.fixture(scope="module")
def cluster():
    c = SessionTokenCluster()
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def connected(cluster):
    """This process as a driver of the cluster, once for the module: Ray does not support connecting a
    process to a cluster again after ray.shutdown (the interpreter can crash at exit)."""
    import ray

    ray.init(address=cluster.gcs_address, include_dashboard=False, log_to_driver=True)
    try:
        yield cluster
    finally:
        ray.shutdown()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.py"
    path.write_text(CORPUS)
    return path


def flows_run(tmp_path: Path, sets: list[str], env: dict, name: str) -> tuple[subprocess.Popen, Path, Path]:
    """`python -m flows run --set ...` in its own process group; (process, stdout file, stderr file)."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    command = [sys.executable, "-m", "flows", "run", *[a for s in sets for a in ("--set", s)]]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=o, stderr=e, start_new_session=True)
    return proc, out, err


def finish(proc: subprocess.Popen, timeout: float, *logs: Path) -> int:
    """proc's exit code; past `timeout` its process group is killed and the test fails."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"still running after {timeout} s:\n" + "\n".join(p.read_text()[-3000:] for p in logs))


def mlflow_statuses(workdir: Path) -> list[str]:
    """The status of every MLflow run in the workdir's store (none when no store was created)."""
    from mlflow.tracking import MlflowClient

    if not (workdir / "mlflow.db").exists():
        return []
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    return [r.info.status for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def env_for(where: str, cluster_address: str | None) -> dict:
    env = base_env(PYTHONPATH=str(PROJECT))
    if where == "cluster":
        env["RAY_ADDRESS"] = cluster_address
    return env


# ------------------------------------------------------------------------------------- (a) impossible
ASKS = {"workers": (["train.num_workers=64"], "train.num_workers", "64 workers x 1 CPU each (64 CPU)"),
        "gpu": (["train.use_gpu=true"], "train.use_gpu", "1 worker x 1 GPU + 1 CPU each (1 GPU)")}
HAS = {"local": "this machine has {cpus} CPU and 0 GPU",
       "cluster": "the Ray cluster has 2 nodes with CPU 1+1 (2 in all) and GPU 0+0 (0 in all), and no autoscaler"}


@pytest.mark.parametrize("ask", sorted(ASKS))
@pytest.mark.parametrize("where", ["local", "cluster"])
def test_an_impossible_request_fails_at_once_in_one_line(where, ask, tmp_path, corpus, request):
    address = request.getfixturevalue("cluster").gcs_address if where == "cluster" else None
    sets, key, asked = ASKS[ask]
    workdir = tmp_path / "wd"
    proc, out, err = flows_run(tmp_path, [*TINY, *sets, f"workdir={workdir}", f"data.source={corpus}"],
                               env_for(where, address), f"{where}-{ask}")

    assert finish(proc, 300, out, err) == 2, err.read_text()[-3000:]
    last = err.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: {key}: {asked} cannot be placed"), last
    assert HAS[where].format(cpus=os.cpu_count()) in last, last
    assert "RUNNING" not in mlflow_statuses(workdir)
    assert not (workdir / "ray_results").exists()  # no Ray Train run was started


@pytest.mark.parametrize("token", ["auth mode unset", "wrong token"])
def test_a_cluster_that_refuses_our_token_is_one_line(token, cluster, tmp_path, corpus):
    # the mistakes a user joining a token-auth cluster (Ray 2.60's default) makes: no RAY_AUTH_MODE=token,
    # which leaves the client's token off, or another cluster's token
    env = env_for("cluster", cluster.gcs_address)
    if token == "auth mode unset":
        env.pop("RAY_AUTH_MODE")
    else:
        env["RAY_AUTH_TOKEN"] = "0" * 48
    workdir = tmp_path / "wd"
    proc, out, err = flows_run(tmp_path, [*TINY, f"workdir={workdir}", f"data.source={corpus}"], env, token)

    assert finish(proc, 300, out, err) == 2, err.read_text()[-3000:]
    last = err.read_text().strip().splitlines()[-1]
    assert last == (f"error: train.ray_address: the Ray cluster at {cluster.gcs_address} refused this client's "
                    "Ray token: run with RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN, the file "
                    "RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token"), last
    assert "Traceback" not in out.read_text() + err.read_text()
    assert cluster.token not in out.read_text() + err.read_text()
    assert mlflow_statuses(workdir) == []  # refused before the data stage and the MLflow run
    assert not (workdir / "ray_results").exists()


# ------------------------------------------------------------------------------------- (b) time limit
@pytest.mark.slow
def test_a_training_stage_past_its_time_limit_is_stopped_with_its_workers(cluster, tmp_path, corpus):
    timeout = 60
    workdir = tmp_path / "wd"
    sets = [*TINY, f"workdir={workdir}", f"data.source={corpus}", "train.num_workers=2", "train.run_name=limited",
            "train.placement_strategy=STRICT_SPREAD", f"train.timeout_s={timeout}"]  # a worker on each node
    proc, out, err = flows_run(tmp_path, sets, env_for("cluster", cluster.gcs_address), "limited")

    seen: dict[int, psutil.Process] = {}  # every Ray Train worker process the cluster ran for this run
    while proc.poll() is None:
        seen.update({p.pid: p for p in cluster.worker_processes() if p.pid not in seen})
        time.sleep(0.5)
    code = finish(proc, 0, out, err)

    assert code == 2, err.read_text()[-3000:]
    last = err.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: train_model: stopped after its time limit train.timeout_s={timeout} s: "
                           "the Ray Train run was aborted with its workers"), last
    snapshot = workdir / "ray_results" / "limited" / "checkpoint_manager_snapshot.json"
    assert registered_steps(snapshot), "the limit expired before training had checkpointed: raise it"
    assert len(seen) >= 2, "no Ray Train worker process was seen"
    assert mlflow_statuses(workdir) == ["FAILED"]
    # the cluster is still up: whatever the stop left of the run would still be running now
    assert not cluster.alive_workers()
    _, alive = psutil.wait_procs(list(seen.values()), timeout=30)
    assert not alive, [p.cmdline() for p in alive]


@pytest.mark.slow
def test_the_stopped_run_leaves_nothing_while_its_driver_lives(connected, tmp_path, corpus):
    """The same limit with this process as the driver, still connected after the stop: Ray ends a job's
    actors when its driver exits, so only here does 'nothing left' prove the stop itself."""
    import ray

    from flows.config import load_config
    from flows.data import prepare_dataset
    from flows.deadline import StageTimeout, time_limited
    from flows.train import train_model

    cluster, storage, timeout = connected, tmp_path / "storage", 40
    cfg = load_config(overrides=[*TINY, f"workdir={tmp_path / 'wd'}", f"data.source={corpus}",
                                 f"train.storage_path={storage}", "train.num_workers=2",
                                 "train.placement_strategy=STRICT_SPREAD", f"train.timeout_s={timeout}",
                                 f"train.ray_address={cluster.gcs_address}"])
    data = prepare_dataset(cfg)
    with pytest.raises(StageTimeout) as stopped:
        time_limited("train")(train_model)(cfg, data, run_name="limited-here")
    assert str(stopped.value).startswith(f"train_model: stopped after its time limit train.timeout_s={timeout} "
                                         "s: the Ray Train run was aborted with its workers"), stopped.value
    assert registered_steps(storage / "limited-here" / "checkpoint_manager_snapshot.json"), "raise the limit"
    assert not cluster.alive_workers()
    _, alive = psutil.wait_procs(cluster.worker_processes(), timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    deadline = time.monotonic() + 30  # the placement group's CPUs are free again (Ray updates them async)
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2, ray.available_resources()


# ------------------------------------------------------------------------------------- (c) node lost
@pytest.mark.slow
def test_a_node_lost_for_good_ends_the_run_after_the_startup_timeout(connected, tmp_path, corpus):
    from flows.config import load_config
    from flows.data import prepare_dataset
    from flows.deadline import time_limit
    from flows.train import train_model
    from flows.train.supervise import WorkerStartTimeout

    cluster, storage, startup = connected, tmp_path / "storage", 20
    cfg = load_config(overrides=[*TINY, f"workdir={tmp_path / 'wd'}", f"data.source={corpus}",
                                 f"train.storage_path={storage}", "train.num_workers=2", "train.max_failures=1",
                                 "train.placement_strategy=STRICT_SPREAD", f"train.startup_timeout_s={startup}",
                                 f"train.ray_address={cluster.gcs_address}"])
    data = prepare_dataset(cfg)
    node = cluster.procs[1]  # `ray start` of the second node, leader of its process group
    killed: list[int] = []

    def kill_node_after_a_checkpoint() -> None:
        snapshot = storage / "lost" / "checkpoint_manager_snapshot.json"
        while not registered_steps(snapshot):
            if node.poll() is not None:
                return
            time.sleep(0.1)
        tree = [node.pid, *(c.pid for c in psutil.Process(node.pid).children(recursive=True))]
        os.killpg(node.pid, signal.SIGKILL)  # the raylet, its workers, everything the node started
        for pid in tree:  # and any that left the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed.extend(tree)

    killer = threading.Thread(target=kill_node_after_a_checkpoint, daemon=True)
    try:
        killer.start()
        with pytest.raises(WorkerStartTimeout) as ended, time_limit("the test", "its bound", 400):
            train_model(cfg, data, run_name="lost")
        assert killed, "the node was not killed"
        message = str(ended.value)
        assert message.startswith(f"train_model: the Ray Train workers (2 x 1 CPU, STRICT_SPREAD) could not be "
                                  f"placed within train.startup_timeout_s={startup} s; the cluster now has "
                                  "1 node with 1 CPU and 0 GPU"), message
        assert "\n" not in message
        assert not cluster.alive_workers()
    finally:
        killer.join(timeout=5)
