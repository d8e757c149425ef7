"""Ray Train on a real local Ray: exact resume after SIGKILL, and data parallelism that does not
change what the model learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attention_core import TrainState
from flows.config import load_config
from flows.data import prepare_dataset
from flows.train import FaultInjection, train_model

pytestmark = pytest.mark.integration

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.max_steps=12", "train.batch_size=4", "train.eval_interval=6", "train.eval_batches=2",
        "train.log_interval=3", "train.checkpoint_interval=4", "train.warmup_steps=2", "train.num_to_keep=5"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small real corpus: a slice of the standard library's source."""
    from flows.data import stdlib_files

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[:12]))
    return path


def _setup(tmp_path: Path, corpus: Path, *extra: str):
    cfg = load_config(overrides=[f"workdir={tmp_path}", f"data.source={corpus}", *TINY, *extra])
    return cfg, prepare_dataset(cfg)


def _weights(checkpoint_path: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint_path) / TrainState.WEIGHTS))


def _mlflow_run(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(f"train-{tmp_path.name}")
    return uri, client, client.create_run(exp).info.run_id


def test_sigkilled_ddp_worker_resumes_bitwise_exactly(tmp_path: Path, corpus: Path, ray_local):
    # two DDP workers (1 CPU each), dropout > 0 and 2 micro-batches: the resume must restore what every
    # rank's randomness, its share of each batch and gradient accumulation do, on both ranks
    cfg, data = _setup(tmp_path, corpus, "model.dropout=0.1", "train.grad_accum=2", "train.num_workers=2",
                       "train.max_failures=1")
    clean = train_model(cfg, data, run_name="uninterrupted")

    marker = tmp_path / "killed"
    uri, client, run_id = _mlflow_run(tmp_path)
    killed = train_model(cfg, data, run_name="killed", tracking_uri=uri, mlflow_run_id=run_id,
                         fault=FaultInjection(after_step=8, marker=str(marker)))

    assert marker.exists(), "rank 0 was not killed"
    assert client.get_run(run_id).data.params["world_size"] == "2"
    # logged at 3 and 6 before the kill, 9 and 12 after: resumed at step 9, not restarted
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [3, 6, 9, 12]
    assert Path(killed.checkpoint_path).name == "checkpoint_00000012"
    a, b = _weights(clean.checkpoint_path), _weights(killed.checkpoint_path)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_two_ddp_workers_match_one_worker_with_twice_the_batch(tmp_path: Path, corpus: Path, ray_local):
    uri, client, run_one = _mlflow_run(tmp_path)
    run_two = client.create_run(client.get_run(run_one).info.experiment_id).info.run_id

    one, data = _setup(tmp_path, corpus, "train.num_workers=1", "train.batch_size=8", "train.log_interval=1")
    two, _ = _setup(tmp_path, corpus, "train.num_workers=2", "train.batch_size=4", "train.log_interval=1")
    train_model(one, data, run_name="one-worker", tracking_uri=uri, mlflow_run_id=run_one)
    train_model(two, data, run_name="two-workers", tracking_uri=uri, mlflow_run_id=run_two)

    curve = {r: [m.value for m in sorted(client.get_metric_history(r, "train_loss"), key=lambda m: m.step)]
             for r in (run_one, run_two)}
    assert len(curve[run_one]) == len(curve[run_two]) == 12
    # same global batch, gradients averaged over ranks: equal up to float reduction order
    assert curve[run_two] == pytest.approx(curve[run_one], rel=1e-4, abs=1e-4)
    assert curve[run_one][-1] < curve[run_one][0]


def test_fsdp2_trains_checkpoints_and_resumes_bitwise_exactly(tmp_path: Path, corpus: Path, ray_local):
    from attention_core import load_weights, Transformer
    from flows.train import model_config_for

    cfg, data = _setup(tmp_path, corpus, "train.strategy=fsdp", "train.num_workers=2", "train.max_steps=8",
                       "train.max_failures=1")
    clean = train_model(cfg, data, run_name="fsdp-uninterrupted")
    uri, client, run_id = _mlflow_run(tmp_path)
    marker = tmp_path / "killed"
    result = train_model(cfg, data, run_name="fsdp", tracking_uri=uri, mlflow_run_id=run_id,
                         fault=FaultInjection(after_step=4, marker=str(marker)))

    assert marker.exists()
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [3, 6, 8]
    # the checkpoint holds full (unsharded) weights that a plain model loads
    model = Transformer(model_config_for(cfg, data.vocab_size))
    load_weights(model, Path(result.checkpoint_path) / TrainState.WEIGHTS)
    # ... in the one TrainState format: full optimizer state by parameter name, read strictly
    state = TrainState.read(result.checkpoint_path)
    assert state.step == 8 and set(state.optimizer["state"]) == {n for n, _ in model.named_parameters()}
    # ... and the resumed shards went on exactly as the uninterrupted ones did
    a, b = _weights(clean.checkpoint_path), _weights(result.checkpoint_path)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
