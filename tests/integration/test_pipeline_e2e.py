"""The whole pipeline on real components: local Ray (2 workers), Prefect test harness, MLflow on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import load_config

pytestmark = pytest.mark.integration

TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "train.max_steps=12", "train.batch_size=8", "train.eval_interval=6", "train.eval_batches=2",
    "train.log_interval=3", "train.checkpoint_interval=6", "train.warmup_steps=2",
    "eval.max_tokens=4096", "eval.max_new_tokens=16", "train.num_workers=2",
]


def test_full_pipeline_registers_champion_and_reuses_data(tmp_path: Path, prefect_harness, ray_local):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import training_pipeline_flow

    cfg = load_config(overrides=[f"workdir={tmp_path}", *TINY])
    reg = training_pipeline_flow(config=cfg)

    client = MlflowClient(cfg.tracking_uri())
    champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert str(champion.version) == reg.version == "1"
    run = client.get_run(champion.run_id)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [3, 6, 9, 12]
    assert {"val_loss", "lr", "tokens_per_sec", "eval_bits_per_byte", "eval_perplexity"} <= set(run.data.metrics)
    assert len(list((tmp_path / "data").iterdir())) == 1

    # A second run with the same data reuses the prepared dataset and registers version 2.
    reg2 = training_pipeline_flow(config=cfg)
    assert reg2.version == "2"
    assert len(list((tmp_path / "data").iterdir())) == 1
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 2
    assert client.get_model_version_by_alias(cfg.registry.model_name, "challenger").version == 2


def test_failed_flow_marks_its_mlflow_run_failed(tmp_path: Path, prefect_harness, ray_local):
    from mlflow.tracking import MlflowClient

    from flows.errors import UserError
    from flows.pipeline import training_pipeline_flow

    # a prompt with a character the char vocabulary of the corpus lacks: evaluation fails (not retried)
    cfg = load_config(overrides=[f"workdir={tmp_path}", *TINY, "train.num_workers=1", "eval.prompts=['\u2603 snow']"])
    state = training_pipeline_flow(config=cfg, return_state=True)
    with pytest.raises(UserError):
        state.result()
    # a user error is never retried: the evaluate task ran once although it allows retries
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    [evaluate] = [r for r in runs if r.task_key.startswith("evaluate_model") or r.name.startswith("evaluate_model")]
    assert evaluate.state.is_failed() and evaluate.run_count == 1

    client = MlflowClient(cfg.tracking_uri())
    [run] = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id])
    assert run.info.status == "FAILED"
    assert client.search_model_versions(f"name='{cfg.registry.model_name}'") == []
