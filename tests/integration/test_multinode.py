"""A Ray node that cannot see the driver's disk, as on a real cluster without a shared filesystem.

Two real `ray start` nodes on this machine: the head (the driver's node) offers no CPUs
to workers, and the other node, the only one that can host them, is started in its own mount namespace
with an empty tmpfs over the test's workdir (`unshare -m`, as root), so the prepared data and any
SQLite store under it do not exist there. Both Ray Train workers therefore run on that blind node:
they must train on the staged copy under the storage path (a directory both nodes see, standing in
for shared storage) and log, through rank 0, to the driver's MLflow server over HTTP, across a
SIGKILL of rank 0 and a resume; a local SQLite store that node cannot see is refused before training.
A zero-CPU task pinned to the blind node looks at its filesystem from inside the namespace.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from flows.config import load_config
from flows.data import prepare_dataset, stdlib_files
from flows.errors import UserError
from flows.train import FaultInjection, train_model
from flows.train.store_reach import store_holds_run
from tests.integration.test_servers import base_env, start, stop, wait_until_healthy
from tests.integration.test_submit_cluster import BIN, LocalCluster, _free_ports

pytestmark = pytest.mark.integration

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.max_steps=8",
        "train.batch_size=4", "train.eval_interval=4", "train.eval_batches=1", "train.log_interval=2",
        "train.checkpoint_interval=4", "train.warmup_steps=1", "train.num_workers=2", "train.max_failures=1"]
STORE_NAMES = {"mlflow.db", "mlruns"}  # what MLflow creates when it opens a local store of its own


class BlindNodeCluster(LocalCluster):
    """The head with 0 CPUs, and a 2-CPU node whose `ray start` runs under `unshare -m` with an empty
    tmpfs mounted over `hidden`; that node's TMPDIR and working directory are directories we can read."""

    def __init__(self, hidden: Path, node_tmp: Path, node_cwd: Path):
        super().__init__(num_cpus_per_node=0)
        # this process is the cluster's driver: it holds the session's token (conftest.py), not a new one
        self.token = self.env["RAY_AUTH_TOKEN"] = os.environ["RAY_AUTH_TOKEN"]
        self.hidden, self.node_tmp, self.node_cwd = hidden, node_tmp, node_cwd

    def start(self) -> "BlindNodeCluster":
        gcs, dashboard = _free_ports(2)
        self.gcs_address, self.address = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        self._start("head", ["--head", "--port", gcs, "--dashboard-host", "127.0.0.1", "--dashboard-port",
                             dashboard, "--disable-usage-stats", *self._node_args()])
        self._wait(lambda: self.get("/api/version").ok, "the head's dashboard")
        self._start_blind(["--address", self.gcs_address, *self._node_args()])
        self._wait(lambda: len(self.alive_node_ids()) == 2, "two alive nodes")
        return self

    def _start_blind(self, args: list) -> None:
        node_dir = Path(self.temp_dir) / "blind"
        node_dir.mkdir()
        ray_start = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                     "--num-gpus", "0", "--temp-dir", str(node_dir), "--object-store-memory", str(100 * 2**20),
                     *map(str, args)]
        # unshare execs sh, which mounts the tmpfs in the new namespace and execs `ray start`: the pid
        # is the node's, and every process the node starts inherits the namespace
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs -o size=16m tmpfs "$0" && exec "$@"', str(self.hidden), *ray_start]
        with open(Path(self.temp_dir) / "blind.log", "wb") as log:
            self.procs.append(subprocess.Popen(cmd, env={**self.env, "TMPDIR": str(self.node_tmp)},
                                               cwd=self.node_cwd, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))


@pytest.fixture(scope="module")
def blind(tmp_path_factory, free_port):
    """The two-node cluster, this process its driver (on the head), a real `mlflow server` whose SQLite
    store is in the driver's (hidden) workdir, and the paths of the test."""
    import ray

    root = tmp_path_factory.mktemp("blind")
    paths = {name: root / name for name in ("workdir", "storage", "node-tmp", "node-cwd")}
    for p in paths.values():
        p.mkdir()
    workdir, port, log = paths["workdir"], free_port(), root / "mlflow-server.log"
    server = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}", "--serve-artifacts",
                    "--artifacts-destination", str(workdir / "mlartifacts")], base_env(), log, cwd=workdir)
    cluster = BlindNodeCluster(workdir, paths["node-tmp"], paths["node-cwd"])
    try:
        cluster.start()  # while the server starts
        ray.init(address=cluster.gcs_address, include_dashboard=False, log_to_driver=True)
        here = ray.get_runtime_context().get_node_id()
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        (blind_id,) = set(nodes) - {here}
        assert nodes[blind_id]["Resources"].get("CPU") == 2 and not nodes[here]["Resources"].get("CPU")
        wait_until_healthy(f"http://127.0.0.1:{port}/health", server, log)
        yield {**paths, "root": root, "cluster": cluster, "node": blind_id, "mlflow": f"http://127.0.0.1:{port}"}
    finally:
        ray.shutdown()
        cluster.stop()
        stop(server)


@pytest.fixture(scope="module")
def prepared(blind):
    corpus = blind["root"] / "corpus.txt"
    corpus.write_text("".join(f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[:8]))
    cfg = load_config(overrides=[f"workdir={blind['workdir']}", f"data.source={corpus}",
                                 f"train.storage_path={blind['storage']}", *TINY])
    return cfg, prepare_dataset(cfg)


def _look_around(blind, data_path: str) -> dict:
    """What the blind node sees of the driver's workdir, asked by a zero-CPU task pinned to it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def look(hidden: str, data_path: str) -> dict:  # nested: pickled by value (workers cannot import tests)
        import os

        return {"workdir": sorted(os.listdir(hidden)),
                "data_visible": os.path.exists(os.path.join(data_path, "meta.json"))}

    task = ray.remote(num_cpus=0)(look).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(blind["node"], soft=False))
    return ray.get(task.remote(str(blind["workdir"]), data_path), timeout=120)


def _stray_stores(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.name in STORE_NAMES]


def test_the_blind_node_cannot_see_the_workdir(blind, prepared):
    _, data = prepared
    seen = _look_around(blind, data.path)
    assert seen == {"workdir": [], "data_visible": False}
    assert (Path(data.path) / "meta.json").is_file()  # ... which the driver's node sees


def test_a_local_store_the_blind_node_cannot_see_is_refused_before_training(blind, prepared):
    from mlflow.tracking import MlflowClient

    cfg, data = prepared
    uri = f"sqlite:///{blind['workdir'] / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("refused")).info.run_id
    assert store_holds_run(str(blind["workdir"] / "mlflow.db"), run_id)  # what a node that sees it answers

    with pytest.raises(UserError) as refused:
        train_model(cfg, data, run_name="refused", tracking_uri=uri, mlflow_run_id=run_id)
    message = str(refused.value)
    assert "registry.tracking_uri" in message and str(blind["workdir"] / "mlflow.db") in message
    assert f"(node {blind['node'][:12]})" in message and "\n" not in message  # names the blind node
    assert not (blind["storage"] / "refused").exists()  # no Ray Train run started
    assert _look_around(blind, data.path)["workdir"] == []


def test_workers_on_the_blind_node_train_on_the_staged_copy_and_log_to_the_server(blind, prepared):
    from mlflow.tracking import MlflowClient

    cfg, data = prepared
    mlflow_server = blind["mlflow"]
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment("blind-node")).info.run_id
    marker = blind["storage"] / "killed"  # the storage path: a place both nodes see

    result = train_model(cfg, data, run_name="blind", tracking_uri=mlflow_server, mlflow_run_id=run_id,
                         fault=FaultInjection(after_step=4, marker=str(marker)))

    assert marker.exists(), "rank 0 was not killed"
    assert Path(result.checkpoint_path).name == "checkpoint_00000008" and result.metrics["step"] == 8
    workers = blind["cluster"].state("actors", class_name="RayTrainWorker")  # dead ones too: every attempt
    assert len(workers) == 4 and {w["node_id"] for w in workers} == {blind["node"]}, workers
    # the blind node copied the staged data into its own temp directory, and trained on that copy
    staged = (blind["storage"] / "datasets" / data.fingerprint / "meta.json").read_bytes()
    assert [p for p in blind["node-tmp"].rglob("meta.json") if p.read_bytes() == staged], "no local copy"
    # every metric point reached the driver's server exactly once, across the kill
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [2, 4, 6, 8]
    assert client.get_run(run_id).data.params["world_size"] == "2"
    # ... and no rank opened a store of its own: not in the hidden workdir, nor anywhere else it writes
    assert _look_around(blind, data.path)["workdir"] == []
    blind_dir = Path(blind["cluster"].temp_dir) / "blind"
    assert not _stray_stores(blind["node-tmp"], blind["node-cwd"], blind["storage"], blind_dir)
