"""Whether the Ray workers can reach the flow's MLflow store, so that rank 0 never logs to one of its own.

Rank 0 logs to the tracking URI the driver hands it. A server (http://...) is reached over the network
from any node; a local store (`sqlite:///path`, `file:` or a plain path, the default being
`<workdir>/mlflow.db`) is a file on the driver's machine. Opened on a node that cannot see that file,
MLflow would create an empty store there and rank 0 would log into it (or fail on the run it cannot
find). So the driver makes a local store's path absolute (workers run in Ray's own directories) and,
when the cluster has nodes other than its own, asks each of them, with a zero-CPU Ray task pinned to
it, whether it sees this very store, the one holding the flow's MLflow run; a node that does not is a
one-line UserError before any training starts, saying to use an MLflow server (or shared storage).
Rank 0 checks once more before it opens a local store (a node may join after the driver asked) and
never creates one.
"""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from flows.errors import UserError

PROBE_TIMEOUT_S = 120  # a node that does not answer the probe within this is taken as not seeing the store
REMOTE_WORDS = {"databricks", "databricks-uc", "uc"}  # scheme-less URIs that MLflow reads as remote stores


def local_store_path(uri: str) -> Path | None:
    """The file (SQLite) or directory (file store) of a local MLflow store; None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" and uri not in REMOTE_WORDS:
        return Path(uri)
    return None


def absolute_store_uri(uri: str) -> str:
    """uri with a relative local store path made absolute: a worker's working directory is not the driver's."""
    path = local_store_path(uri)
    if path is None or path.is_absolute():
        return uri
    if uri.startswith("sqlite:///"):
        query = uri.partition("?")[2]
        return f"sqlite:///{path.resolve()}" + (f"?{query}" if query else "")
    return path.resolve().as_uri() if uri.startswith("file:") else str(path.resolve())


def store_holds_run(path: str, run_id: str) -> bool:
    """Whether `path` here is a store holding MLflow run `run_id`; reads only, creates nothing."""
    store = Path(path)
    if store.is_dir():  # a file store: <root>/<experiment id>/<run id>/meta.yaml
        return any(store.glob(f"*/{run_id}/meta.yaml"))
    if not store.is_file():
        return False
    try:
        with sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True, timeout=30) as db:
            return db.execute("SELECT 1 FROM runs WHERE run_uuid = ?", (run_id,)).fetchone() is not None
    except sqlite3.Error:
        return False


def check_workers_reach_store(tracking_uri: str, run_id: str) -> None:
    """Driver: every other alive node of the Ray cluster sees the local store holding `run_id`, else a
    UserError naming the store and those nodes. Nothing to ask with a server or a single node."""
    path = local_store_path(tracking_uri)
    if path is None:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():  # TorchTrainer will start a local, single-node Ray
        return
    here = ray.get_runtime_context().get_node_id()
    others = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here}
    if not others:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(store_holds_run)
    asked = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
             .remote(str(path), run_id): node for node in others}
    answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=PROBE_TIMEOUT_S)
    blind = []
    for ref, node in asked.items():
        try:
            sees = ref in answered and ray.get(ref)
        except ray.exceptions.RayError:  # the node died while asked
            sees = False
        if not sees:
            blind.append(f"{others[node]} (node {node[:12]})")
    if blind:
        raise UserError(
            f"registry.tracking_uri: the MLflow store {path} is a file on the driver's machine that Ray "
            f"node(s) {', '.join(sorted(blind))} cannot see, so rank 0 there would log to a store of its own; "
            "set registry.tracking_uri (or MLFLOW_TRACKING_URI) to an MLflow server every node reaches "
            "(http://...), or keep the store on a filesystem every node mounts")


def require_store_here(tracking_uri: str) -> None:
    """Rank 0, before opening the store: a local store must already exist on this node (MLflow would
    create an empty one, and the metrics would land there instead of in the flow's run)."""
    path = local_store_path(tracking_uri)
    if path is not None and not path.exists():
        raise RuntimeError(f"the MLflow store {path} does not exist on this node ({socket.gethostname()}): "
                           "it is on the driver's machine; use an MLflow server every node reaches")
