"""Pipelines that run at the same time on one registry: all succeed, one champion, the best one.

Three `python -m flows run` processes are started together (each with its own workdir and its own
temporary Prefect server, one PREFECT_HOME as on a user's machine) on one SQLite store, and then on a
real `mlflow server` backed by PostgreSQL. Their tiny models differ (steps, learning rate), so their
bits per byte differ. Then two champion gates are made to overlap for certain: one holds the lock
(a test-only hook passed to the real gate) while the other asks for it; the order of recorded
events and the second gate's decision show it waited and compared with the champion of then.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.test_servers import BIN, PROJECT, base_env, start, stop, wait_until_healthy

pytestmark = pytest.mark.integration

MODEL_NAME = "concurrent-lm"
CORPUS = "".join(f"def f{i}(x):\n    return x * {i % 9} + {i % 7}\n\nclass Request:\n    import os\n"
                 for i in range(1500))
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=4",
        "train.eval_batches=1", "train.warmup_steps=1", "train.num_workers=1", "train.cpus_per_worker=1",
        "eval.max_tokens=1024", "eval.max_new_tokens=4", "eval.batch_size=8", "registry.min_improvement=0",
        f"registry.model_name={MODEL_NAME}", "registry.experiment=concurrent"]
RUNS = [(2, 1e-3), (6, 5e-3), (12, 1e-2)]  # (steps, lr) of each pipeline: three different models


def run_three_pipelines(tmp_path: Path, tracking_uri: str) -> list[tuple[int, str]]:
    """Start three `flows run` processes at once, wait for all; returns (returncode, output) of each."""
    corpus = tmp_path / "corpus.py"
    corpus.write_text(CORPUS)
    env = base_env(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(PROJECT))
    procs, logs = [], []
    for i, (steps, lr) in enumerate(RUNS):
        sets = [*TINY, f"workdir={tmp_path / f'wd{i}'}", f"data.source={corpus}", f"registry.tracking_uri={tracking_uri}",
                f"train.max_steps={steps}", f"train.lr={lr}", f"train.eval_interval={steps}",
                f"train.log_interval={steps}", f"train.checkpoint_interval={steps}"]
        logs.append(tmp_path / f"run{i}.log")
        procs.append(start([sys.executable, "-m", "flows", "run", *[a for s in sets for a in ("--set", s)]],
                           env, logs[-1], cwd=tmp_path))
    try:
        for proc in procs:
            proc.wait(timeout=480)
    finally:
        for proc in procs:
            stop(proc)
    return [(proc.returncode, log.read_text()) for proc, log in zip(procs, logs)]


def assert_one_best_champion(tracking_uri: str, results) -> None:
    from mlflow.tracking import MlflowClient

    for i, (code, output) in enumerate(results):
        assert code == 0, f"pipeline {i} exited {code}:\n{output[-4000:]}"
        assert "database is locked" not in output, output[-4000:]
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    versions = [client.get_model_version(MODEL_NAME, v.version)
                for v in client.search_model_versions(f"name='{MODEL_NAME}'")]
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert len({v.run_id for v in versions}) == 3
    champions = [v for v in versions if "champion" in v.aliases]
    assert len(champions) == 1
    scores = {v.version: float(v.tags["eval.bits_per_byte"]) for v in versions}
    assert len(set(scores.values())) == 3 and all(math.isfinite(s) for s in scores.values())
    assert champions[0].version == min(scores, key=scores.get), scores
    # the gates ran one after another: only the first saw no champion (its decision names none)
    assert sum("gate.champion_version" not in v.tags for v in versions) == 1

def test_three_concurrent_pipelines_on_one_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    assert_one_best_champion(uri, run_three_pipelines(tmp_path, uri))


@pytest.fixture
def postgres_mlflow_server(postgres_database, free_port, tmp_path):
    """A real `mlflow server` on a new PostgreSQL database, artifacts served through it."""
    db = postgres_database("mlflow_concurrent")
    port, artifacts, log = free_port(), tmp_path / "artifacts", tmp_path / "mlflow-server.log"
    artifacts.mkdir()
    proc = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                  "--backend-store-uri", f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}",
                  "--serve-artifacts", "--artifacts-destination", str(artifacts)], base_env(), log, cwd=artifacts)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def test_three_concurrent_pipelines_on_a_postgresql_mlflow_server(tmp_path, postgres_mlflow_server):
    assert_one_best_champion(postgres_mlflow_server, run_three_pipelines(tmp_path, postgres_mlflow_server))


# --------------------------------------------------------------------------------------- overlapping gates
def test_overlapping_gates_are_serialised(tmp_path, prepared_corpus, tiny_checkpoint):
    """Gate A holds the lock while gate B asks for it: B gets it only after A has promoted, and decides
    against A's version (without the lock B would see no champion and promote itself as well)."""
    from flows.evaluate import EvalResult
    from flows.registry import CHAMPION, log_model_version, mlflow_client, start_pipeline_run
    from flows.registry.gate import gate_exclusively

    cfg, data = prepared_corpus(CORPUS[:6000])
    cfg.registry.min_improvement = 0.0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    vocab = len(set(CORPUS[:6000]))

    def version(seed: int, bpb: float):
        result = EvalResult(val_loss=bpb, perplexity=math.exp(bpb), bits_per_byte=bpb, tokens=160, bytes=160,
                            windows=10, block_size=16, samples=[])
        run_id = start_pipeline_run(cfg, uri, flow_run_id=str(uuid.uuid4()), run_name=f"gate-{seed}")
        return log_model_version(cfg, uri, run_id, checkpoint_path=str(tiny_checkpoint(vocab, seed=seed)),
                                 data=data, result=result), result

    (va, ra), (vb, rb) = version(1, 0.5), version(2, 50.0)  # B claims far worse than any model: kept champion
    events: list[tuple[str, int]] = []
    a_holds, b_asks, b_holds = threading.Event(), threading.Event(), threading.Event()

    def record(name: str, flag: threading.Event | None = None) -> None:
        events.append((name, time.monotonic_ns()))
        if flag is not None:
            flag.set()

    def a_locked() -> None:
        record("A holds", a_holds)
        assert b_asks.wait(120)
        b_holds.wait(5)  # were the lock broken, B would get it now; it must not before A is done
        record("A done")

    def gate_b() -> None:
        assert a_holds.wait(120)
        record("B asks", b_asks)
        out["B"] = gate_exclusively(cfg, uri, vb, data=data, result=rb, use_prefect=False,
                                    on_locked=lambda: record("B holds", b_holds))

    out: dict = {}
    thread = threading.Thread(target=gate_b)
    thread.start()
    out["A"] = gate_exclusively(cfg, uri, va, data=data, result=ra, use_prefect=False, on_locked=a_locked)
    thread.join(timeout=300)

    assert [name for name, _ in events] == ["A holds", "B asks", "A done", "B holds"]
    times = [t for _, t in events]
    assert times == sorted(times)
    assert out["A"].champion and out["A"].champion_version is None
    assert not out["B"].champion and out["B"].champion_version == int(va.version)  # read inside the lock
    client = mlflow_client(uri)
    assert client.get_model_version_by_alias(cfg.registry.model_name, CHAMPION).version == va.version


# --------------------------------------------------------------------------------------- a new SQLite store
OPEN_STORE = """
import sys, time
from flows.registry import mlflow_client, start_pipeline_run
from flows.config import load_config
uri, start_at = sys.argv[1], float(sys.argv[2])
while time.time() < start_at:  # all processes open the new store at once
    time.sleep(0.001)
cfg = load_config(overrides=["registry.experiment=concurrent"])
print(start_pipeline_run(cfg, uri, flow_run_id=sys.argv[3], run_name="open"))
"""


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """MLflow creates a new store's tables on first use; three processes doing so at once used to fail
    with "table latest_metrics already exists" (or an alembic version mismatch)."""
    from flows.registry import mlflow_client

    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    start_at = time.time() + 8  # after every interpreter has imported MLflow
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri, str(start_at), f"flow-{i}"],
                              env=base_env(PYTHONPATH=str(PROJECT)), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 3, "\n".join(o[-2000:] for o in outputs)
    client = mlflow_client(uri)
    assert len(client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])) == 3
