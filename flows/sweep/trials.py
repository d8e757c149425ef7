"""One trial of a sweep: the pipeline's own Ray Train run, inside a Ray Tune trial, logged as a child MLflow run.

`run_trial` is Ray Tune's function trainable (Ray 2.60's Tune + Train V2 integration: the trainer is
built inside the trial function and reports to Tune through `TuneReportCallback`). It starts from the
base config with the trial's sampled values, finds or creates the trial's MLflow run (a child of the
sweep's run, keyed by the sweep and Tune's trial id, so a resumed sweep reuses it), and runs
`train_model` exactly as a single run does: same worker loop, checkpoints, worker-failure recovery and
run-name resume (the Ray Train run is named after the sweep and the trial). Its workers report every
evaluation, which is what ASHA reads to stop a trial early.

The trial's MLflow run is also the sweep's ledger: a trial that finished records `sweep.outcome=completed`
and its `TrainResult` as tags; run again (a resumed sweep whose last snapshot predates that), it reports
its final metrics to Tune at once instead of training again.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from flows.config import PipelineConfig
from flows.data import PreparedData
from flows.train.job import FaultInjection

KEY_TAG = "sweep.run_key"  # finds a sweep's runs: "<sweep>" (the parent), "<sweep>/<trial id>" (a trial)
OUTCOME, RESULT, ERROR = "sweep.outcome", "sweep.train_result", "sweep.error"
COMPLETED, STOPPED_EARLY, FAILED = "completed", "stopped_early", "failed"


class TrialContext(BaseModel):
    """What every trial of one sweep shares (handed to Tune once, with `tune.with_parameters`)."""

    base: PipelineConfig
    data: PreparedData
    sweep: str
    parent_run_id: str
    tracking_uri: str
    keys: list[str]  # the searched keys, in the order given
    fault: FaultInjection | None = None  # recovery tests only: the first trial to reach it loses its rank-0 worker


def trial_key(sweep: str, trial_id: str) -> str:
    return f"{sweep}/{trial_id}"


def trial_label(trial_id: str, params: dict[str, Any], keys: list[str]) -> str:
    """'trial 3: lr=2.1e-3,n_embd=128': the trial's number and its values, as a run name shows them."""
    from flows.naming import NAMED_SETTINGS, short_value

    values = ",".join(f"{NAMED_SETTINGS.get(k, k.split('.')[-1])}={short_value(params[k])}" for k in keys if k in params)
    suffix = trial_id.rsplit("_", 1)[-1]  # a number under random search; Optuna's trials have hex ids
    return f"trial {int(suffix) if suffix.isdigit() else suffix}: {values}"


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """Ray Tune's trainable: train the trial `config` ({dotted key: value}) on Ray Train, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from flows.errors import UserError
    from flows.registry import mlflow_client
    from flows.registry.tracking import start_pipeline_run
    from flows.sweep.spec import trial_config
    from flows.train import train_model

    ctx = TrialContext.model_validate(context)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ctx.base, config)
    run_name = f"{ctx.sweep}-{trial_id}"
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_name": run_name})})
    client = mlflow_client(ctx.tracking_uri)
    if (done := _completed(client, cfg, trial_key(ctx.sweep, trial_id))) is not None:
        tune.report(done)  # trained before (the sweep's last snapshot predates it): its result, run untouched
        return
    run_id = start_pipeline_run(
        cfg, ctx.tracking_uri, flow_run_id=trial_key(ctx.sweep, trial_id), key_tag=KEY_TAG,
        run_name=trial_label(trial_id, config, ctx.keys), ray_run_name=run_name,
        tags={"mlflow.parentRunId": ctx.parent_run_id, "sweep.name": ctx.sweep, "sweep.trial_id": trial_id})
    try:
        trained = train_model(cfg, ctx.data, run_name=run_name, tracking_uri=ctx.tracking_uri, mlflow_run_id=run_id,
                              fault=ctx.fault, callbacks=[TuneReportCallback()], progress=False)  # printed per trial
    except UserError as err:  # diverged, or a combination of values no model can have: this trial only
        client.set_tag(run_id, OUTCOME, FAILED)
        client.set_tag(run_id, ERROR, str(err)[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_tag(run_id, RESULT, trained.model_dump_json())
    client.set_tag(run_id, OUTCOME, COMPLETED)
    client.set_terminated(run_id, "FINISHED")


def _completed(client, cfg: PipelineConfig, key: str) -> dict[str, float] | None:
    """The final metrics of the trial run `key` if it completed, else None (the run is not touched)."""
    from flows.registry.tracking import _find_run

    exp = client.get_experiment_by_name(cfg.registry.experiment)
    run = _find_run(client, exp.experiment_id, key, KEY_TAG) if exp is not None else None
    if run is None or run.data.tags.get(OUTCOME) != COMPLETED:
        return None
    return json.loads(run.data.tags[RESULT])["metrics"]
