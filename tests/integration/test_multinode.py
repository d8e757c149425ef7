"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): one worker on each (STRICT_SPREAD),
checkpoints, a killed worker, and a resume on both nodes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from flows.config import load_config
from flows.data import prepare_dataset, stdlib_files
from flows.train import FaultInjection, train_model

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "gcs_server_port": _free_port()})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_train_checkpoint_and_resume(tmp_path: Path, two_node_cluster):
    import ray
    from ray.util.state import list_actors

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[:8]))
    cfg = load_config(overrides=[
        f"workdir={tmp_path}", f"data.source={corpus}", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
        "model.block_size=32", "train.max_steps=8", "train.batch_size=4", "train.eval_interval=4",
        "train.eval_batches=1", "train.log_interval=2", "train.checkpoint_interval=4", "train.warmup_steps=1",
        "train.num_workers=2", "train.placement_strategy=STRICT_SPREAD", "train.max_failures=1",
    ])
    data = prepare_dataset(cfg)
    marker = tmp_path / "killed"
    result = train_model(cfg, data, run_name="two-nodes", fault=FaultInjection(after_step=4, marker=str(marker)))

    assert marker.exists()
    assert Path(result.checkpoint_path).name == "checkpoint_00000008"
    assert result.metrics["step"] == 8
    # the staged copy of the data that workers on other nodes read
    assert (Path(result.storage_path) / "datasets" / data.fingerprint / "meta.json").is_file()
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100)
    node_ids = {w.node_id for w in workers}
    assert len(ray.nodes()) == 2 and len(node_ids) == 2, node_ids
