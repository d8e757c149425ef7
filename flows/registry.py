"""MLflow: the pipeline's run and its lineage, evaluation logging, model versions and the champion gate.

One MLflow run per flow run, found again by its Prefect flow-run-id tag, so a retried task never
creates a second run; a model version is found again by its run id, so a retried registration never
creates a second version, and a champion decision recorded on a version is reused by a retry. The
gate compares the challenger with the current champion on the same validation windows when both use
the same tokenizer (re-evaluating the champion), else on their recorded bits per byte, and moves the
`champion` alias in one call, so there is never more than one champion. The caller serialises gates
of one registered model (a Prefect concurrency limit, see flows/pipeline.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from flows.config import PipelineConfig
from flows.data import PreparedData
from flows.evaluate import EvalResult

FLOW_RUN_TAG = "prefect.flow_run_id"
CHAMPION, CHALLENGER = "champion", "challenger"
TOKENIZER_DIGEST = "tokenizer.sha256"
EVAL_BPB = "eval.bits_per_byte"
GATE = "gate."  # prefix of the champion decision's tags on a model version and on its run
SAMPLES_TABLE = "samples.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class GateDecision(BaseModel):
    """The champion/challenger comparison recorded on the challenger's model version."""

    promote: bool
    method: str
    challenger_bits_per_byte: float
    champion_version: int | None = None
    champion_bits_per_byte: float | None = None
    challenger_val_loss: float | None = None
    champion_val_loss: float | None = None
    min_improvement: float = 0.0

    @property
    def decision(self) -> str:
        return "promoted" if self.promote else "kept champion"

    def tags(self) -> dict[str, str]:
        out = {f"{GATE}{k}": str(v) for k, v in self.model_dump().items() if k != "promote" and v is not None}
        out[f"{GATE}decision"] = self.decision  # written last: its presence marks a complete record
        return out

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "GateDecision | None":
        if f"{GATE}decision" not in tags:
            return None
        values = {k[len(GATE):]: v for k, v in tags.items() if k.startswith(GATE)}
        values.pop("decision")
        return cls(promote=tags[f"{GATE}decision"] == "promoted", **values)


class Registration(BaseModel):
    model_name: str
    version: str
    model_uri: str
    champion: bool
    decision: str
    method: str
    challenger_bits_per_byte: float
    champion_bits_per_byte: float | None = None
    champion_version: int | None = None
    run_id: str
    experiment_id: str


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


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


def start_pipeline_run(cfg: PipelineConfig, tracking_uri: str, *, flow_run_id: str, run_name: str,
                       tags: dict[str, str] | None = None) -> str:
    """Return the MLflow run of this flow run, creating it (with params and tags) the first time."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    if exp is None:
        try:
            exp_id = client.create_experiment(cfg.registry.experiment,
                                              artifact_location=_local_artifact_location(tracking_uri))
        except MlflowException:  # created concurrently
            exp_id = client.get_experiment_by_name(cfg.registry.experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    found = client.search_runs([exp_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={FLOW_RUN_TAG: flow_run_id, **(tags or {})})
    params = [Param(k, v[:6000]) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i: i + 100])
    return run.info.run_id


def close_pipeline_run(cfg: PipelineConfig, tracking_uri: str, *, flow_run_id: str, status: str) -> str | None:
    """Mark the flow run's MLflow run FAILED/FINISHED/KILLED if it exists (never creates one)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'",
                               max_results=1)
    if not found:
        return None
    run_id = found[0].info.run_id
    client.set_terminated(run_id, status=status)
    return run_id


def _local_artifact_location(tracking_uri: str) -> str | None:
    """Beside a SQLite store (<workdir>/mlartifacts) rather than MLflow's default ./mlruns of whatever
    directory the process runs in; a tracking server keeps its own default."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def set_run_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    _client(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server's, else the `mlflow ui` the CLI suggests."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


# --------------------------------------------------------------------------------------- evaluation
def metric_points(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def log_evaluation(tracking_uri: str, run_id: str, result: EvalResult, figures: dict | None = None) -> None:
    """Log metrics, the samples table and figures once: a retry re-logs nothing that is there already."""
    from mlflow.entities import Metric

    from flows.figures import loss_curves_figure

    client = _client(tracking_uri)
    if "eval_bits_per_byte" in client.get_run(run_id).data.metrics:
        return  # the metrics go last, so an earlier attempt logged everything
    figures = dict(figures or {})
    figures["loss_curves.png"] = loss_curves_figure(metric_points(client, run_id, "train_loss"),
                                                    metric_points(client, run_id, "val_loss"),
                                                    title="loss (train: sampled batches; val: fixed batches)")
    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"figures/{name}")  # same path on a retry: replaced, not added
    if SAMPLES_TABLE not in {a.path for a in client.list_artifacts(run_id)}:  # log_table appends
        client.log_table(run_id, data={"prompt": [s["prompt"] for s in result.samples],
                                       "completion": [s["completion"] for s in result.samples]},
                         artifact_file=SAMPLES_TABLE)
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in result.metrics().items()])


# --------------------------------------------------------------------------------------- versions
def tokenizer_digest(data: PreparedData) -> str:
    return hashlib.sha256((Path(data.path) / "tokenizer.json").read_bytes()).hexdigest()


def _existing_version(client, name: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _logged_model_id(client, run_id: str) -> str | None:
    """The id of a model an earlier attempt logged to this run and finished uploading."""
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    try:
        found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                            filter_string=f"source_run_id = '{run_id}' AND name = 'model'")
    except Exception:  # noqa: BLE001 - an old server without logged-model search: log again
        return None
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0].model_id if ready else None


@contextmanager
def _fluent_tracking_uri(uri: str):
    """Point MLflow's fluent API (which log_model needs) at uri for a block, then put everything back.

    mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ; left there, it would send
    every later pipeline run of this process (a test session, a notebook) to this run's store.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_global, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_global)  # None unsets the variable, so restore it after
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def log_model_version(cfg: PipelineConfig, tracking_uri: str, run_id: str, *, checkpoint_path: str,
                      data: PreparedData, result: EvalResult):
    """The model version of this run: logged as a pyfunc and registered the first time only."""
    import mlflow

    from flows.mlflow_model import log_pyfunc
    from flows.modelpack import export_model_pack

    client = _client(tracking_uri)
    name = cfg.registry.model_name
    version = _existing_version(client, name, run_id)
    if version is not None:
        return version
    tags = {"data.fingerprint": data.fingerprint, "data.tokenizer": data.tokenizer,
            TOKENIZER_DIGEST: tokenizer_digest(data), EVAL_BPB: str(result.bits_per_byte),
            "eval.val_loss": str(result.val_loss), "eval.perplexity": str(result.perplexity),
            "eval.block_size": str(result.block_size)}
    # The registry of a local store resolves a models:/<id> source through the fluent API, too.
    with _fluent_tracking_uri(tracking_uri):
        model_id = _logged_model_id(client, run_id)
        if model_id is None:
            example = cfg.eval.prompts[0] if cfg.eval.prompts else ""
            with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
                pack = export_model_pack(checkpoint_path, data.path, Path(tmp) / "model_pack")
                model_id = log_pyfunc(pack, example).model_id
        _ensure_registered_model(client, name)
        return client.create_model_version(name, f"models:/{model_id}", run_id=run_id, tags=tags,
                                           model_id=model_id)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Self-attention transformer language model "
                                           "trained by attention-pipeline; alias champion is what ships.")
        except MlflowException:
            pass  # created concurrently


def current_champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


# --------------------------------------------------------------------------------------- the gate
def _download_pack(client, tracking_uri: str, name: str, version, dst: Path, device: str = "cpu"):
    """(model, tokenizer) of a registered version, read from its pyfunc's model_pack artifact."""
    import mlflow.artifacts

    from flows.mlflow_model import PACK
    from flows.modelpack import load_model_pack

    with _fluent_tracking_uri(tracking_uri):  # resolving the version's models:/<id> source needs it
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst),
                                                    tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return load_model_pack(Path(local) / "artifacts" / PACK, device=device)


def _recorded_bits_per_byte(client, version) -> float:
    """A version's own bits per byte: its tag, else its run's metric, else infinity (always beaten)."""
    for key in (EVAL_BPB, "bits_per_byte"):  # "bits_per_byte": versions registered before lineage tags
        if key in version.tags:
            return float(version.tags[key])
    metric = client.get_run(version.run_id).data.metrics.get("eval_bits_per_byte") if version.run_id else None
    return float(metric) if metric is not None else math.inf


def _re_evaluate(cfg, client, tracking_uri, name, challenger, champion, data, result):
    """(challenger score, champion score) on the same windows of this run's validation split."""
    from flows.evaluate import eval_device, score_split

    tokens, device = data.tokens("val"), eval_device(cfg)  # the device the challenger was evaluated on
    with tempfile.TemporaryDirectory() as tmp:
        champ_model, tokenizer = _download_pack(client, tracking_uri, name, champion.version, Path(tmp) / "champion",
                                                device)
        block = min(champ_model.config.block_size, result.block_size)  # windows both models can read
        score = dict(block_size=block, batch_size=cfg.eval.batch_size, max_tokens=cfg.eval.max_tokens)
        champ = score_split(champ_model, tokenizer, tokens, **score)
        if block == result.block_size:
            return (result.val_loss, result.bits_per_byte), (champ.val_loss, champ.bits_per_byte)
        chall_model, _ = _download_pack(client, tracking_uri, name, challenger.version, Path(tmp) / "challenger",
                                        device)
        chall = score_split(chall_model, tokenizer, tokens, **score)
        return (chall.val_loss, chall.bits_per_byte), (champ.val_loss, champ.bits_per_byte)


def decide(cfg: PipelineConfig, tracking_uri: str, challenger, champion, *, data: PreparedData,
           result: EvalResult) -> GateDecision:
    """Promote when the challenger's bits per byte beat the champion's by registry.min_improvement."""
    client = _client(tracking_uri)
    margin = cfg.registry.min_improvement
    if champion is None:
        return GateDecision(promote=True, method="no champion", challenger_bits_per_byte=result.bits_per_byte,
                            challenger_val_loss=result.val_loss, min_improvement=margin)
    common = dict(champion_version=int(champion.version), min_improvement=margin)
    if champion.tags.get(TOKENIZER_DIGEST) == challenger.tags.get(TOKENIZER_DIGEST):
        (c_loss, c_bpb), (k_loss, k_bpb) = _re_evaluate(cfg, client, tracking_uri, cfg.registry.model_name,
                                                        challenger, champion, data, result)
        return GateDecision(promote=c_bpb < k_bpb - margin, method="re-evaluated champion on the same validation split",
                            challenger_bits_per_byte=c_bpb, champion_bits_per_byte=k_bpb,
                            challenger_val_loss=c_loss, champion_val_loss=k_loss, **common)
    k_bpb = _recorded_bits_per_byte(client, champion)
    return GateDecision(promote=result.bits_per_byte < k_bpb - margin,
                        method="recorded bits per byte (the tokenizers differ)",
                        challenger_bits_per_byte=result.bits_per_byte, champion_bits_per_byte=k_bpb, **common)


def champion_gate(cfg: PipelineConfig, tracking_uri: str, version, *, data: PreparedData,
                  result: EvalResult) -> Registration:
    """Decide (or reuse this version's recorded decision), record it, then move the aliases.

    A recorded decision stands while the champion it was made against is still the champion (or is
    this version, promoted by an earlier attempt); otherwise it is made again against the new one.
    """
    client = _client(tracking_uri)
    name = cfg.registry.model_name
    version = client.get_model_version(name, version.version)  # fresh tags
    champion = current_champion(client, name)
    champion_now = int(champion.version) if champion is not None else None
    decision = GateDecision.from_tags(version.tags)
    if decision is None or (decision.champion_version != champion_now and champion_now != int(version.version)):
        decision = decide(cfg, tracking_uri, version, champion, data=data, result=result)
        for key, value in decision.tags().items():
            client.set_model_version_tag(name, version.version, key, value)
        set_run_tags(tracking_uri, version.run_id, decision.tags())
        client.update_model_version(name, version.version, description=_describe(decision))
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)  # one update: never two champions
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    run = client.get_run(version.run_id)
    return Registration(model_name=name, version=str(version.version),
                        model_uri=f"models:/{name}/{version.version}", champion=decision.promote,
                        decision=decision.decision, method=decision.method,
                        challenger_bits_per_byte=decision.challenger_bits_per_byte,
                        champion_bits_per_byte=decision.champion_bits_per_byte,
                        champion_version=decision.champion_version, run_id=version.run_id,
                        experiment_id=run.info.experiment_id)


def _describe(d: GateDecision) -> str:
    if d.champion_version is None:
        return f"{d.decision}: no champion before; {d.challenger_bits_per_byte:.4f} bits/byte"
    return (f"{d.decision}: {d.challenger_bits_per_byte:.4f} bits/byte against champion "
            f"v{d.champion_version}'s {d.champion_bits_per_byte:.4f} ({d.method}; "
            f"min improvement {d.min_improvement})")


def summary_markdown(reg: Registration, result: EvalResult, *, url: str, lineage: dict[str, str]) -> str:
    """The Prefect `pipeline-summary` artifact: metrics, the champion comparison, the MLflow run."""
    def num(x: float | None) -> str:
        return "–" if x is None else f"{x:.4f}"

    lines = [f"# {reg.model_name} v{reg.version}: {reg.decision}", "",
             "| metric (validation split) | value |", "|---|---|",
             f"| loss (nats/token) | {num(result.val_loss)} |", f"| perplexity | {num(result.perplexity)} |",
             f"| bits per byte | {num(result.bits_per_byte)} |",
             f"| tokens scored | {result.tokens} ({result.windows} windows of {result.block_size}) |", "",
             "## Champion comparison", "", f"Method: {reg.method}.", "",
             "| | version | bits per byte |", "|---|---|---|",
             f"| challenger | v{reg.version} | {num(reg.challenger_bits_per_byte)} |"]
    if reg.champion_version is not None:
        lines.append(f"| champion before | v{reg.champion_version} | {num(reg.champion_bits_per_byte)} |")
    lines += ["", f"Decision: **{reg.decision}**; `{reg.model_name}@champion` is "
              f"{'now this version' if reg.champion else f'still v{reg.champion_version}'}.", "",
              "## MLflow", "", f"- run: [{reg.run_id}]({url})", f"- model: `{reg.model_uri}`"]
    lines += [f"- {k}: `{v}`" for k, v in lineage.items()]
    return "\n".join(lines) + "\n"
