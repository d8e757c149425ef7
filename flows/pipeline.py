"""The Prefect flow: prepare_dataset -> train_model -> evaluate_model -> register_model.

Each stage is its own task with its own retries (exponential backoff with jitter); a task that failed
on bad user input is not retried. prepare_dataset is cached across flow runs by the content fingerprint
of its inputs, its result persisted as JSON under <workdir>/prefect-results, so a rerun skips it. The
MLflow run of a flow run is found or created by every task from the flow-run id, the evaluation logs
each thing once, and the registration reuses its model version and recorded champion decision, so a
retry never duplicates anything. Each task runs under its section's `timeout_s` (flows/deadline.py;
train_model's stops the Ray Train run and its workers first). The flow run is named after its dataset,
model size and the main settings that differ from the defaults; the register task publishes a markdown
artifact (`pipeline-summary`) and a link artifact to the MLflow run. The flow body only wires results
from task to task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from prefect import flow, task
from prefect.runtime import deployment, flow_run
from prefect.tasks import exponential_backoff

from flows import timing
from flows.config import PipelineConfig, with_environment
from flows.data import PreparedData, Source
from flows.data.cache import DataFingerprintCache, prepare_options, source_for_run
from flows.deadline import time_limited
from flows.errors import is_user_error
from flows.evaluate import EvalResult
from flows.masking import mask_uri
from flows.naming import MAX_SETTINGS_CHARS, NAMED_SETTINGS, changed_for_name, run_name_for  # noqa: F401 - tests, CLI
from flows.preflight import check_before_run
from flows.registry import Registration
from flows.registry.tracking import log_metrics
from flows.train import FaultInjection, TrainResult, check_cluster, local_checkpoint

SUMMARY_KEY, LINK_KEY = "pipeline-summary", "mlflow-run"


def _retry_unless_user_error(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, BaseException) and is_user_error(exc))


_RETRY = dict(retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
              retry_condition_fn=_retry_unless_user_error)


def _flow_run_id() -> str:
    return str(flow_run.id or "local")


def _ray_run_name(cfg: PipelineConfig) -> str:
    """The Ray Train run: train.run_name, else one per flow run (a retry of the flow run resumes it)."""
    return cfg.train.run_name or f"train-{_flow_run_id()}"


# --------------------------------------------------------------------------------------- naming, lineage
def flow_config(parameters: dict) -> PipelineConfig:
    """The `config` parameter of a flow run as a PipelineConfig (Prefect hands hooks and run-name
    functions the parameters as given: a model or its JSON)."""
    config = parameters.get("config")
    return config if isinstance(config, PipelineConfig) else PipelineConfig.model_validate(config or {})


def _flow_run_name() -> str:
    return run_name_for(flow_config(flow_run.parameters), flow_run.scheduled_start_time)


def _run_tags() -> dict[str, str]:
    """Lineage known when the MLflow run is created: the Prefect flow run, its deployment, git, versions."""
    from flows.registry import git_tags, library_versions

    tags = {"prefect.flow_run_name": str(flow_run.name), "prefect.flow_name": str(flow_run.flow_name)}
    if deployment.id:
        tags.update({"prefect.deployment_id": str(deployment.id), "prefect.deployment_name": str(deployment.name)})
    url = flow_run.ui_url  # "None/flow-runs/..." when no UI URL is configured (a temporary server)
    if url and url.startswith(("http://", "https://")):
        tags["prefect.flow_run_url"] = url
    return {**tags, **git_tags(), **library_versions()}


def _lineage(data: PreparedData, trained: TrainResult) -> dict[str, str]:
    """Lineage known after training: the dataset and the Ray Train run."""
    return {"data.fingerprint": data.fingerprint, "data.tokenizer": data.tokenizer, "data.path": data.path,
            "ray.run_name": trained.run_name, "ray.storage_path": trained.storage_path,
            "ray.checkpoint_path": trained.checkpoint_path}


def _mlflow_run(cfg: PipelineConfig) -> tuple[str, str]:
    """(tracking URI, MLflow run id) of the current flow run."""
    from flows.registry import start_pipeline_run

    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        cfg.workdir_path.mkdir(parents=True, exist_ok=True)
    run_id = start_pipeline_run(cfg, uri, flow_run_id=_flow_run_id(), run_name=flow_run.name or "pipeline",
                                tags=_run_tags(), ray_run_name=_ray_run_name(cfg))
    return uri, run_id


# --------------------------------------------------------------------------------------- the data cache
@task(name="prepare_dataset", retries=2, cache_policy=DataFingerprintCache(), persist_result=True,
      result_serializer="json", **_RETRY)
@time_limited("data")
def prepare_dataset_task(cfg: PipelineConfig, source: Source | None = None) -> PreparedData:
    """Tokenize the corpus into train/val token arrays (reused when the fingerprint matches)."""
    from flows.data import prepare_dataset

    print(f"prepare_dataset: {cfg.data.source}, {cfg.data.tokenizer} tokenizer")
    return prepare_dataset(cfg, source)


def _prepare_dataset_cached(cfg: PipelineConfig, **call):
    """prepare_dataset_task on data.source resolved and hashed once, for its cache key and the prep alike."""
    timing.close_stage("flow_start", _flow_run_id())
    with timing.holding("prep", _flow_run_id()):  # logged with the MLflow run (train_model)
        source = source_for_run(cfg)
        return prepare_dataset_task.with_options(**prepare_options(cfg, source))(cfg, source, **call)


@task(name="train_model", retries=2, **_RETRY)
@time_limited("train")
def train_model_task(cfg: PipelineConfig, data: PreparedData, fault: FaultInjection | None = None) -> TrainResult:
    """Train on Ray; a retry resumes the same Ray Train run from its last checkpoint."""
    from flows.train import ensure_ray, stop_ray, train_model

    clock = timing.StageClock()
    with clock.stage("mlflow_run"):
        uri, run_id = _mlflow_run(cfg)
    log_metrics(uri, run_id, {**timing.take_held(_flow_run_id()), **clock.metrics()})
    run_name = _ray_run_name(cfg)
    print(f"train_model: {cfg.train.max_steps} step(s) on {cfg.train.num_workers} Ray worker(s), run {run_name}")
    with clock.stage("ray_start"):
        started = ensure_ray(cfg)
    log_metrics(uri, run_id, clock.metrics(["ray_start"]))
    _import_in_background("flows.figures")  # matplotlib, for evaluate_model: this process waits for Ray now
    try:
        trained = train_model(cfg, data, run_name=run_name, tracking_uri=uri, mlflow_run_id=run_id,
                              fault=fault)
    except BaseException:
        if started:
            stop_ray()  # before a retry starts another
        raise
    log_metrics(uri, run_id, {timing.PREFIX + k: v for k, v in trained.stage_seconds.items()})
    if started:  # stopped while the model is evaluated: nothing after training needs Ray
        stop_ray(in_background=True, on_stopped=lambda s: log_metrics(uri, run_id, {timing.PREFIX + "ray_stop": s}))
    return trained


@task(name="evaluate_model", retries=2, **_RETRY)
@time_limited("eval")
def evaluate_model_task(cfg: PipelineConfig, data: PreparedData, trained: TrainResult,
                        mlflow_run_id: str | None = None) -> EvalResult:
    """Validation loss, perplexity, bits per byte, samples and figures, logged once to the flow's MLflow run
    (or to `mlflow_run_id`: a sweep's best trial)."""
    from flows.evaluate import evaluate_checkpoint
    from flows.registry import log_evaluation, set_run_tags
    from flows.registry.tracking import log_dataset_input

    print("evaluate_model: validation loss, bits per byte, samples")
    uri, run_id = (cfg.tracking_uri(), mlflow_run_id) if mlflow_run_id else _mlflow_run(cfg)
    set_run_tags(uri, run_id, _lineage(data, trained))
    log_dataset_input(uri, run_id, data, cfg.data.source)
    clock = timing.StageClock()
    with local_checkpoint(trained) as checkpoint:  # downloaded when storage_path is an object store
        result, attention = evaluate_checkpoint(checkpoint, data, cfg, clock, run_name=str(flow_run.name or ""))
    with clock.stage("figures"):
        log_evaluation(uri, run_id, result, figures={"attention_heatmaps.png": attention})
    log_metrics(uri, run_id, clock.metrics())
    print(f"evaluate_model: val loss {result.val_loss:.4f}, bits per byte {result.bits_per_byte:.4f}")
    return result


def _publish_summary(reg: Registration, result: EvalResult, tracking_uri: str, lineage: dict[str, str],
                     stages: dict[str, float] | None = None) -> None:
    """The flow run's summary and link artifacts; `stages`: seconds per stage (timing.stage_seconds)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    from flows.registry import run_url, summary_markdown

    url = run_url(tracking_uri, reg.experiment_id, reg.run_id)
    create_markdown_artifact(key=SUMMARY_KEY, markdown=summary_markdown(reg, result, url=url, lineage=lineage,
                                                                        stages=stages),
                             description=f"{reg.model_name} v{reg.version}: {reg.decision}")
    create_link_artifact(key=LINK_KEY, link=url, link_text=f"MLflow run {reg.run_id}",
                         description=f"the MLflow run of flow run {flow_run.name}")


@task(name="register_model", retries=3, **_RETRY)
@time_limited("registry")
def register_model_task(cfg: PipelineConfig, data: PreparedData, trained: TrainResult,
                        result: EvalResult, on_step: Callable[[str], None] | None = None,
                        mlflow_run_id: str | None = None, version_tags: dict[str, str] | None = None) -> Registration:
    """Log and register the pyfunc once per run, run the champion gate, publish the run's summary
    (`on_step(point)` after each registration step: fault tests only; `mlflow_run_id`: the run to register
    from, a sweep's best trial, whose lineage `version_tags` adds to the version)."""
    from flows.registry import log_model_version, mlflow_client
    from flows.registry.card import publish_model_card
    from flows.registry.gate import gate_exclusively

    print(f"register_model: {cfg.registry.model_name}, champion gate")
    uri, run_id = (cfg.tracking_uri(), mlflow_run_id) if mlflow_run_id else _mlflow_run(cfg)
    clock = timing.StageClock()
    with clock.stage("model_logging"), local_checkpoint(trained) as checkpoint:
        version = log_model_version(cfg, uri, run_id, checkpoint_path=checkpoint, data=data, result=result,
                                    on_step=on_step, extra_tags=version_tags)
    with clock.stage("gate"):
        reg = gate_exclusively(cfg, uri, version, data=data, result=result, on_step=on_step)  # one at a time
        publish_model_card(uri, reg, result, data)  # model_card.md, and its gist as the version's description
    log_metrics(uri, run_id, clock.metrics())
    stages = timing.stage_seconds(mlflow_client(uri).get_run(run_id).data.metrics)  # every stage's, so far
    _publish_summary(reg, result, uri, _lineage(data, trained), stages)
    print(f"register_model: version {reg.version}, {reg.decision}")
    return reg


def _import_in_background(*modules: str) -> None:
    """Import modules a later task needs in a thread, while this one waits on other processes."""
    import importlib
    import threading

    threading.Thread(target=lambda: [importlib.import_module(m) for m in modules], name="import-ahead",
                     daemon=True).start()


def _close_mlflow_run(status: str):
    """A flow hook: the flow run's end ends its MLflow run (FINISHED, FAILED, KILLED), never RUNNING forever."""

    def hook(flow, flow_run_, state) -> None:
        from flows.registry import close_pipeline_run

        cfg = with_environment(flow_config(flow_run_.parameters))  # as the flow saw it
        try:
            close_pipeline_run(cfg, cfg.tracking_uri(), flow_run_id=str(flow_run_.id), status=status)
        except Exception as exc:  # noqa: BLE001 - a hook must not mask the flow's own failure
            print(mask_uri(f"could not mark the MLflow run {status}: {exc}"))

    return hook


@flow(name="attention-pipeline", flow_run_name=_flow_run_name, log_prints=True,
      on_completion=[_close_mlflow_run("FINISHED")], on_failure=[_close_mlflow_run("FAILED")],
      on_crashed=[_close_mlflow_run("FAILED")], on_cancellation=[_close_mlflow_run("KILLED")])
def training_pipeline_flow(config: PipelineConfig = PipelineConfig(),
                           fault: FaultInjection | None = None) -> Registration:
    """Prepare data, train on Ray, evaluate, and register the model in MLflow (`fault`: recovery tests only)."""
    config = with_environment(config)  # the flow's entry: MLFLOW_TRACKING_URI, RAY_ADDRESS where it runs
    check_before_run(config)  # served and deployed runs too (flows/preflight.py)
    check_cluster(config)  # a joined Ray cluster: workers it can never place, before the data stage
    data = _prepare_dataset_cached(config)
    trained = train_model_task(config, data, fault)
    result = evaluate_model_task(config, data, trained)
    return register_model_task(config, data, trained, result)


# --------------------------------------------------------------------------------------- serving
PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def nightly_deployment(path: Path = PREFECT_YAML) -> dict:
    """{'cron', 'timezone', 'config'} of the `nightly` deployment in prefect.yaml, the one place they live."""
    import yaml

    from flows.errors import UserError

    if not path.is_file():
        raise UserError(f"{path} not found: `flows serve` reads the nightly schedule from the project's "
                        "prefect.yaml; pass --cron, --timezone and --config to serve without it")
    spec = next(d for d in yaml.safe_load(path.read_text())["deployments"] if d["name"] == "nightly")
    schedule = spec["schedules"][0]
    return {"cron": schedule["cron"], "timezone": schedule["timezone"], "config": spec["parameters"]["config"]}


def serve_nightly(cfg: PipelineConfig, *, cron: str, timezone: str, name: str = "nightly") -> None:
    """Serve training_pipeline_flow on a cron schedule from this process (no work pool, no worker)."""
    from zoneinfo import ZoneInfo

    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.errors import UserError

    try:
        ZoneInfo(timezone)  # Prefect accepts any string here and fails later, at scheduling time
        schedule = Cron(cron, timezone=timezone)
    except (ValueError, KeyError) as err:
        raise UserError(f"serve: invalid schedule (cron {cron!r}, time zone {timezone!r}): {err}") from None
    training_pipeline_flow.serve(
        name=name, schedules=[schedule], parameters={"config": cfg.model_dump(mode="json")},
        tags=["attention-pipeline", name], description="The training pipeline on a schedule, served by "
        "`python -m flows serve`.", entrypoint_type=EntrypointType.MODULE_PATH)
