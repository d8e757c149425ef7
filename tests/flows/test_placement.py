"""flows/placement.py: whether Ray can place the workers on given nodes, and the one line that says why not
(the preflight's local Ray and the driver's joined cluster both use it; tests/integration/test_cluster_faults.py
runs it against real `ray start` nodes)."""

from __future__ import annotations

import pytest

from flows.config import load_config
from flows.errors import UserError
from flows.placement import can_place, describe, largest_cpus_per_worker, shortfall
from flows.train.cluster import check_placement, cpus_per_worker

TWO_SMALL = [{"CPU": 1}, {"CPU": 1}]


@pytest.mark.parametrize(("n", "need", "nodes", "strategy", "ok"), [
    (2, {"CPU": 1}, TWO_SMALL, "PACK", True),
    (1, {"CPU": 2}, TWO_SMALL, "PACK", False),            # 2 CPUs in all, but a worker's must be on one node
    (3, {"CPU": 1}, [{"CPU": 2}, {"CPU": 1}], "SPREAD", True),
    (2, {"CPU": 1}, [{"CPU": 2}], "STRICT_SPREAD", False),  # one node cannot spread
    (2, {"CPU": 1}, TWO_SMALL, "STRICT_PACK", False),
    (2, {"CPU": 1}, [{"CPU": 2}, {"CPU": 1}], "STRICT_PACK", True),
    (1, {"CPU": 1, "GPU": 1}, [{"CPU": 8}], "PACK", False),
    (2, {"CPU": 1, "GPU": 1}, [{"CPU": 8, "GPU": 1}, {"CPU": 1, "GPU": 1}], "PACK", True),
])
def test_can_place_counts_whole_workers_per_node(n, need, nodes, strategy, ok):
    assert can_place(n, need, nodes, strategy) is ok


@pytest.mark.parametrize(("n", "nodes", "strategy", "cpus"), [
    (1, [{"CPU": 2}, {"CPU": 1}], "PACK", 2),    # not 3: no node has 3 (the old cluster-total default hung here)
    (2, [{"CPU": 4}, {"CPU": 2}], "PACK", 2),
    (2, [{"CPU": 4}, {"CPU": 2}], "STRICT_PACK", 2),
    (3, [{"CPU": 8}], "PACK", 2),
    (2, [{"CPU": 8}, {"CPU": 2}], "STRICT_SPREAD", 2),
    (4, [{"CPU": 2}], "PACK", 1),                # nothing places: 1, and the check says why
])
def test_default_cpus_per_worker_is_the_most_that_still_places(n, nodes, strategy, cpus):
    assert largest_cpus_per_worker(n, nodes, strategy) == cpus
    tc = load_config(overrides=[f"train.num_workers={n}", f"train.placement_strategy={strategy}"]).train
    assert cpus_per_worker(tc, nodes) == cpus
    gpu = load_config(overrides=["train.use_gpu=true", "train.cpus_per_worker=3"]).train
    assert cpus_per_worker(gpu, nodes) == 3


@pytest.mark.parametrize(("overrides", "nodes", "key", "needles"), [
    (["train.num_workers=64"], [{"CPU": 2}], "train.num_workers",
     ["64 workers x 1 CPU each (64 CPU)", "1 node with 2 CPU and 0 GPU", "no autoscaler"]),
    (["train.use_gpu=true"], [{"CPU": 2}, {"CPU": 2}], "train.use_gpu",
     ["1 worker x 1 GPU + 1 CPU each", "there is no GPU", "CPU 2+2 (4 in all) and GPU 0+0 (0 in all)"]),
    (["train.use_gpu=true", "train.num_workers=4"], [{"CPU": 8, "GPU": 2}], "train.use_gpu",
     ["(4 GPU)", "there are 2 GPU in all"]),
    (["train.cpus_per_worker=2"], TWO_SMALL, "train.cpus_per_worker",
     ["1 worker x 2 CPU each", "must be on one node", "hold only 0"]),
    (["train.num_workers=2", "train.placement_strategy=STRICT_SPREAD"], [{"CPU": 2}], "train.placement_strategy",
     ["each on its own node (STRICT_SPREAD)"]),
])
def test_impossible_requests_name_the_key_what_was_asked_and_what_the_cluster_has(overrides, nodes, key, needles):
    tc = load_config(overrides=overrides).train
    with pytest.raises(UserError) as err:
        check_placement(tc, cpus_per_worker(tc, nodes), nodes, autoscaling=False)
    message = str(err.value)
    assert message.startswith(f"{key}: ") and "\n" not in message, message
    assert all(n in message for n in needles), message
    check_placement(tc, cpus_per_worker(tc, nodes), nodes, autoscaling=True)  # nodes may come: Ray waits, bounded


def test_requests_that_fit_pass_and_many_nodes_print_short():
    assert shortfall(2, {"CPU": 1}, TWO_SMALL) is None
    many = [{"CPU": 4, "GPU": 1}] * 40
    assert describe(many) == "40 nodes with CPU at most 4 a node (160 in all) and GPU at most 1 a node (40 in all)"
    assert describe([]) == "no alive node"
