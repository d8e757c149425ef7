"""Object-store storage end to end, on a real S3-compatible server (moto's standalone server over HTTP
on 127.0.0.1, in its own process, reached through the standard AWS variables as a cluster would):
publishing a staged dataset is atomic (a copy without its commit marker is never read, a SIGKILLed
upload is redone), and the whole pipeline with `train.storage_path=s3://...` resumes after a worker
SIGKILL from the checkpoint in the bucket, then evaluates and registers that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from flows.config import load_config
from flows.data import PreparedData
from flows.train import localize_data, stage_data
from flows.train.staging import COMMITTED, read_manifest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_env(s3_server):
    """The AWS variables that point pyarrow (and so Ray Train) at the moto server, for this module."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        yield s3_server


@pytest.fixture(scope="module")
def ray_s3(s3_env):
    """A local Ray started with the S3 variables set: its controller and workers inherit them, as the
    processes of a cluster's nodes inherit them from `ray start`."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


def _prepared(root: Path) -> PreparedData:
    """A prepared-data directory with a fingerprint of its own (the per-node download cache is keyed
    by fingerprint, so a shared one would let a test read an earlier test's copy)."""
    fingerprint = uuid.uuid4().hex[:16]
    d = root / "prepared" / fingerprint
    d.mkdir(parents=True)
    np.arange(300_000, dtype=np.uint16).tofile(d / "train.bin")
    np.arange(5_000, dtype=np.uint16).tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"fingerprint": fingerprint}))
    (d / "tokenizer.json").write_text("{}")
    return PreparedData(path=str(d), fingerprint=fingerprint, tokenizer="char", vocab_size=65535, dtype="uint16",
                        train_tokens=300_000, val_tokens=5_000, val_bytes=5_000)


def _storage(kind: str, s3: "object", tmp_path: Path) -> str:
    return f"s3://{s3.bucket('staging')}/runs" if kind == "s3" else str(tmp_path / "shared" / "runs")


def _elsewhere(data: PreparedData) -> PreparedData:
    """The same dataset as a worker on another node sees it: the driver's path does not exist there."""
    return data.model_copy(update={"path": f"/nonexistent-{uuid.uuid4().hex}/{data.fingerprint}"})


KILLED_BEFORE_COMMIT = """
import os, signal, sys
from flows.data import PreparedData
from flows.train import staging

def die(*args, **kwargs):  # the driver dies with every data file written and the marker not yet
    os.kill(os.getpid(), signal.SIGKILL)

staging._write_marker = die
staging.stage_data(PreparedData.model_validate_json(sys.argv[1]), sys.argv[2])
"""


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_a_staged_copy_killed_before_its_commit_is_never_read_and_is_redone(kind, tmp_path, s3_env):
    data = _prepared(tmp_path)
    storage = _storage(kind, s3_env, tmp_path)

    # a real driver process, SIGKILLed at the worst moment: all data written, the marker not yet
    proc = subprocess.run([sys.executable, "-c", KILLED_BEFORE_COMMIT, data.model_dump_json(), storage],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if kind == "s3":
        fs, prefix = s3_env.filesystem(), f"{storage[len('s3://'):]}/datasets/{data.fingerprint}"
        left = {Path(i.path).name for i in fs.get_file_info(_selector(prefix))}
        assert left == {"train.bin", "val.bin", "meta.json", "tokenizer.json"}  # uploaded, not committed
        with fs.open_output_stream(f"{prefix}/train.bin") as out:  # what a leftover holds is not trusted
            out.write(b"\0" * 10)

    with pytest.raises(FileNotFoundError, match=COMMITTED):  # a worker on another node refuses it
        localize_data(_elsewhere(data), storage)

    stage_data(data, storage)  # the next driver uploads it again and commits it
    local = localize_data(_elsewhere(data), storage)
    assert np.array_equal(local.tokens("train"), data.tokens("train"))
    assert np.array_equal(local.tokens("val"), data.tokens("val"))


def _selector(prefix: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(prefix, recursive=True)


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_concurrent_drivers_stage_one_readable_copy(kind, tmp_path, s3_env):
    import pyarrow.fs as pafs

    data = _prepared(tmp_path)
    storage = _storage(kind, s3_env, tmp_path)
    with ThreadPoolExecutor(3) as pool:  # three drivers of the same dataset at once: none fails
        list(pool.map(lambda _: stage_data(data, storage), range(3)))

    fs, path = pafs.FileSystem.from_uri(storage if kind == "s3" else f"file://{storage}")
    manifest = read_manifest(fs, f"{path}/datasets/{data.fingerprint}")
    assert manifest == {p.name: p.stat().st_size for p in Path(data.path).iterdir()}
    local = localize_data(_elsewhere(data), storage)
    assert np.array_equal(local.tokens("train"), data.tokens("train"))
    if kind == "local":  # no temporary directory left behind by the drivers that lost the rename
        assert [p.name for p in (Path(storage) / "datasets").iterdir()] == [data.fingerprint]


def test_a_real_storage_error_is_raised_not_taken_for_another_drivers_win(tmp_path, s3_env):
    data = _prepared(tmp_path)
    with pytest.raises(OSError, match="no-such-bucket"):
        stage_data(data, f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/runs")


# --------------------------------------------------------------------------------------------------
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.max_steps=12", "train.batch_size=4", "train.eval_interval=6", "train.eval_batches=1",
        "train.log_interval=3", "train.checkpoint_interval=6", "train.warmup_steps=2",
        "eval.max_tokens=2048", "eval.max_new_tokens=8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from flows.data import stdlib_files

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[:8]))
    return path


def test_pipeline_on_s3_resumes_after_a_worker_sigkill_and_registers_the_bucket_checkpoint(
        tmp_path, corpus, s3_env, prefect_harness, ray_s3, monkeypatch):
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load

    from flows.pipeline import training_pipeline_flow
    from flows.train import FaultInjection

    bucket = s3_env.bucket("runs")
    marker = tmp_path / "killed"
    cfg = load_config(overrides=[
        f"workdir={tmp_path / 'wd'}", f"data.source={corpus}", f"train.storage_path=s3://{bucket}/attention",
        *TINY,
        "train.max_failures=0",  # Ray gives up at once: the Prefect retry stages again and resumes from the bucket
    ])
    reg = training_pipeline_flow(config=cfg, fault=FaultInjection(after_step=6, marker=str(marker)))

    assert marker.exists(), "the worker was not killed"
    client = MlflowClient(cfg.tracking_uri())
    run = client.get_run(client.get_model_version(cfg.registry.model_name, reg.version).run_id)
    # the first attempt logged 3 and 6, the resumed one 9 and 12: a restart would repeat 3 and 6
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [3, 6, 9, 12]
    assert run.data.metrics["eval_bits_per_byte"] > 0

    # everything Ray Train kept is in the bucket, nothing on the local disk
    fs = s3_env.filesystem()
    objects = {i.path[len(bucket) + 1:] for i in fs.get_file_info(_selector(bucket)) if i.type.name == "File"}
    run_name = run.data.tags["ray.run_name"]
    final = f"attention/{run_name}/checkpoint_00000012"
    assert {f"{final}/model.safetensors", f"{final}/state.json", f"{final}/optimizer.pt"} <= objects
    assert {o.split("/")[1] for o in objects} == {"datasets", run_name}  # one Ray Train run: the retry reused it
    assert run.data.tags["ray.checkpoint_path"] == f"{bucket}/{final}"
    assert not (tmp_path / "wd" / "ray_results").exists()
    fingerprint = run.data.tags["data.fingerprint"]
    assert f"attention/datasets/{fingerprint}/{COMMITTED}" in objects

    # evaluation and registration read the bucket's final checkpoint: the registered weights are its weights
    with fs.open_input_stream(f"{bucket}/{final}/model.safetensors") as f:
        trained = load(f.read())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking_uri())  # MLflow resolves models:/ through it
    pack = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{cfg.registry.model_name}/{reg.version}", dst_path=str(tmp_path / "model"),
        tracking_uri=cfg.tracking_uri(), registry_uri=cfg.tracking_uri()))
    registered = load((pack / "artifacts" / "model_pack" / "model.safetensors").read_bytes())
    assert trained.keys() == registered.keys()
    assert all(np.array_equal(trained[k].numpy(), registered[k].numpy()) for k in trained)
