"""The Prefect flow: prepare_dataset -> train_model -> evaluate_model -> register_model.

Each stage is its own task with its own retries (exponential backoff with jitter); a task that failed
on bad user input is not retried. The flow body only wires results from task to task. The MLflow run
of this flow run is found or created by every task from the flow-run id, so retries never duplicate it.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows.config import PipelineConfig
from flows.data import PreparedData
from flows.errors import is_user_error
from flows.evaluate import EvalResult
from flows.registry import Registration
from flows.train import TrainResult


def _retry_unless_user_error(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, BaseException) and is_user_error(exc))


_RETRY = dict(retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
              retry_condition_fn=_retry_unless_user_error)


def _flow_run_id() -> str:
    return str(flow_run.id or "local")


def _mlflow_run(cfg: PipelineConfig) -> tuple[str, str]:
    """(tracking URI, MLflow run id) of the current flow run."""
    from flows.registry import start_pipeline_run

    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        cfg.workdir_path.mkdir(parents=True, exist_ok=True)
    run_id = start_pipeline_run(cfg, uri, flow_run_id=_flow_run_id(), run_name=flow_run.name or "pipeline",
                                tags={"prefect.flow_run_name": str(flow_run.name)})
    return uri, run_id


@task(name="prepare_dataset", retries=2, **_RETRY)
def prepare_dataset_task(cfg: PipelineConfig) -> PreparedData:
    """Tokenize the corpus into train/val token arrays (reused when the fingerprint matches)."""
    from flows.data import prepare_dataset

    return prepare_dataset(cfg)


@task(name="train_model", retries=2, **_RETRY)
def train_model_task(cfg: PipelineConfig, data: PreparedData) -> TrainResult:
    """Train on Ray; a retry resumes the same Ray Train run from its last checkpoint."""
    import ray

    from flows.train import ensure_ray, fault_from_env, train_model

    uri, run_id = _mlflow_run(cfg)
    run_name = cfg.train.run_name or f"train-{_flow_run_id()}"
    started = ensure_ray(cfg)
    try:
        return train_model(cfg, data, run_name=run_name, tracking_uri=uri, mlflow_run_id=run_id,
                           fault=fault_from_env())
    finally:
        if started:
            ray.shutdown()


@task(name="evaluate_model", retries=2, **_RETRY)
def evaluate_model_task(cfg: PipelineConfig, data: PreparedData, trained: TrainResult) -> EvalResult:
    """Validation loss, perplexity, bits per byte and samples, logged to the flow's MLflow run."""
    from flows.evaluate import evaluate_pack
    from flows.modelpack import load_model_pack, export_model_pack
    from flows.registry import log_evaluation
    import tempfile

    uri, run_id = _mlflow_run(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load_model_pack(export_model_pack(trained.checkpoint_path, data.path, tmp))
        result = evaluate_pack(model, tokenizer, data, cfg)
    log_evaluation(uri, run_id, result)
    return result


@task(name="register_model", retries=3, **_RETRY)
def register_model_task(cfg: PipelineConfig, data: PreparedData, trained: TrainResult,
                        result: EvalResult) -> Registration:
    """Register the pyfunc model once per run and move the challenger/champion aliases."""
    from flows.registry import register_model

    uri, run_id = _mlflow_run(cfg)
    return register_model(cfg, uri, run_id, checkpoint_path=trained.checkpoint_path, data=data, result=result)


@flow(name="attention-pipeline", log_prints=True)
def training_pipeline_flow(config: PipelineConfig = PipelineConfig()) -> Registration:
    """Prepare data, train on Ray, evaluate, and register the model in MLflow."""
    data = prepare_dataset_task(config)
    trained = train_model_task(config, data)
    result = evaluate_model_task(config, data, trained)
    return register_model_task(config, data, trained, result)
