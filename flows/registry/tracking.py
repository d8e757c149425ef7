"""The pipeline's MLflow run: found by its flow-run id, its params, tags and lineage, the evaluation logged once.

One MLflow run per Prefect flow run, found again by the `prefect.flow_run_id` tag, so a retried task
never creates a second run. A run records the process that drives it, and a new run closes the runs that
dead drivers left RUNNING, or refuses to train a Ray Train run a live driver is training (drivers.py). Everything here goes through an `MlflowClient` built for an explicit
tracking URI (`mlflow_client`): nothing reads or changes MLflow's process-wide tracking URI, so two
pipelines in one process (a test session, a notebook) never write to each other's store.
"""

from __future__ import annotations

import functools
import json
import platform
import re
import subprocess
import time
from pathlib import Path

from flows.config import PipelineConfig
from flows.evaluate import EvalResult
from flows.masking import mask_uri, mask_values
from flows.registry.drivers import DRIVER_TAG, RAY_RUN_TAG, close_stale_runs, driver_record
from flows.registry.ui_view import install_view, view_tag

FLOW_RUN_TAG = "prefect.flow_run_id"
SAMPLES_TABLE = "samples.json"
NUM_PARAMS = "model.num_params"  # the model's size as nanoGPT counts it (flows/evaluate.py)
# The MLflow UI opens an experiment of this kind in its model-training view (runs, charts, models), not
# in the GenAI view (traces, judges, prompts) that MLflow 3 shows by default.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


SQLITE_BUSY_TIMEOUT_S = 120  # how long a SQLite write waits for another process's (pysqlite's default: 5 s)


def mlflow_client(tracking_uri: str):
    """A client of tracking_uri for both runs and the model registry (one store holds both)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        tracking_uri = _shared_sqlite_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def filter_literal(value: str, *, double_quotes: bool = True) -> str | None:
    """value as a string literal of MLflow's search-filter grammar, or None when it cannot be one.

    The grammar has no escapes: a value is read verbatim from between single quotes, or double quotes
    (runs and model versions; logged-model search strips single quotes only), and the SQL lexer under it
    treats a backslash as an escape. So a value holding a backslash, a control character or every quote
    its grammar allows cannot be written; callers then search by a safe key and filter in Python.
    """
    if "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return None
    if "'" not in value:
        return f"'{value}'"
    if double_quotes and '"' not in value:
        return f'"{value}"'
    return None


def quoted(value: str, *, double_quotes: bool = True) -> str:
    """filter_literal of a value that is always expressible (an id MLflow or Prefect made); else a bug."""
    literal = filter_literal(value, double_quotes=double_quotes)
    if literal is None:
        raise ValueError(f"{value!r} cannot be written in an MLflow search filter")
    return literal


def does_not_exist(err: Exception) -> bool:
    """Whether an MLflow error says the thing asked for does not exist (any other error is real)."""
    return getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


@functools.cache
def _shared_sqlite_store(tracking_uri: str) -> str:
    """tracking_uri opened so that pipelines in several processes can share it: its tables created or
    migrated under a file lock beside the database (MLflow's own first-use migration races: "table
    latest_metrics already exists"), and writes that wait for another process's rather than failing
    with "database is locked" after pysqlite's 5 s."""
    from mlflow.tracking import MlflowClient

    from flows.registry.lock import file_lock
    from flows.registry.store_template import create_store

    if "?" in tracking_uri:  # the user chose the connection's options
        return tracking_uri
    db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
    store = f"{tracking_uri}?timeout={SQLITE_BUSY_TIMEOUT_S}"
    with file_lock(db.with_name(f"{db.name}.init.lock")):
        if not db.exists():
            create_store(db)  # a copy of an empty store: no migrations to replay (store_template.py)
        MlflowClient(tracking_uri=store).search_experiments(max_results=1)  # MLflow creates or checks the tables
    return store


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"}: nested config sections as MLflow params."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def run_params(cfg: PipelineConfig) -> dict[str, str]:
    """The whole config flattened, less what would mislead: model.vocab_size is unset until the tokenizer
    is known (the evaluation logs the real one), data.vocab_size is only the bpe tokenizer's target."""
    params = flatten(cfg.model_dump(mode="json"))
    params.pop("model.vocab_size", None)
    if cfg.data.tokenizer != "bpe":
        params.pop("data.vocab_size", None)
    return params


def changed_settings(cfg: PipelineConfig) -> dict[str, str]:
    """The config keys whose values differ from the defaults (what tells this run from another)."""
    defaults = flatten(PipelineConfig().model_dump(mode="json"))
    return {k: v for k, v in flatten(cfg.model_dump(mode="json")).items() if defaults.get(k) != v and k != "workdir"}


def run_description(cfg: PipelineConfig) -> str:
    """The run's description in the MLflow UI: what it trains on, and what was set differently."""
    m, t = cfg.model, cfg.train
    changed = ", ".join(f"`{k}={v}`" for k, v in mask_values(changed_settings(cfg)).items()) or "none"
    return mask_uri(f"{m.n_layer}x{m.n_embd} {m.pos}/{m.norm}/{m.mlp} transformer, {t.max_steps} steps at "
                    f"lr {t.lr:g} on `{cfg.data.source}` ({cfg.data.tokenizer} tokenizer).\n\n"
                    f"Settings that differ from the defaults: {changed}.")[:5000]


def created_by() -> dict[str, str]:
    """MLflow's own tags for the UI's "Created by" and "Source" columns."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"mlflow.user": user, "mlflow.source.name": "attention-pipeline (python -m flows)",
            "mlflow.source.type": "LOCAL"}


def log_dataset_input(tracking_uri: str, run_id: str, data, source: str) -> None:
    """The prepared dataset as the run's input (the UI's "Datasets used"), once: name, fingerprint as
    digest, where it came from, and its size."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Param

    client = mlflow_client(tracking_uri)
    client.log_batch(run_id, params=[Param("model.vocab_size", str(data.vocab_size))])  # the tokenizer's real one
    if any(i.dataset.digest == data.fingerprint for i in client.get_run(run_id).inputs.dataset_inputs):
        return
    profile = {"train_tokens": data.train_tokens, "val_tokens": data.val_tokens, "tokenizer": data.tokenizer,
               "vocab_size": data.vocab_size, "train_documents": data.train_documents,
               "val_documents": data.val_documents}
    dataset = Dataset(name=Path(source.rstrip("/")).name or source, digest=data.fingerprint,
                      source_type="hf" if source.startswith("hf:") else "local",
                      source=json.dumps({"uri": mask_uri(source)}), profile=json.dumps(profile))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])


# --------------------------------------------------------------------------------------- lineage
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    tags = {"versions.python": platform.python_version()}
    for pkg in ("attention-pipeline", "torch", "ray", "prefect", "mlflow", "numpy"):
        try:
            tags[f"versions.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    return tags


def git_tags(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The project's git commit (MLflow's own tag, shown in the run page) and whether the tree is dirty."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return {}  # an installed copy inside someone else's repository
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(dirty).lower()}


# --------------------------------------------------------------------------------------- the run
def _local_artifact_location(tracking_uri: str) -> str | None:
    """Beside a SQLite store (<workdir>/mlartifacts) rather than MLflow's default ./mlruns of whatever
    directory the process runs in; a tracking server keeps its own default."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def _find_run(client, experiment_id: str, key: str, key_tag: str = FLOW_RUN_TAG):
    found = client.search_runs([experiment_id], filter_string=f"tags.`{key_tag}` = {quoted(key)}",
                               max_results=1)
    return found[0] if found else None


def _take_over(client, run) -> None:
    """This process drives the flow run's MLflow run now (a retry of the flow run in another process):
    record it, and reopen a run that was closed meanwhile."""
    if run.data.tags.get(DRIVER_TAG) != driver_record():
        client.set_tag(run.info.run_id, DRIVER_TAG, driver_record())
    if run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")


def start_pipeline_run(cfg: PipelineConfig, tracking_uri: str, *, flow_run_id: str, run_name: str,
                       tags: dict[str, str] | None = None, ray_run_name: str | None = None,
                       key_tag: str = FLOW_RUN_TAG) -> str:
    """Return the MLflow run of this flow run, creating it (with params and tags) the first time; a new
    run first closes the runs dead drivers left RUNNING (drivers.py: UserError when a live driver is
    training `ray_run_name`). `key_tag`: the tag that finds the run by `flow_run_id` (a sweep keys its
    runs by the sweep and the trial instead, which outlive a flow run)."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    if exp is None:
        try:
            exp_id = client.create_experiment(cfg.registry.experiment,
                                              artifact_location=_local_artifact_location(tracking_uri),
                                              tags={EXPERIMENT_KIND: MODEL_TRAINING, **dict([view_tag()])})
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp_id = client.get_experiment_by_name(cfg.registry.experiment).experiment_id  # created concurrently
    else:
        exp_id = exp.experiment_id
        install_view(client, exp_id, exp.tags)  # experiments made before the view existed get it too
    if (found := _find_run(client, exp_id, flow_run_id, key_tag)) is not None:
        _take_over(client, found)
        return found.info.run_id
    close_stale_runs(client, exp_id, ray_run_name, closed_by=f"prefect flow run {flow_run_id}")
    own = {key_tag: flow_run_id, DRIVER_TAG: driver_record(), **({RAY_RUN_TAG: ray_run_name} if ray_run_name else {}),
           **created_by(), "mlflow.note.content": run_description(cfg)}
    run = client.create_run(exp_id, run_name=run_name, tags={**own, **mask_values(tags or {})})
    # Params are shown to anyone who can read the experiment: a URI's credentials are masked.
    params = [Param(k, v[:6000]) for k, v in mask_values(run_params(cfg)).items()]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params
        client.log_batch(run.info.run_id, params=params[i: i + 100])
    return run.info.run_id


def close_pipeline_run(cfg: PipelineConfig, tracking_uri: str, *, flow_run_id: str, status: str) -> str | None:
    """Mark the flow run's MLflow run FAILED/FINISHED/KILLED if it exists (never creates one)."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    if exp is None:
        return None
    run = _find_run(client, exp.experiment_id, flow_run_id)
    if run is None:
        return None
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log metrics at one step (at the same step, a retry's later value is the run's value)."""
    from mlflow.entities import Metric

    if metrics:
        ts = int(time.time() * 1000)
        mlflow_client(tracking_uri).log_batch(run_id, metrics=[Metric(k, float(v), ts, step)
                                                               for k, v in metrics.items()])


def set_run_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    mlflow_client(tracking_uri).log_batch(run_id, tags=[RunTag(k, v) for k, v in mask_values(tags).items()])


# --------------------------------------------------------------------------------------- evaluation
def metric_points(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def log_evaluation(tracking_uri: str, run_id: str, result: EvalResult, figures: dict | None = None) -> None:
    """Log the parameter count, metrics, the samples table and figures once: a retry re-logs nothing
    that is there already."""
    from mlflow.entities import Metric, Param, RunTag

    from flows.figures import figure_pixels, loss_curves_figure

    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    if "eval_bits_per_byte" in run.data.metrics:
        return  # the metrics go last, so an earlier attempt logged everything
    if result.num_params is not None and NUM_PARAMS not in run.data.params:  # params are immutable
        client.log_batch(run_id, params=[Param(NUM_PARAMS, str(result.num_params))])
    figures = dict(figures or {})
    run_name = run.info.run_name
    figures["loss_curves.png"] = loss_curves_figure(metric_points(client, run_id, "train_loss"),
                                                    metric_points(client, run_id, "val_loss"),
                                                    title=f"{run_name}: loss (train: sampled batches; val: fixed batches)")
    logged_images = {Path(a.path).name for a in client.list_artifacts(run_id, "images")}
    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"figures/{name}")  # same path on a retry: replaced, not added
        key = Path(name).stem
        # also as an image by key, which the chart view and the compare view show side by side
        # (the compare view's artifact pane skips files in folders); an earlier attempt's stays
        if not any(re.match(rf"{re.escape(key)}[+%]step[+%]", image) for image in logged_images):
            client.log_image(run_id, figure_pixels(fig, rendered=True), key=key, step=0)
    if SAMPLES_TABLE not in {a.path for a in client.list_artifacts(run_id)}:  # log_table appends
        client.log_table(run_id, data={"prompt": [s["prompt"] for s in result.samples],
                                       "completion": [s["completion"] for s in result.samples]},
                         artifact_file=SAMPLES_TABLE)
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in result.metrics().items()],
                     tags=[RunTag(k, v) for k, v in result.tags().items()])
