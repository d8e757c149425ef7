"""Shared fixtures: quiet, local, hermetic services for the whole test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the shared corpus lives beside the project)")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def prefect_harness():
    """A real (temporary, SQLite-backed) Prefect API for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance shared by a module's tests (starting one costs seconds); per module
    so that a module can run its own multi-node cluster instead."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()
