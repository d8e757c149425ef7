"""One champion gate at a time per registered model, whichever way the pipelines share a registry.

Two gates that overlap would both read the same champion and could both promote. The gate therefore
runs under `champion_lock`, and reads the champion only once it holds it (`gate.gate_exclusively`). The
lock is an exclusive `flock` on a file: beside the database for a SQLite store (every process that
can write that store sees that file, so any number of `flows run` processes on one machine, each with
its own temporary Prefect server, are serialised), and in a per-user directory keyed by the tracking
URI and model name for a tracking server. Runs on different machines that share one tracking server
share a Prefect server too (deployments, workers, `PREFECT_API_URL`): when the process talks to a
configured Prefect API, a Prefect global concurrency limit of 1 is taken first, which serialises
gates across machines. A temporary Prefect server (no `PREFECT_API_URL`) is private to its process,
so its limit would serialise nothing; the file lock is what holds there.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

LOCK_DIR = Path("~/.cache/attention-pipeline/locks")  # for tracking servers; a SQLite store's lock is beside it


def _slug(model_name: str) -> str:
    """A readable, collision-free file-name part for a model name (names may hold any character)."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name)[:60]
    return f"{readable}-{hashlib.sha256(model_name.encode()).hexdigest()[:12]}"


def lock_path(tracking_uri: str, model_name: str, lock_dir: Path = LOCK_DIR) -> Path:
    """The file whose flock serialises gates of model_name in the store of tracking_uri."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()
        return db.with_name(f"{db.name}.champion-{_slug(model_name)}.lock")
    store = hashlib.sha256(tracking_uri.rstrip("/").encode()).hexdigest()[:16]  # the URI may hold credentials
    return lock_dir.expanduser() / f"champion-{store}-{_slug(model_name)}.lock"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on path, held until the block ends (or the process dies: never stale)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:  # an open file description of its own: threads exclude each other, too
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def shared_prefect_api() -> str | None:
    """The Prefect API this process is configured with (PREFECT_API_URL, a profile, a test harness), or
    None when it uses a temporary server of its own (Prefect's, or the one `flows run` starts)."""
    from prefect.settings import get_current_settings

    from flows.prefect_server import is_temporary

    url = get_current_settings().api.url or None
    return None if url is None or is_temporary(url) else url


@contextmanager
def prefect_limit(model_name: str) -> Iterator[None]:
    """A Prefect global concurrency limit of 1 named after the model, held until the block ends."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    name = "champion-gate-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    with concurrency(name, occupy=1, strict=True):
        yield


@contextmanager
def champion_lock(tracking_uri: str, model_name: str, *, lock_dir: Path = LOCK_DIR,
                  use_prefect: bool | None = None) -> Iterator[None]:
    """Hold the lock of model_name's gate: the Prefect limit first when a Prefect API is shared
    (use_prefect None: decide by shared_prefect_api()), then the file lock; always in that order,
    so two holders never wait on each other."""
    if use_prefect is None:
        use_prefect = shared_prefect_api() is not None
    with ExitStack() as stack:
        if use_prefect:
            stack.enter_context(prefect_limit(model_name))
        stack.enter_context(file_lock(lock_path(tracking_uri, model_name, lock_dir)))
        yield
