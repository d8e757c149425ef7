"""Whether Ray can place a run's workers on a set of nodes: the arithmetic, without Ray.

Each Ray Train worker is one placement-group bundle (`{"CPU": c}` plus `{"GPU": 1}` when
train.use_gpu) and a bundle lives on ONE node, so totals are not enough: 2 nodes of 1 CPU cannot hold a
worker of 2 CPUs. `shortfall` says which key makes a request impossible on the given nodes (totals of
each resource, then bundles per node under the placement strategy), `largest_cpus_per_worker` is the
default CPUs per worker that still places, and `describe` prints what nodes have. Used by the preflight
(this machine as the local Ray's one node) and by the driver (the nodes of the cluster it joined).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Resources = Mapping[str, float]
SHOWN = ("CPU", "GPU")  # what a worker asks for; other resources of a node are not printed


@dataclass(frozen=True)
class Shortfall:
    key: str       # the config key to change
    asked: str     # what the run asks for, e.g. "64 workers x 1 CPU each (64 CPUs)"
    reason: str    # why it cannot be placed, e.g. "the cluster has 2 CPUs in all"
    advice: str    # which key to change, e.g. "lower train.num_workers"


def bundles_on(node: Resources, need: Resources) -> int:
    """How many workers of `need` fit on `node`."""
    return min((int(node.get(r, 0) // q) for r, q in need.items() if q > 0), default=1 << 30)


def can_place(num_workers: int, need: Resources, nodes: Sequence[Resources], strategy: str = "PACK") -> bool:
    fits = [bundles_on(node, need) for node in nodes]
    if strategy == "STRICT_PACK":
        return max(fits, default=0) >= num_workers
    if strategy == "STRICT_SPREAD":
        return sum(f >= 1 for f in fits) >= num_workers
    return sum(fits) >= num_workers


def largest_cpus_per_worker(num_workers: int, nodes: Sequence[Resources], strategy: str = "PACK",
                            other: Resources | None = None) -> int:
    """The most CPUs each worker can have with all of them placed (1 when even that does not place)."""
    top = int(max((node.get("CPU", 0) for node in nodes), default=1))
    for cpus in range(top, 1, -1):
        if can_place(num_workers, {"CPU": cpus, **(other or {})}, nodes, strategy):
            return cpus
    return 1


def _amount(n: float) -> str:
    return f"{n:g}"


def describe_need(need: Resources) -> str:
    parts = [f"{_amount(need[r])} {r}" for r in ("GPU", "CPU") if need.get(r)]
    return " + ".join(parts) or "no resources"


def describe(nodes: Sequence[Resources]) -> str:
    """'1 node with 2 CPU and 0 GPU', '3 nodes with CPU 4+2+2 (8 in all) and GPU 0+0+0 (0 in all)',
    shortened for many nodes."""
    if not nodes:
        return "no alive node"
    if len(nodes) == 1:
        return "1 node with " + " and ".join(f"{_amount(nodes[0].get(r, 0))} {r}" for r in SHOWN)
    parts = []
    for r in SHOWN:
        values = [node.get(r, 0) for node in nodes]
        each = "+".join(_amount(v) for v in values) if len(nodes) <= 6 else f"at most {_amount(max(values))} a node"
        parts.append(f"{r} {each} ({_amount(sum(values))} in all)")
    return f"{len(nodes)} nodes with " + " and ".join(parts)


def shortfall(num_workers: int, need: Resources, nodes: Sequence[Resources], strategy: str = "PACK", *,
              cpus_configured: bool = False) -> Shortfall | None:
    """Why `num_workers` workers of `need` can never be placed on `nodes`, or None when they can."""
    if can_place(num_workers, need, nodes, strategy):
        return None
    workers = f"{num_workers} worker{'s' if num_workers != 1 else ''}"
    asked = f"{workers} x {describe_need(need)} each"
    cpu_key = "train.cpus_per_worker" if cpus_configured else "train.num_workers"
    for r in ("GPU", "CPU"):
        total = sum(node.get(r, 0) for node in nodes)
        if need.get(r, 0) * num_workers > total:
            if r == "GPU":
                return Shortfall("train.use_gpu", f"{asked} ({_amount(need[r] * num_workers)} GPU)",
                                 f"there {'is no GPU' if total == 0 else f'are {_amount(total)} GPU in all'}",
                                 "lower train.num_workers or set train.use_gpu=false")
            return Shortfall(cpu_key, f"{asked} ({_amount(need[r] * num_workers)} CPU)",
                             f"there are {_amount(total)} CPU in all", f"lower {cpu_key}")
    if strategy in ("STRICT_PACK", "STRICT_SPREAD"):
        where = "all on one node" if strategy == "STRICT_PACK" else "each on its own node"
        return Shortfall("train.placement_strategy", f"{asked}, {where} ({strategy})",
                         "no placement of the nodes allows that", "use train.placement_strategy=PACK or SPREAD")
    fits = sum(bundles_on(node, need) for node in nodes)
    return Shortfall(cpu_key, asked, f"a worker's resources must be on one node, and the nodes hold only {fits} "
                     "such workers", f"lower {cpu_key}")
