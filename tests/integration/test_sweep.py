"""A sweep end to end on real components, its driver SIGKILLed after the first trial finished.

`python -m flows sweep` (real Prefect API: the session's harness server; a real local Ray with Ray Tune
and Ray Train; MLflow on SQLite) samples 4 trials of a tiny model on tinyshakespeare, the learning rate
chosen between one that learns and one that barely moves (1e-6), 2 at a time, so ASHA must stop the
slow ones at a rung where a fast one has reported. The driver is SIGKILLed as soon as a trial's run
records it completed, and the same command is run again. What a user cares about: the sweep ends as one
sweep (one parent run, exactly 4 trial runs under it, each saying how it ended, at least one stopped
early, their metrics over steps, a results table and figures), the trial that had finished is not trained
again (its checkpoints and metric points are exactly those it had), and exactly one model version comes
out, the best trial's, with its lineage and the champion gate's decision.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_servers import PROJECT, base_env, sigkill_tree, start

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENT, MODEL = "sweep-test", "sweep-lm"
SETTINGS = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.max_steps=40",
            "train.batch_size=8", "train.eval_interval=10", "train.eval_batches=2", "train.log_interval=5",
            "train.checkpoint_interval=20", "train.warmup_steps=2", "train.num_workers=1", "train.cpus_per_worker=1",
            "train.min_lr=1e-7", "eval.max_tokens=4096", "eval.max_new_tokens=8",
            f"registry.experiment={EXPERIMENT}", f"registry.model_name={MODEL}"]
# seed 6 samples 3e-3, 1e-6, 1e-6, 3e-3: a slow trial always meets a rung where a fast one reported
SEARCH = ["--search", "train.lr=choice:3e-3,1e-6", "--trials", "4", "--max-concurrent", "2", "--seed", "6"]


def sweep_command(workdir: Path, corpus: Path) -> list[str]:
    return [sys.executable, "-m", "flows", "sweep", "--set", f"workdir={workdir}", "--set", f"data.source={corpus}",
            *[a for s in SETTINGS for a in ("--set", s)], *SEARCH]


def trial_runs(client, experiment_id: str, parent_id: str):
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def wait_for_completed_trial(client, workdir: Path, proc: subprocess.Popen, log: Path):
    """The first trial run that records it completed (polling the store the sweep writes)."""
    while True:
        assert proc.poll() is None, f"the sweep ended before it was killed:\n{log.read_text()[-3000:]}"
        exp = client.get_experiment_by_name(EXPERIMENT) if (workdir / "mlflow.db").exists() else None
        if exp is not None:
            done = client.search_runs([exp.experiment_id], filter_string="tags.`sweep.outcome` = 'completed'")
            if done:
                return exp, done[0]
        time.sleep(0.2)


def checkpoints_of(trained: dict) -> dict[str, list[str]]:
    run_dir = Path(trained["storage_path"]) / trained["run_name"]
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(run_dir.glob("checkpoint_0*"))}


def test_sweep_killed_after_first_trial_resumes_and_registers_one_version(tmp_path: Path, prefect_harness,
                                                                           shakespeare: Path):
    import json

    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from flows.registry.gate import GateDecision

    workdir = tmp_path / "wd"
    env = base_env(PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(PROJECT))
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    command = sweep_command(workdir, shakespeare)

    first_log = tmp_path / "first.log"
    first = start(command, env, first_log, cwd=PROJECT)
    exp, finished = wait_for_completed_trial(client, workdir, first, first_log)
    sigkill_tree(first, "the sweep's driver")
    finished = client.get_run(finished.info.run_id)  # as the kill left it
    before = {key: [(m.step, m.value) for m in client.get_metric_history(finished.info.run_id, key)]
              for key in ("train_loss", "val_loss")}
    trained = json.loads(finished.data.tags["sweep.train_result"])
    checkpoints_before = checkpoints_of(trained)

    second = subprocess.run(command, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout

    # One sweep: one parent run, exactly 4 trial runs under it, each saying how it ended.
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`sweep.name` != ''")
    parents = [r for r in parents if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    trials = trial_runs(client, exp.experiment_id, parent.info.run_id)
    assert len(trials) == 4
    outcomes = sorted(r.data.tags["sweep.outcome"] for r in trials)
    assert "stopped_early" in outcomes and "completed" in outcomes, outcomes
    assert all(r.info.status == "FINISHED" for r in trials)
    for run in trials:  # every trial's curve, a stopped one's too (up to where it was stopped)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert steps and len(steps) == len(set(steps)), (run.info.run_name, steps)
    stopped = [r for r in trials if r.data.tags["sweep.outcome"] == "stopped_early"]
    assert all(max(m.step for m in client.get_metric_history(r.info.run_id, "val_loss")) < 40 for r in stopped)
    assert all(r.data.params["train.lr"] == "1e-06" for r in stopped)  # ASHA stopped the slow ones only

    # The trial that had finished was not trained again: its checkpoints and its points are as they were.
    assert checkpoints_of(trained) == checkpoints_before
    after = {key: [(m.step, m.value) for m in client.get_metric_history(finished.info.run_id, key)]
             for key in ("train_loss", "val_loss")}
    assert after == before
    assert client.get_run(finished.info.run_id).info.end_time == finished.info.end_time

    # The parent run: summary, a results table with every trial, the figures.
    metrics = parent.data.metrics
    assert metrics["sweep.trials"] == 4 and metrics["sweep.trials_stopped_early"] >= 1
    assert 0 < metrics["sweep.compute_saved"] < 1
    table = list(csv.DictReader(io.StringIO(
        Path(client.download_artifacts(parent.info.run_id, "sweep_results.csv", str(tmp_path))).read_text())))
    assert sorted(row["mlflow_run_id"] for row in table) == sorted(r.info.run_id for r in trials)
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/sweep_learning_curves.png", "figures/sweep_val_loss_vs_train_lr.png"} <= figures

    # Exactly one model version: the best completed trial's, with its lineage and the gate's decision.
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1
    version = versions[0]
    best = client.get_run(version.run_id)
    assert best.info.run_id == parent.data.tags["sweep.best_run_id"]
    assert best.data.tags["sweep.outcome"] == "completed"
    assert best.data.metrics["val_loss"] == min(r.data.metrics["val_loss"] for r in trials
                                                if r.data.tags["sweep.outcome"] == "completed")
    assert version.tags["sweep.parent_run_id"] == parent.info.run_id
    assert version.tags["sweep.trial_id"] == best.data.tags["sweep.trial_id"]
    assert GateDecision.from_tags(version.tags) is not None
