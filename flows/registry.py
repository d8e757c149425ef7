"""MLflow: the pipeline's run, logging, the pyfunc model and the registry's aliases.

One MLflow run per flow run, found again by its Prefect flow-run-id tag, so a retried task never
creates a second run; a model version is found again by its run id, so a retried registration never
creates a second version. The champion alias moves only when the challenger is better.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pydantic import BaseModel

from flows.config import PipelineConfig
from flows.data import PreparedData
from flows.evaluate import EvalResult

FLOW_RUN_TAG = "prefect.flow_run_id"
CHAMPION, CHALLENGER = "champion", "challenger"
ENTRY = str(Path(__file__).with_name("_pyfunc_entry.py"))


class Registration(BaseModel):
    model_name: str
    version: str
    model_uri: str
    champion: bool
    champion_bits_per_byte: float | None = None


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def start_pipeline_run(cfg: PipelineConfig, tracking_uri: str, *, flow_run_id: str, run_name: str,
                       tags: dict[str, str] | None = None) -> str:
    """Return the MLflow run of this flow run, creating it (with params and tags) the first time."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    if exp is None:
        try:
            exp_id = client.create_experiment(cfg.registry.experiment)
        except MlflowException:  # created concurrently
            exp_id = client.get_experiment_by_name(cfg.registry.experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    found = client.search_runs([exp_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={FLOW_RUN_TAG: flow_run_id, **(tags or {})})
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i: i + 100])
    return run.info.run_id


def log_evaluation(tracking_uri: str, run_id: str, result: EvalResult) -> None:
    import time

    from mlflow.entities import Metric

    client = _client(tracking_uri)
    if "eval_bits_per_byte" in client.get_run(run_id).data.metrics:
        return  # already logged by an earlier attempt of this task
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in result.metrics().items()])
    client.log_table(run_id, data={"prompt": [s["prompt"] for s in result.samples],
                                   "completion": [s["completion"] for s in result.samples]},
                     artifact_file="samples.json")


def _existing_version(client, name: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # a list of prompt strings
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 100), ParamSpec("temperature", "double", 0.8),
                            ParamSpec("top_k", "long", 0), ParamSpec("seed", "long", 0)]),
    )


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "safetensors", "tokenizers", "mlflow", "numpy")]


def register_model(cfg: PipelineConfig, tracking_uri: str, run_id: str, *, checkpoint_path: str,
                   data: PreparedData, result: EvalResult) -> Registration:
    """Log the pyfunc model, register a version (once per run), set challenger/champion aliases."""
    import mlflow

    from flows.modelpack import export_model_pack

    client = _client(tracking_uri)
    name = cfg.registry.model_name
    version = _existing_version(client, name, run_id)
    if version is None:
        with tempfile.TemporaryDirectory() as tmp:
            pack = export_model_pack(checkpoint_path, data.path, Path(tmp) / "model_pack")
            mlflow.set_tracking_uri(tracking_uri)
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=ENTRY, artifacts={"model_pack": str(pack)},
                    signature=_signature(), input_example=["def main():\n"],
                    pip_requirements=_pip_requirements(),
                )
        _ensure_registered_model(client, name)
        version = client.create_model_version(name, info.model_uri, run_id=run_id,
                                              tags={"bits_per_byte": str(result.bits_per_byte)})
    return _apply_aliases(cfg, client, version, result)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:
            pass  # created concurrently


def current_champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _apply_aliases(cfg: PipelineConfig, client, version, result: EvalResult) -> Registration:
    name = cfg.registry.model_name
    champion = current_champion(client, name)
    champion_bpb = None
    if champion is not None and champion.version == version.version:
        promote = True
    elif champion is None:
        promote = True
    else:
        champion_bpb = float(champion.tags.get("bits_per_byte", "inf"))
        promote = result.bits_per_byte < champion_bpb - cfg.registry.min_improvement
    client.set_model_version_tag(name, version.version, "champion_bits_per_byte", str(champion_bpb))
    client.set_model_version_tag(name, version.version, "decision", "promoted" if promote else "kept champion")
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return Registration(model_name=name, version=str(version.version),
                        model_uri=f"models:/{name}/{version.version}", champion=promote,
                        champion_bits_per_byte=champion_bpb)
