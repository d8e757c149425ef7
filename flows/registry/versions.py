"""A run's model version: the pyfunc logged as the run's `model`, then registered, each exactly once.

A retried registration finds the version by its run id and the logged model by its source run, so it
never creates a second of either (searched by those ids, never by a name MLflow's filter grammar may not
be able to quote: a name is compared in Python). The model is logged through `MlflowClient` calls only (create the
logged model, save the pyfunc to a temporary directory, upload it, finalize it) and registered with
the logged model as the version's source (`models:/<model id>`, as `mlflow.register_model` records it:
the version page's "Source Model" link; the logged model's `mlflow.modelVersions` tag is its "Model
versions" list and the run's "Registered models"). MLflow's `log_model` needs the process-wide tracking
URI and an active run; a local store (SQLite, PostgreSQL) looks a `models:/<id>` source up through the
process-wide tracking URI too, so against one the version is created by a short child process whose
process-wide URI is this store (a tracking server looks it up in its own store). The version's tags
carry the data lineage and the evaluation the champion gate compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from flows.config import PipelineConfig
from flows.data import PreparedData
from flows.evaluate import EvalResult
from flows.masking import mask_uri
from flows.registry.tracking import does_not_exist, mlflow_client, quoted

MODEL = "model"  # the pyfunc's folder in the logged model's artifacts
# What registration has just done, in order; `on_step(point)` is called right after each one that was
# really done (not found done by an earlier attempt), so a test can fail there and count.
MODEL_LOGGED, VERSION_CREATED = "model logged", "version created"
OnStep = Callable[[str], None]
TOKENIZER_DIGEST = "tokenizer.sha256"
EVAL_BPB = "eval.bits_per_byte"


def tokenizer_digest(data: PreparedData) -> str:
    return hashlib.sha256((Path(data.path) / "tokenizer.json").read_bytes()).hexdigest()


def existing_version(client, name: str, run_id: str):
    """The version an earlier attempt registered from this run, if any."""
    versions = [v for v in client.search_model_versions(f"run_id = {quoted(run_id)}") if v.name == name]
    return min(versions, key=lambda v: int(v.version)) if versions else None


def logged_model_of(client, run_id: str):
    """The model an earlier attempt logged to this run and finished uploading, if any."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    run = client.get_run(run_id)
    try:
        found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                            filter_string=f"source_run_id = {quoted(run_id, double_quotes=False)}")
    except MlflowException as err:
        if err.error_code not in ("ENDPOINT_NOT_FOUND", "NOT_IMPLEMENTED"):
            raise
        return None  # an old server without logged-model search: log again
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0] if ready else None


def _link_step_metrics(client, run_id: str, model_id: str, step: int = 0) -> None:
    """Attach the run's metrics of `step` (the evaluation's) to the logged model, as log_model does,
    so the model's page in the MLflow UI shows them."""
    from mlflow.entities import Metric

    metrics = [Metric(m.key, m.value, m.timestamp, m.step, run_id=run_id, model_id=model_id)
               for key in client.get_run(run_id).data.metrics
               for m in client.get_metric_history(run_id, key) if m.step == step and m.model_id is None]
    for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[i: i + 1000])


def log_pyfunc(client, run_id: str, pack_dir: str | Path, example_prompt: str):
    """Log the pack as the pyfunc logged model `model` of run_id; returns the READY LoggedModel."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from flows.hf_export import HF_DIR, export_pack_hf
    from flows.registry.pyfunc import save_pyfunc

    run = client.get_run(run_id)
    # named after its run, so the experiment's models are told apart (MLflow names them all "model"),
    # less the characters a logged model's name may not hold (a run name's "lr=2.5e-4")
    name = re.sub(r"[/:.%\"']", "_", run.info.run_name or MODEL)
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       params=dict(run.data.params))  # log_model copies them, too
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        _link_step_metrics(client, run_id, model.model_id)
        meta = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                     model_id=model.model_id)
        with tempfile.TemporaryDirectory() as tmp:
            local = save_pyfunc(pack_dir, Path(tmp) / MODEL, example_prompt, mlflow_model=meta)
            hf_tags = export_pack_hf(pack_dir, local / HF_DIR)  # transformers-loadable, beside the pyfunc
            client.log_model_artifacts(model.model_id, str(local))
        client.set_logged_model_tags(model.model_id, hf_tags)
    except Exception:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)  # never found again
        raise
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as err:
        if not does_not_exist(err):
            raise
    try:
        client.create_registered_model(name, description="Self-attention transformer language model "
                                       "trained by attention-pipeline; alias champion is what ships.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise  # else created concurrently


def log_model_version(cfg: PipelineConfig, tracking_uri: str, run_id: str, *, checkpoint_path: str,
                      data: PreparedData, result: EvalResult, on_step: OnStep | None = None,
                      extra_tags: dict[str, str] | None = None):
    """The model version of this run: logged as a pyfunc and registered the first time only (`extra_tags`: more
    of the version's tags, e.g. a sweep's lineage)."""
    on_step = on_step or (lambda point: None)
    from flows.modelpack import export_model_pack

    client = mlflow_client(tracking_uri)
    name = cfg.registry.model_name
    version = existing_version(client, name, run_id)
    if version is not None:
        # a SQL registry keeps no model id, but the source names the model: models:/<id>
        source_model = version.source.removeprefix("models:/") if version.source.startswith("models:/") else None
        if model_id := getattr(version, "model_id", None) or source_model:
            _link_version(client, model_id, version)  # an attempt that failed right after creating it
        return version
    tags = {"data.fingerprint": data.fingerprint, "data.tokenizer": data.tokenizer,
            TOKENIZER_DIGEST: tokenizer_digest(data), EVAL_BPB: str(result.bits_per_byte),
            "eval.val_loss": str(result.val_loss), "eval.perplexity": str(result.perplexity),
            "eval.block_size": str(result.block_size), **(extra_tags or {})}
    creator = _VersionCreator(tracking_uri)  # a local store's child process imports MLflow meanwhile
    try:
        model = logged_model_of(client, run_id)
        if model is None:
            example = result.samples[0]["prompt"] if result.samples else ""
            with tempfile.TemporaryDirectory() as tmp:
                pack = export_model_pack(checkpoint_path, data.path, Path(tmp) / "model_pack")
                model = log_pyfunc(client, run_id, pack, example)
            on_step(MODEL_LOGGED)
        tags.update({k: v for k, v in model.tags.items() if k.startswith("hf.")})
        ensure_registered_model(client, name)
        version = creator.create(client, name, model.model_id, run_id, tags)
    finally:
        creator.close()
    _link_version(client, model.model_id, version)
    on_step(VERSION_CREATED)
    return version


class _VersionCreator:
    """Creates version `name` of a logged model with `models:/<model_id>` as its source. Against a local
    store that takes a child process (see the module's docstring), started when this is made so that its
    imports (seconds) overlap the model's logging; `close` ends it if it was never asked."""

    def __init__(self, tracking_uri: str):
        self.uri, self.child = tracking_uri, None
        if not tracking_uri.startswith(("http://", "https://")):
            env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
            self.child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def create(self, client, name: str, model_id: str, run_id: str, tags: dict[str, str]):
        source = f"models:/{model_id}"
        if self.child is None:
            return client.create_model_version(name, source, run_id=run_id, tags=tags, model_id=model_id)
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import ErrorCode

        request = {"uri": self.uri, "name": name, "source": source, "run_id": run_id, "tags": tags,
                   "model_id": model_id}  # on stdin: the URI may hold credentials, a command line is public
        child, self.child = self.child, None
        try:
            out, err = child.communicate(json.dumps(request), timeout=CHILD_TIMEOUT_S)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        try:
            answer = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            answer = {}
        if "version" in answer:
            return client.get_model_version(name, answer["version"])
        if "error_code" in answer:  # MLflow's own error, raised as if here
            raise MlflowException(answer["message"], error_code=ErrorCode.Value(answer["error_code"]))
        raise RuntimeError(f"creating a version of {name!r} failed: {mask_uri(err[-2000:])}")

    def close(self) -> None:
        if self.child is not None:  # never asked: an empty request, and it leaves
            child, self.child = self.child, None
            try:
                child.communicate("", timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


CHILD_TIMEOUT_S = 300  # MLflow's import, and a SQLite write that may wait for others (tracking.py: 120 s)
_CHILD = "import sys; from flows.registry.versions import _create_version_here; _create_version_here(sys.stdin)"


def _create_version_here(stdin) -> None:
    """In the child process: MLflow's global tracking URI set to the store, the version created, its number printed."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore  # noqa: F401 - while the parent works

    text = stdin.read()  # waits for the parent's request
    if not text.strip():
        return  # not needed after all
    request = json.loads(text)
    mlflow.set_tracking_uri(request["uri"])  # this child's own process-wide state, gone when it exits
    mlflow.set_registry_uri(request["uri"])
    try:
        version = mlflow_client(request["uri"]).create_model_version(
            request["name"], request["source"], run_id=request["run_id"], tags=request["tags"],
            model_id=request["model_id"])
    except MlflowException as err:
        print(json.dumps({"message": err.message, "error_code": err.error_code}))
        raise SystemExit(1) from None
    print(json.dumps({"version": str(version.version)}))


def _link_version(client, model_id: str, version) -> None:
    """List the version on its logged model's page, as MLflow's register_model does (a tracking server
    does it itself when creating the version; a local store does not)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    links = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if (version.name, str(version.version)) not in {(link["name"], str(link["version"])) for link in links}:
        links.append({"name": version.name, "version": version.version})
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})
