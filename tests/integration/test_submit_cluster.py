"""`flows submit` against a real two-node Ray cluster on this machine, with Ray token authentication.

A head (`ray start --head`) and a second node (`ray start --address`) run on free ports bound to
127.0.0.1 (Redis holds 6379 here), one CPU each; STRICT_SPREAD puts one Ray Train worker on each node.
The pipeline is submitted through the CLI as a Ray Job; the test then reads the registered champion
from the MLflow store the job wrote, and the workers' node ids from the cluster's state API. It stops
every process it started, found by pid (its children and everything running under its temp dir).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sysconfig.get_path("scripts"))
TINY = [
    "train.max_steps=8", "train.batch_size=4", "train.eval_interval=4", "train.eval_batches=2",
    "train.log_interval=4", "train.checkpoint_interval=8", "train.warmup_steps=2", "train.max_failures=0",
    "eval.max_tokens=2048", "eval.max_new_tokens=8", "eval.prompts=[\"def \"]",
    "train.num_workers=2", "train.placement_strategy=STRICT_SPREAD",  # one worker on each node
]


def _without_ray_settings(environ) -> dict[str, str]:
    """This process's environment minus RAY_* (a ray.init() elsewhere in the session sets some)."""
    return {k: v for k, v in environ.items() if not k.startswith("RAY_")}


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalCluster:
    """A head and one more node started with `ray start --block`; token auth on; all ports free ones."""

    def __init__(self, num_cpus_per_node: int = 1):
        # Short: Ray's unix sockets live under it and socket paths are limited to ~107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rtc", dir="/tmp")
        self.token = secrets.token_hex(24)
        self.num_cpus = num_cpus_per_node
        self.procs: list[subprocess.Popen] = []
        self.env = {**_without_ray_settings(os.environ), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    # The job's Prefect runs an ephemeral API; keep its SQLite out of ~/.prefect.
                    "PREFECT_HOME": str(Path(self.temp_dir) / "prefect")}
        for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
            self.env.pop(var, None)

    def _node_args(self) -> list[str]:
        p = _free_ports(6)
        return ["--node-manager-port", p[0], "--object-manager-port", p[1], "--dashboard-agent-listen-port", p[2],
                "--dashboard-agent-grpc-port", p[3], "--runtime-env-agent-port", p[4], "--metrics-export-port", p[5]]

    def _start(self, name: str, args: list) -> None:
        # One temp dir per node, as on separate machines: nodes sharing one would share (and
        # garbage-collect) each other's unpacked working_dir.
        node_dir = Path(self.temp_dir) / name
        node_dir.mkdir()
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(self.num_cpus), "--num-gpus", "0", "--temp-dir", str(node_dir),
               "--object-store-memory", str(100 * 2**20), *map(str, args)]
        with open(Path(self.temp_dir) / f"{name}.log", "wb") as log:
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def start(self) -> "LocalCluster":
        import importlib.util

        if not all(importlib.util.find_spec(m) for m in ("aiohttp_cors", "grpc", "opencensus")):
            pytest.fail("the Ray Jobs API needs ray[default] (pyproject.toml: ray[default,train]); without it "
                        "the dashboard starts without its HTTP server")
        gcs, dashboard = _free_ports(2)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.address = f"http://127.0.0.1:{dashboard}"
        self._start("head", ["--head", "--port", gcs, "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", dashboard, "--disable-usage-stats", *self._node_args()])
        self._wait(lambda: self.get("/api/version").ok, "the head's dashboard")
        self._start("node2", ["--address", self.gcs_address, *self._node_args()])
        self._wait(lambda: len(self.alive_node_ids()) == 2, "two alive nodes")
        return self

    def get(self, path: str):
        import requests

        return requests.get(self.address + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Ray's state API (the dashboard's /api/v0), filtered by equality."""
        query = "&".join(f"filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
        r = self.get(f"/api/v0/{resource}?limit=1000&detail=true&{query}")
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def alive_node_ids(self) -> set[str]:
        return {n["node_id"] for n in self.state("nodes", state="ALIVE")}

    def _wait(self, ready, what: str, timeout: float = 180) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {p.returncode}:\n{self.logs()}")
            try:
                if ready():
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(1)
        raise TimeoutError(f"waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(Path(self.temp_dir).glob("*.log")))

    def _our_processes(self):
        """The `ray start` processes, their descendants, and anything running under our temp dir."""
        import psutil

        found: dict[int, psutil.Process] = {}
        for p in self.procs:
            try:
                proc = psutil.Process(p.pid)
                found[p.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        for proc in psutil.process_iter(["cmdline"]):
            if any(self.temp_dir in arg for arg in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        import psutil

        procs = self._our_processes()
        for proc in procs:  # SIGTERM: the nodes drain and stop their own processes
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive + self._our_processes():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        for p in self.procs:
            p.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _submit(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", "submit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_trains_on_two_nodes_and_registers(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(Path(yaml.__file__).with_name(n).read_text() for n in ("scanner.py", "parser.py")))
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "workdir"),
        "data": {"source": str(corpus)},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "registry": {"experiment": "cluster-smoke", "model_name": "attention-cluster"},
    }))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client_env = {**_without_ray_settings(os.environ), "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}

    cluster = LocalCluster(num_cpus_per_node=1)
    try:
        cluster.start()
        nodes = cluster.alive_node_ids()

        # No token, then a wrong one: one line on stderr, exit code 2, nothing submitted.
        for extra, expected in (({}, "requires a token"), ({"RAY_AUTH_TOKEN": "not-the-token"}, "rejected the token")):
            denied = _submit(["--address", cluster.address, "--no-pip", "--no-wait", "--config", str(config)],
                             {**client_env, **extra})
            assert denied.returncode == 2, denied.stderr
            assert expected in denied.stderr and len(denied.stderr.strip().splitlines()) == 1, denied.stderr

        done = _submit(["--address", cluster.address, "--no-pip", "--config", str(config),
                        *[a for item in TINY for a in ("--set", item)]],
                       {**client_env, "RAY_AUTH_TOKEN": cluster.token}, timeout=600)
        assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
        assert "SUCCEEDED" in done.stdout.splitlines()[-1]
        assert "Registered model:" in done.stdout  # the driver's own output was streamed back

        workers = cluster.state("actors", class_name="RayTrainWorker")
        assert {w["node_id"] for w in workers} == nodes, workers
    finally:
        cluster.stop()

    mlflow = MlflowClient(tracking_uri)
    champion = mlflow.get_model_version_by_alias("attention-cluster", "champion")
    assert str(champion.version) == "1"
    run = mlflow.get_run(champion.run_id)
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.params["model.n_embd"] == "32"  # the config file reached the cluster
    assert "eval_bits_per_byte" in run.data.metrics
