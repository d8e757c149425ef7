"""Run a sweep's trials with Ray Tune, or resume them, and say how each ended.

The Tune experiment lives under <storage_path>/sweeps/<sweep name>: run the same sweep again (its
driver was killed, a Prefect retry) and `Tuner.restore` picks it up: finished trials stay finished,
trials that were running start again and resume their Ray Train run from its last checkpoint, the
searcher goes on where it was. ASHA (the default) stops a trial whose metric, at a rung, is not among
the best 1/reduction_factor of the trials that reached it; FIFO runs every trial to the end. As many
trials run at once as the cluster holds (the trial function itself takes no CPU; its workers do).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

from flows.config import PipelineConfig
from flows.data import PreparedData
from flows.sweep.spec import Dimension, SweepConfig, tune_space
from flows.sweep.trials import COMPLETED, ERROR, FAILED, KEY_TAG, OUTCOME, RESULT, STOPPED_EARLY, TrialContext, \
    run_trial, trial_key
from flows.train import TrainResult


class TrialOutcome(BaseModel):
    """How one trial ended, as the sweep's results table shows it."""

    trial_id: str
    run_id: str | None  # its MLflow run
    params: dict[str, Any]
    outcome: str  # completed | stopped_early | failed
    steps: int  # optimizer steps it trained
    metric: float | None  # the sweep's metric at its last report
    error: str | None = None
    trained: TrainResult | None = None  # completed trials: the Ray Train run's final checkpoint


def sweep_dir(cfg: PipelineConfig) -> str:
    return f"{cfg.storage_path().rstrip('/')}/sweeps"


def concurrent_trials(cfg: PipelineConfig, sweep: SweepConfig) -> int:
    """sweep.max_concurrent, at most what the cluster holds: its CPUs (GPUs) over one trial's workers."""
    import ray

    from flows.train.cluster import placed_cpus

    tc = cfg.train
    total = ray.cluster_resources()
    if tc.use_gpu:
        fits = int(total.get("GPU", 0) // max(1, tc.num_workers))
    else:
        fits = int(total.get("CPU", 0) // (tc.num_workers * placed_cpus(tc)))
    fits = max(1, fits)
    return min(fits, sweep.max_concurrent) if sweep.max_concurrent else fits


def _scheduler(cfg: PipelineConfig, sweep: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler == "fifo":
        return FIFOScheduler()
    grace = sweep.grace_period or min(cfg.train.eval_interval, cfg.train.max_steps)
    # max_t one step past the end: a trial that reaches its last step ends by returning, never by being
    # stopped (a stop kills the trial's actor, and its last checkpoint and outcome with it)
    return ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps + 1, grace_period=grace,
                         reduction_factor=sweep.reduction_factor)


def _searcher(sweep: SweepConfig, concurrent: int):
    """Random search (Tune's BasicVariantGenerator, which takes the concurrency limit itself: Tune
    ignores max_concurrent_trials for it), or Optuna's TPE (Tune limits its concurrency)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sweep.searcher == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=TPESampler(seed=sweep.seed))
    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrent)


def progress_callback(keys: list[str], metric: str, max_steps: int):
    """A Tune callback in the driver that prints one line per trial report and one when a trial ends."""
    from ray import tune

    from flows.sweep.trials import trial_label

    def say(line) -> None:
        try:
            print(line())
        except Exception as exc:  # noqa: BLE001 - a progress line must never end a sweep (Tune re-raises)
            print(f"  (a progress line failed: {exc!r})")

    def value(result: dict) -> str:
        v = result.get(metric)
        return f"{metric} {v:.4f}" if isinstance(v, (int, float)) else f"{metric} -"

    class Progress(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            say(lambda: f"  {trial_label(trial.trial_id, trial.config, keys)}: step {result.get('step', '?')}/"
                        f"{max_steps}, {value(result)}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            ended = "completed" if result.get("step", 0) >= max_steps else "stopped early"
            say(lambda: f"  {trial_label(trial.trial_id, trial.config, keys)}: {ended} at step "
                        f"{result.get('step', '?')}, {value(result)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            say(lambda: f"  {trial_label(trial.trial_id, trial.config, keys)}: failed (its MLflow run's sweep.error)")

    return Progress()


def run_trials(cfg: PipelineConfig, sweep: SweepConfig, dims: list[Dimension], data: PreparedData, *,
               name: str, tracking_uri: str, parent_run_id: str, fault=None) -> list[TrialOutcome]:
    """Run (or resume) sweep `name` to its end on the Ray this process is connected to (`fault`, a
    FaultInjection: recovery tests only)."""
    from ray import tune

    from flows.train.staging import stage_data

    stage_data(data, cfg.storage_path())  # once, before the trials: they read the staged copy
    context = TrialContext(base=cfg, data=data, sweep=name, parent_run_id=parent_run_id,
                           tracking_uri=tracking_uri, keys=[d.key for d in dims], fault=fault)
    # The trial function takes no CPU (its Ray Train workers do); Tune refuses a request of nothing at
    # all, so it asks for one byte of memory.
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context.model_dump(mode="json")),
                                    {"cpu": 0, "memory": 1})
    path = f"{sweep_dir(cfg)}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"sweep {name}: resuming from {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)  # its callbacks (progress) come back with it
    else:
        concurrent = concurrent_trials(cfg, sweep)
        progress = progress_callback(context.keys, sweep.metric, cfg.train.max_steps)
        tuner = tune.Tuner(
            trainable, param_space=tune_space(dims),
            tune_config=tune.TuneConfig(metric=sweep.metric, mode="min", num_samples=sweep.trials,
                                        # random search takes its limit itself (_searcher)
                                        max_concurrent_trials=concurrent if sweep.searcher != "random" else None,
                                        scheduler=_scheduler(cfg, sweep), search_alg=_searcher(sweep, concurrent),
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=sweep_dir(cfg), verbose=0, callbacks=[progress],
                                      failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    return outcomes(grid, sweep, tracking_uri, name, cfg)


def outcomes(grid, sweep: SweepConfig, tracking_uri: str, name: str, cfg: PipelineConfig) -> list[TrialOutcome]:
    """Each trial's outcome, from Tune's results and the trials' MLflow runs (the ledger); a trial Tune
    stopped is marked stopped early in its MLflow run and its run closed."""
    import json

    from flows.registry import mlflow_client
    from flows.registry.tracking import quoted

    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    out: list[TrialOutcome] = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_of(result.path)
        runs = client.search_runs([exp.experiment_id], max_results=1,
                                  filter_string=f"tags.`{KEY_TAG}` = {quoted(trial_key(name, trial_id))}")
        run = runs[0] if runs else None
        tags = run.data.tags if run else {}
        metrics = result.metrics or {}
        value = metrics.get(sweep.metric)
        outcome = tags.get(OUTCOME) or (FAILED if result.error else STOPPED_EARLY)
        if run is not None:
            _backfill_history(client, run.info.run_id, result.metrics_dataframe, cfg)
        if run is not None and OUTCOME not in tags:
            client.set_tag(run.info.run_id, OUTCOME, outcome)
            if result.error:
                client.set_tag(run.info.run_id, ERROR, str(result.error).splitlines()[0][:5000])
            client.set_terminated(run.info.run_id, "FAILED" if result.error else "FINISHED")
        trained = TrainResult.model_validate(json.loads(tags[RESULT])) if outcome == COMPLETED else None
        out.append(TrialOutcome(
            trial_id=trial_id, run_id=run.info.run_id if run else None,
            params={k: v for k, v in (result.config or {}).items()}, outcome=outcome,
            steps=int(metrics.get("step", 0)), error=tags.get(ERROR) or (str(result.error) if result.error else None),
            metric=float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None,
            trained=trained))
    return sorted(out, key=lambda o: o.trial_id)


def _backfill_history(client, run_id: str, history, cfg: PipelineConfig) -> None:
    """Log to the trial's run the points Tune received that the run lacks: a trial stopped early is
    killed with its last metric points still buffered on its rank-0 worker (flows/train/metric_buffer.py).
    val_loss is fresh at every report; train_loss only at a logging step."""
    import time

    from mlflow.entities import Metric

    if history is None or "step" not in getattr(history, "columns", []):
        return
    ts, points = int(time.time() * 1000), []
    for key in ("val_loss", "train_loss"):
        if key not in history.columns:
            continue
        have = {m.step for m in client.get_metric_history(run_id, key)}
        for step, value in zip(history["step"], history[key]):
            step = int(step)
            fresh = key == "val_loss" or step % cfg.train.log_interval == 0 or step == cfg.train.max_steps
            if step not in have and fresh and value == value:  # not NaN
                points.append(Metric(key, float(value), ts, step))
                have.add(step)
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i: i + 1000])


def trial_dirname(trial) -> str:
    """Tune's directory of a trial: trial-<trial id> (its default holds the sampled values, too long)."""
    return f"trial-{trial.trial_id}"


def _trial_id_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1].removeprefix("trial-")


def best_trial(trials: list[TrialOutcome]) -> TrialOutcome:
    """The completed trial with the lowest metric (trials stopped early never trained to the end)."""
    from flows.errors import UserError

    done = [t for t in trials if t.outcome == COMPLETED and t.metric is not None and t.trained is not None]
    if not done:
        failed = [t for t in trials if t.outcome == FAILED]
        why = f"; {len(failed)} failed, the first: {failed[0].error}" if failed else ""
        raise UserError(f"sweep: no trial completed ({len(trials)} ran){why}")
    return min(done, key=lambda t: t.metric)
