"""A trial that loses its worker resumes from its checkpoint, as a single run does (real local Ray with
Ray Tune, Optuna's searcher and Ray Train, MLflow on SQLite): the trial's rank-0 worker SIGKILLs itself right after its
step-10 checkpoint; Ray Train restarts the worker group from that checkpoint inside the same Tune trial,
which completes, every step logged exactly once to the trial's run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.max_steps=30",
        "train.batch_size=4", "train.eval_interval=10", "train.eval_batches=1", "train.log_interval=1",
        "train.checkpoint_interval=10", "train.warmup_steps=2", "train.num_workers=1", "train.cpus_per_worker=1",
        "eval.max_tokens=1024", "registry.experiment=sweep-recovery"]


def test_a_trial_that_loses_its_worker_resumes_from_its_checkpoint(tmp_path: Path, ray_local, shakespeare):
    from flows.config import load_config
    from flows.data import prepare_dataset
    from flows.registry import mlflow_client
    from flows.registry.tracking import start_pipeline_run
    from flows.sweep.spec import SweepConfig, check_sweep
    from flows.sweep.trials import KEY_TAG
    from flows.sweep.tuner import run_trials
    from flows.train import FaultInjection

    cfg = load_config(overrides=[f"workdir={tmp_path / 'wd'}", f"data.source={shakespeare}", *TINY])
    data = prepare_dataset(cfg)
    # Optuna's searcher (the optuna extra), end to end: its trials carry ids of their own
    sweep = SweepConfig(search={"train.lr": "loguniform:1e-3:3e-3"}, trials=1, scheduler="fifo", searcher="optuna")
    uri = cfg.tracking_uri()
    parent = start_pipeline_run(cfg, uri, flow_run_id="sweep-fault", key_tag=KEY_TAG, run_name="sweep-fault")
    marker = tmp_path / "killed"

    (trial,) = run_trials(cfg, sweep, check_sweep(cfg, sweep), data, name="sweep-fault", tracking_uri=uri,
                          parent_run_id=parent, fault=FaultInjection(after_step=10, marker=str(marker)))

    assert marker.exists()  # the worker really died, after its step-10 checkpoint
    assert (trial.outcome, trial.steps) == ("completed", 30)
    assert trial.trained is not None and trial.trained.checkpoint_path.endswith("checkpoint_00000030")
    client = mlflow_client(uri)
    steps = [m.step for m in client.get_metric_history(trial.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 31))  # each step once: none lost, none repeated by the restart
    run = client.get_run(trial.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
