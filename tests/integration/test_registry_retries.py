"""Registration retried after a failure at each of its steps, a champion whose artifacts are gone, and
URI credentials kept out of what is logged and published: real MLflow (SQLite), real Prefect (the test
harness, with its real task retries), tiny random models, no Ray.

A failure is injected through the register task's `on_step` hook, which the registration calls right
after each step it really did (not one an earlier attempt did): the hook raises the first time it sees
its point, Prefect retries the task, and the retry must end with one version, one decision and one
champion, with no creating step done twice.
"""

from __future__ import annotations

import math
import shutil
import uuid
from pathlib import Path

import pytest

from flows.evaluate import EvalResult
from flows.registry import CHAMPION, champion_gate, log_model_version, mlflow_client, start_pipeline_run
from flows.registry.gate import ALIASES_MOVED, CHAMPION_MOVED, DECISION_RECORDED
from flows.registry.versions import MODEL_LOGGED, VERSION_CREATED

pytestmark = pytest.mark.integration

CORPUS = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120))
POINTS = [MODEL_LOGGED, VERSION_CREATED, DECISION_RECORDED, CHAMPION_MOVED, ALIASES_MOVED]
CREATING = [MODEL_LOGGED, VERSION_CREATED, DECISION_RECORDED]  # each must happen exactly once


def claimed(bpb: float) -> EvalResult:
    """The challenger's own evaluation, as the evaluate task would have reported it."""
    return EvalResult(val_loss=bpb, perplexity=math.exp(bpb), bits_per_byte=bpb, tokens=160, bytes=160,
                      windows=10, block_size=16, samples=[])


def register(cfg, uri, data, checkpoint, result):
    """One whole registration outside Prefect (an earlier pipeline's)."""
    run_id = start_pipeline_run(cfg, uri, flow_run_id=str(uuid.uuid4()), run_name="earlier")
    version = log_model_version(cfg, uri, run_id, checkpoint_path=str(checkpoint), data=data, result=result)
    return champion_gate(cfg, uri, version, data=data, result=result)


def champions(client, name) -> list[int]:
    return sorted(int(v.version) for v in client.search_model_versions()
                  if v.name == name and CHAMPION in client.get_model_version(name, v.version).aliases)


def versions_of(client, name) -> list:
    return [v for v in client.search_model_versions() if v.name == name]


@pytest.fixture(scope="module")
def one_model(prepared_corpus, tiny_checkpoint):
    """(cfg, data) of one registered model whose champion (v1) each retried registration must replace;
    its name holds both quote marks, so no search filter can name it."""
    cfg, data = prepared_corpus(CORPUS)
    cfg.registry.model_name = "o'brien's \"model\""
    register(cfg, cfg.tracking_uri(), data, tiny_checkpoint(data.vocab_size, seed=1), claimed(9.0))
    return cfg, data


@pytest.mark.parametrize("point", POINTS)
def test_a_retry_after_a_failure_at_each_step_ends_with_one_version_decision_and_champion(
        point, one_model, prefect_harness, tiny_checkpoint):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import register_model_task
    from flows.train import TrainResult

    cfg, data = one_model
    name, uri = cfg.registry.model_name, cfg.tracking_uri()
    client = mlflow_client(uri)
    before = int(client.get_model_version_by_alias(name, CHAMPION).version)
    checkpoint = tiny_checkpoint(data.vocab_size, seed=10 + POINTS.index(point))
    trained = TrainResult(checkpoint_path=str(checkpoint), run_name="t", storage_path=str(checkpoint.parent),
                          metrics={})
    seen: list[str] = []

    def fail_once_at(step: str) -> None:
        seen.append(step)
        if step == point and seen.count(step) == 1:
            raise ConnectionError(f"injected failure after {step!r}")

    @flow(name="register-retried")
    def register_flow():
        task = register_model_task.with_options(retry_delay_seconds=0)
        return task(cfg, data, trained, claimed(0.0), on_step=fail_once_at)  # beats any random model

    state = register_flow(return_state=True)
    reg = state.result()

    assert seen.count(point) == (1 if point in CREATING else 2), seen  # an alias is moved again, idempotently
    assert {step: seen.count(step) for step in CREATING} == dict.fromkeys(CREATING, 1), seen
    assert (int(reg.version), reg.champion, reg.champion_version) == (before + 1, True, before)
    assert reg.method == "re-evaluated champion on the same validation split"
    assert sorted(int(v.version) for v in versions_of(client, name)) == list(range(1, before + 2))
    assert [int(v.version) for v in client.search_model_versions(f"run_id = '{reg.run_id}'")] == [before + 1]
    run = client.get_run(reg.run_id)
    logged = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{reg.run_id}'")
    assert len(logged) == 1
    tags = client.get_model_version(name, reg.version).tags
    assert (tags["gate.decision"], tags["gate.champion_version"]) == ("promoted", str(before))
    assert run.data.tags["gate.decision"] == "promoted"
    assert champions(client, name) == [before + 1]
    assert int(client.get_model_version_by_alias(name, "challenger").version) == before + 1
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert [t.run_count for t in runs] == [2]  # Prefect retried it once


@pytest.mark.parametrize("name", ["o'brien", 'say "hi"', "both ' and \""])
def test_a_name_with_quotes_registers_once_across_retries(name, prepared_corpus, tiny_checkpoint):
    """The search that finds an earlier attempt's version used to put the name in a filter: a `'`
    made it unparsable, the error was swallowed, and each retry registered another version."""
    from flows.registry import resolve_model_uri

    cfg, data = prepared_corpus(CORPUS)
    cfg.registry.model_name = name
    uri, client = cfg.tracking_uri(), mlflow_client(cfg.tracking_uri())
    checkpoint = tiny_checkpoint(data.vocab_size, seed=20)
    run_id = start_pipeline_run(cfg, uri, flow_run_id=str(uuid.uuid4()), run_name="quotes")
    first = log_model_version(cfg, uri, run_id, checkpoint_path=str(checkpoint), data=data, result=claimed(2.0))
    again = log_model_version(cfg, uri, run_id, checkpoint_path=str(checkpoint), data=data, result=claimed(2.0))
    assert (first.version, again.version) == (1, 1)
    assert [v.version for v in versions_of(client, name)] == [1]
    assert resolve_model_uri(client, f"models:/{name}/latest") == client.get_model_version_download_uri(name, 1)


def test_a_champion_whose_artifacts_are_gone_is_compared_on_its_recorded_score(prepared_corpus, tiny_checkpoint):
    cfg, data = prepared_corpus(CORPUS)
    cfg.registry.model_name = "gate-champion-gone"
    name, uri = cfg.registry.model_name, cfg.tracking_uri()
    client = mlflow_client(uri)
    register(cfg, uri, data, tiny_checkpoint(data.vocab_size, seed=3), claimed(3.0))
    location = client.get_model_version_download_uri(name, 1)
    shutil.rmtree(Path(location.removeprefix("file://")))  # deleted from the artifact store

    worse = register(cfg, uri, data, tiny_checkpoint(data.vocab_size, seed=4), claimed(3.5))
    gone = "recorded bits per byte (champion v1's model pack is gone from the artifact store)"
    assert (worse.champion, worse.method, worse.champion_bits_per_byte) == (False, gone, 3.0)
    assert client.get_model_version(name, 2).tags["gate.method"] == gone
    assert gone in client.get_model_version(name, 2).description

    better = register(cfg, uri, data, tiny_checkpoint(data.vocab_size, seed=5), claimed(2.5))
    assert (better.champion, better.method, better.champion_version) == (True, gone, 1)
    assert champions(client, name) == [3]
    after = register(cfg, uri, data, tiny_checkpoint(data.vocab_size, seed=6), claimed(99.0))
    assert after.method == "re-evaluated champion on the same validation split"  # v3's pack is there


def test_credentials_in_the_tracking_uri_reach_no_param_tag_or_summary(prefect_harness, prepared_corpus,
                                                                       tiny_checkpoint):
    """The config names a tracking server with credentials; the real store (SQLite) is what is connected
    to, so everything the registration writes can be read back and searched for the secret."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import _publish_summary
    from flows.registry import set_run_tags

    cfg, data = prepared_corpus(CORPUS)
    secret_uri = "http://alice:s3cr3t-pw@mlflow.example:5000"
    cfg.registry.tracking_uri = secret_uri
    cfg.registry.model_name = "masked"
    uri = f"sqlite:///{cfg.workdir_path / 'mlflow.db'}"
    cfg.workdir_path.mkdir(parents=True, exist_ok=True)
    reg = register(cfg, uri, data, tiny_checkpoint(data.vocab_size, seed=7), claimed(2.0))
    lineage = {"ray.storage_path": "s3://AKIAKEY:aws-s3cr3t@bucket/ray", "data.path": str(data.path)}
    set_run_tags(uri, reg.run_id, lineage)

    @flow(name="publish-summary")
    def publish():
        _publish_summary(reg, claimed(2.0), secret_uri, lineage)

    state = publish(return_state=True)
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    run = mlflow_client(uri).get_run(reg.run_id)
    assert run.data.params["registry.tracking_uri"] == "http://***@mlflow.example:5000"
    assert run.data.tags["ray.storage_path"] == "s3://***@bucket/ray"
    summary = next(a.data for a in artifacts if a.key == "pipeline-summary")
    assert "http://***@mlflow.example:5000/#/experiments/" in summary and "s3://***@bucket/ray" in summary
    published = [summary, *(str(a.data) for a in artifacts), *run.data.params.values(), *run.data.tags.values(),
                 *mlflow_client(uri).get_model_version("masked", 1).tags.values()]
    for secret in ("alice", "s3cr3t", "AKIAKEY"):
        assert not any(secret in text for text in published), secret
