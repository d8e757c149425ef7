"""The sweep's Prefect flow: prepare_dataset -> run_trials -> evaluate_model -> register_model.

The same separately retried stages as the pipeline: the data is prepared once for all trials by the
pipeline's cached task; `run_trials` runs (or resumes) the Ray Tune sweep and logs its results to the
sweep's parent MLflow run; the pipeline's own evaluate and register tasks then act on the best completed
trial's run, so exactly one model version comes out of a sweep and the champion gate decides on it. A
retry of `run_trials` restores the Tune experiment, so no finished trial runs again, and the register
task finds the version the best trial's run already has. The parent run is keyed by the sweep's name,
not the flow run: the same command run again (its driver was killed) continues the same sweep.
"""

from __future__ import annotations

from pydantic import BaseModel
from prefect import flow, task
from prefect.runtime import flow_run

from flows.config import PipelineConfig, with_environment
from flows.data import PreparedData
from flows.deadline import time_limit
from flows.pipeline import _RETRY, _prepare_dataset_cached, _run_tags, evaluate_model_task, flow_config, \
    register_model_task
from flows.preflight import check_before_run
from flows.registry import Registration
from flows.sweep.spec import SweepConfig, check_sweep, sweep_name, trial_config
from flows.sweep.trials import KEY_TAG, trial_label
from flows.sweep.tuner import TrialOutcome
from flows.train import check_cluster


class SweepResult(BaseModel):
    name: str
    parent_run_id: str
    trials: list[TrialOutcome]
    best: TrialOutcome


def sweep_params(sweep: SweepConfig) -> dict[str, str]:
    """The sweep's settings as the parent run's params (next to the base config's)."""
    params = {f"sweep.search.{k}": v for k, v in sweep.search.items()}
    params.update({f"sweep.{k}": str(v) for k, v in sweep.model_dump(exclude={"search"}).items() if v is not None})
    return params


def _parent_run(cfg: PipelineConfig, sweep: SweepConfig, name: str) -> tuple[str, str]:
    """(tracking URI, the sweep's parent MLflow run), found by the sweep's name or created."""
    from mlflow.entities import Param

    from flows.registry import mlflow_client, start_pipeline_run

    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        cfg.workdir_path.mkdir(parents=True, exist_ok=True)
    tags = {**_run_tags(), "prefect.flow_run_id": str(flow_run.id or "local"), "sweep.name": name,
            "mlflow.note.content": f"Sweep `{name}`: {sweep.trials} trials of {', '.join(sweep.search)} "
                                   f"({sweep.searcher} search, {sweep.scheduler} scheduler, minimising {sweep.metric})."}
    run_id = start_pipeline_run(cfg, uri, flow_run_id=name, key_tag=KEY_TAG, run_name=name, tags=tags)
    client = mlflow_client(uri)
    logged = client.get_run(run_id).data.params
    new = [Param(k, v[:6000]) for k, v in sweep_params(sweep).items() if k not in logged]
    if new:
        client.log_batch(run_id, params=new)
    return uri, run_id


@task(name="run_trials", retries=1, **_RETRY)
def run_trials_task(cfg: PipelineConfig, sweep: SweepConfig, data: PreparedData) -> SweepResult:
    """Run (or resume) the sweep's trials on Ray Tune; log the results table, figures and summary to its run."""
    from flows.sweep.report import log_sweep_results
    from flows.sweep.tuner import best_trial, run_trials
    from flows.train import ensure_ray, stop_ray

    dims = check_sweep(cfg, sweep)
    name = sweep_name(cfg, sweep)
    uri, parent = _parent_run(cfg, sweep, name)
    print(f"run_trials: sweep {name}, {sweep.trials} trial(s) of {', '.join(sweep.search)}")
    started = ensure_ray(cfg, dashboard=True)  # Ray Train cleans a stopped trial's workers through its state API
    try:
        with time_limit("run_trials", "sweep.timeout_s", sweep.timeout_s):
            trials = run_trials(cfg, sweep, dims, data, name=name, tracking_uri=uri, parent_run_id=parent)
    finally:
        if started:
            stop_ray()
    best = None
    try:
        best = best_trial(trials)
    finally:
        log_sweep_results(cfg, sweep, dims, trials, tracking_uri=uri, parent_run_id=parent, best=best, name=name)
    keys = [d.key for d in dims]
    print(f"run_trials: {len(trials)} trial(s), {sum(t.outcome == 'completed' for t in trials)} completed:")
    for t in trials:
        print(f"  {trial_label(t.trial_id, t.params, keys)}: {t.outcome.replace('_', ' ')} at step {t.steps}, "
              f"{sweep.metric} {'-' if t.metric is None else f'{t.metric:.4f}'}{'  <- best' if t is best else ''}")
    return SweepResult(name=name, parent_run_id=parent, trials=trials, best=best)


def _sweep_config(parameters: dict) -> SweepConfig:
    sweep = parameters.get("sweep")
    return sweep if isinstance(sweep, SweepConfig) else SweepConfig.model_validate(sweep or {})


def _flow_run_name() -> str:
    return sweep_name(flow_config(flow_run.parameters), _sweep_config(flow_run.parameters))


def _close_parent(status: str):
    """A flow hook: the flow run's end ends the sweep's parent run (FINISHED, FAILED, KILLED)."""

    def hook(flow_, flow_run_, state) -> None:
        from flows.masking import mask_uri
        from flows.registry import mlflow_client
        from flows.registry.tracking import _find_run

        cfg = with_environment(flow_config(flow_run_.parameters))
        sw = _sweep_config(flow_run_.parameters)
        try:
            client = mlflow_client(cfg.tracking_uri())
            exp = client.get_experiment_by_name(cfg.registry.experiment)
            run = _find_run(client, exp.experiment_id, sweep_name(cfg, sw), KEY_TAG) if exp else None
            if run is not None:
                client.set_terminated(run.info.run_id, status)
        except Exception as exc:  # noqa: BLE001 - a hook must not mask the flow's own failure
            print(mask_uri(f"could not mark the sweep's MLflow run {status}: {exc}"))

    return hook


@flow(name="attention-sweep", flow_run_name=_flow_run_name, log_prints=True,
      on_completion=[_close_parent("FINISHED")], on_failure=[_close_parent("FAILED")],
      on_crashed=[_close_parent("FAILED")], on_cancellation=[_close_parent("KILLED")])
def sweep_flow(config: PipelineConfig = PipelineConfig(), sweep: SweepConfig = SweepConfig()) -> Registration:
    """Prepare the data once, run the sweep's trials on Ray Tune, evaluate the best and register it."""
    config = with_environment(config)
    check_sweep(config, sweep)  # served and deployed sweeps too: bad specs before anything runs
    check_before_run(config)
    check_cluster(config)
    data = _prepare_dataset_cached(config)
    result = run_trials_task(config, sweep, data)
    best = result.best
    best_cfg = trial_config(config, best.params)
    evaluated = evaluate_model_task(best_cfg, data, best.trained, mlflow_run_id=best.run_id)
    lineage = {"sweep.name": result.name, "sweep.parent_run_id": result.parent_run_id, "sweep.trial_id": best.trial_id}
    return register_model_task(best_cfg, data, best.trained, evaluated, mlflow_run_id=best.run_id,
                               version_tags=lineage)
