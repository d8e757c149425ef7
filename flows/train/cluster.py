"""The Ray cluster this run joined: its nodes, whether an autoscaler can add more, and whether the
run's workers can be placed on it at all, checked before `fit`.

Without an autoscaler, a request the alive nodes can never place (more CPUs or GPUs than the cluster
has, a worker's CPUs on no single node, STRICT_SPREAD over too few nodes) is refused at once, a
`UserError` naming the key, what was asked and what the nodes have (flows/placement.py does the
arithmetic; the preflight does the same for a local Ray before it starts). With an autoscaler (Ray's
cluster config lists node types) nodes may still come, so the request is left to Ray, whose worker-group
start-up the driver bounds with train.startup_timeout_s. The default CPUs per worker is the most that
still places every worker, one node each bundle: never more than one node holds.
"""

from __future__ import annotations

from flows.config import TrainSection
from flows.errors import UserError
from flows.placement import describe, largest_cpus_per_worker, shortfall


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the joined cluster."""
    import ray

    return [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]


def can_autoscale() -> bool:
    """Whether an autoscaler may add nodes (Ray's cluster config lists node types; Ray Train reads the
    same). When it cannot be told, True: the bounded start-up applies instead of a refusal."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() is not None
    except Exception:  # noqa: BLE001 - a private API: on any doubt, do not refuse
        return True


def worker_resources(tc: TrainSection, cpus: int) -> dict[str, float]:
    """One worker's bundle, as ScalingConfig builds it: its CPUs, and one GPU when use_gpu."""
    return {"CPU": cpus, **({"GPU": 1} if tc.use_gpu else {})}


def cpus_per_worker(tc: TrainSection, nodes: list[dict[str, float]]) -> int:
    """train.cpus_per_worker, else 1 on GPU workers (the GPU does the work; CPUs stay free for data
    loading), else the most CPUs each worker can have with all of them placed."""
    if tc.cpus_per_worker:
        return tc.cpus_per_worker
    if tc.use_gpu:
        return 1
    return largest_cpus_per_worker(tc.num_workers, nodes, tc.placement_strategy)


def check_placement(tc: TrainSection, cpus: int, nodes: list[dict[str, float]], *, autoscaling: bool) -> None:
    """Raise UserError when the workers can never be placed on `nodes` and no autoscaler can add more."""
    if autoscaling:
        return
    short = shortfall(tc.num_workers, worker_resources(tc, cpus), nodes, tc.placement_strategy,
                      cpus_configured=tc.cpus_per_worker is not None)
    if short:
        raise UserError(f"{short.key}: {short.asked} cannot be placed: the Ray cluster has {describe(nodes)}, "
                        f"and no autoscaler to add nodes ({short.reason}); {short.advice}, or add nodes")


def placed_cpus(tc: TrainSection) -> int:
    """CPUs per worker on the joined cluster, after refusing workers it can never place (UserError)."""
    nodes = alive_nodes()
    cpus = cpus_per_worker(tc, nodes)
    check_placement(tc, cpus, nodes, autoscaling=can_autoscale())
    return cpus
