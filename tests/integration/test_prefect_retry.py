"""A Prefect retry of train_model resumes the same Ray Train run from its last checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import load_config

pytestmark = pytest.mark.integration


def test_retry_of_train_task_resumes_instead_of_restarting(tmp_path: Path, prefect_harness, ray_local):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import training_pipeline_flow
    from flows.train import FaultInjection

    marker = tmp_path / "killed"
    cfg = load_config(overrides=[
        f"workdir={tmp_path}", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.max_steps=12", "train.batch_size=4", "train.eval_interval=6", "train.eval_batches=1",
        "train.log_interval=3", "train.checkpoint_interval=6", "train.warmup_steps=2",
        "train.max_failures=0",  # Ray gives up at once, so the Prefect task fails and retries
        "eval.max_tokens=2048", "eval.max_new_tokens=8",
    ])
    reg = training_pipeline_flow(config=cfg, fault=FaultInjection(after_step=6, marker=str(marker)))

    assert marker.exists(), "the worker was not killed"
    runs = [p for p in (tmp_path / "ray_results").iterdir() if p.is_dir() and p.name.startswith("train-")]
    assert len(runs) == 1, runs  # the retry used the same Ray Train run
    client = MlflowClient(cfg.tracking_uri())
    run_id = client.get_model_version(cfg.registry.model_name, reg.version).run_id
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    # the first attempt logged 3 and 6, the resumed one 9 and 12: a restart would repeat 3 and 6
    assert sorted(steps) == [3, 6, 9, 12]
