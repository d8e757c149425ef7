"""Shared fixtures: quiet, local, hermetic services for the whole test session."""

from __future__ import annotations

import os
import secrets
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
# One Ray auth setting for the whole session. Ray reads it once per process, so an in-process driver
# cannot switch between clusters with different settings; every cluster a test starts (local or with
# `ray start`) uses token auth (Ray's default) with this session's token, unless it tests another one
# from a client process of its own (test_submit_cluster).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(24))

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


# --------------------------------------------------------------------------------------------------
# Fixtures for the evaluation, registry, generate and server tests.

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}


@pytest.fixture(scope="session")
def prepared_corpus(tmp_path_factory):
    """make(text, block_size=16) -> (PipelineConfig, PreparedData): a real prepare_dataset of `text`
    in its own workdir (char tokenizer, so the text's characters are the vocabulary; the one eval
    prompt is the text's start)."""
    from flows.config import load_config
    from flows.data import prepare_dataset

    def make(text: str, block_size: int = TINY_MODEL["block_size"]):
        root = tmp_path_factory.mktemp("corpus")
        (root / "corpus.txt").write_text(text)
        cfg = load_config(overrides=[f"workdir={root / 'wd'}", f"data.source={root / 'corpus.txt'}",
                                     "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                                     f"model.block_size={block_size}", "eval.max_new_tokens=8",
                                     "eval.batch_size=4"])
        cfg.eval.prompts = [text[:4]]  # inside the char vocabulary by construction
        return cfg, prepare_dataset(cfg)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """make(vocab_size, seed=0, block_size=16) -> path of a Ray-Train-style checkpoint (TrainState)
    holding a randomly initialised tiny Transformer; different seeds give different models."""
    import torch

    from attention_core import ModelConfig, TrainState, Transformer

    def make(vocab_size: int, seed: int = 0, block_size: int = TINY_MODEL["block_size"]):
        torch.manual_seed(seed)
        model = Transformer(ModelConfig(vocab_size=vocab_size, **{**TINY_MODEL, "block_size": block_size}))
        path = tmp_path_factory.mktemp("checkpoint") / "checkpoint_00000001"
        TrainState(model=model, optimizer=None, step=1).save(path)
        return path

    return make


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def postgres_url():
    """postgresql://postgres@127.0.0.1:5432 when a server answers there (trust auth), else None."""
    try:
        import psycopg2
    except ImportError:
        return None
    try:
        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3).close()
    except psycopg2.OperationalError:
        return None
    return "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture(scope="session")
def postgres_database(postgres_url):
    """make(prefix) -> the name of a new, uniquely named PostgreSQL database; all are dropped at the end."""
    import uuid

    if postgres_url is None:
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    import psycopg2

    created: list[str] = []

    def run(sql: str) -> None:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def make(prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        run(f'CREATE DATABASE "{name}"')
        created.append(name)
        return name

    yield make
    for name in created:
        run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------------------------------
# A real S3-compatible server: moto's standalone server (`python -m moto.server`), in its own process
# so that Ray workers in other processes reach it over HTTP like any S3 endpoint.

class S3Server:
    """A running moto server: its endpoint, the AWS variables that point any client at it (pyarrow's
    `FileSystem.from_uri`, hence Ray Train, honours AWS_ENDPOINT_URL), and a bucket maker."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "moto-test-key",
                    "AWS_SECRET_ACCESS_KEY": "moto-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self):
        """A pyarrow S3FileSystem on this server (explicit options: the constructor ignores AWS_ENDPOINT_URL)."""
        import pyarrow.fs as pafs

        host = self.endpoint.split("://", 1)[1]
        return pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key=self.env["AWS_ACCESS_KEY_ID"],
                                 secret_key=self.env["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                                 allow_bucket_creation=True)

    def bucket(self, prefix: str = "test") -> str:
        """Create a new, uniquely named bucket; returns its name."""
        import uuid

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.filesystem().create_dir(name)
        return name


@pytest.fixture(scope="session")
def s3_server(free_port, tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port) for the session; stopped (by its pid) at the end."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
