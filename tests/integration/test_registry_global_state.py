"""The registry leaves MLflow's process-wide state as it found it (real MLflow on SQLite, no Ray, no Prefect).

Registering, gating and `generate` each take an explicit tracking URI. Whatever the process had set
before (nothing, MLFLOW_TRACKING_URI in the environment, or mlflow.set_tracking_uri/set_registry_uri)
must be exactly the same afterwards, and nothing may reach the store that global state points at:
otherwise the next pipeline run in this process (a test session, a notebook) would log elsewhere.
"""

from __future__ import annotations

import os
import uuid

import pytest

from flows.evaluate import EvalResult

pytestmark = pytest.mark.integration

CORPUS = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120))
STATES = ["unset", "environment", "set_tracking_uri"]
ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def result(bpb: float) -> EvalResult:
    return EvalResult(val_loss=bpb, perplexity=2.0, bits_per_byte=bpb, tokens=160, bytes=160, windows=10,
                      block_size=16, samples=[])


def register(cfg, uri, data, checkpoint, claimed: EvalResult):
    from flows.registry import champion_gate, log_model_version, start_pipeline_run

    run_id = start_pipeline_run(cfg, uri, flow_run_id=str(uuid.uuid4()), run_name="global-state")
    version = log_model_version(cfg, uri, run_id, checkpoint_path=str(checkpoint), data=data, result=claimed)
    return champion_gate(cfg, uri, version, data=data, result=claimed)


def mlflow_process_state() -> dict:
    import mlflow

    return {"tracking_uri": mlflow.get_tracking_uri(), "registry_uri": mlflow.get_registry_uri(),
            "tracking_uri_set": mlflow.is_tracking_uri_set(), "active_run": mlflow.active_run(),
            **{key: os.environ.get(key) for key in ENV}}


@pytest.fixture(params=STATES)
def elsewhere(request, tmp_path):
    """Point MLflow's process-wide state at another store, as a user might have; yield that store's file."""
    import mlflow

    saved = {k: os.environ.pop(k, None) for k in ENV}
    db = tmp_path / "elsewhere.db"
    if request.param == "environment":
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    elif request.param == "set_tracking_uri":  # which also writes both variables into os.environ
        mlflow.set_tracking_uri(f"sqlite:///{db}")
        mlflow.set_registry_uri(f"sqlite:///{db}")
    try:
        yield db
    finally:
        if request.param == "set_tracking_uri":  # None is how MLflow's own context manager unsets them
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def registered(store, prepared_corpus, tiny_checkpoint):
    """One champion registered on store: (cfg, data, Registration)."""
    cfg, data = prepared_corpus(CORPUS)
    cfg.registry.model_name = "global-state-generate"
    return cfg, data, register(cfg, store, data, tiny_checkpoint(data.vocab_size, seed=21), result(3.0))


def test_registering_and_gating_leave_mlflow_process_state_alone(store, elsewhere, prepared_corpus,
                                                                  tiny_checkpoint, request):
    cfg, data = prepared_corpus(CORPUS)
    cfg.registry.model_name = f"global-state-{request.node.callspec.id}"
    before = mlflow_process_state()
    first = register(cfg, store, data, tiny_checkpoint(data.vocab_size, seed=22), result(3.0))
    assert mlflow_process_state() == before
    # the second gate re-evaluates the champion: it downloads the champion's model pack
    second = register(cfg, store, data, tiny_checkpoint(data.vocab_size, seed=23), result(-1.0))
    assert mlflow_process_state() == before
    assert (first.version, second.version) == ("1", "2") and second.champion
    assert second.method == "re-evaluated champion on the same validation split"
    assert not elsewhere.exists()  # nothing went to the store the process-wide state names


def test_generate_leaves_mlflow_process_state_alone(store, registered, elsewhere):
    from flows.registry import generate

    cfg, _, _ = registered
    before = mlflow_process_state()
    text = generate(f"models:/{cfg.registry.model_name}@champion", cfg.eval.prompts[0], tracking_uri=store,
                    max_new_tokens=5, seed=1)
    assert isinstance(text, str) and text
    assert mlflow_process_state() == before
    assert not elsewhere.exists()


def test_model_uris_resolve_through_the_given_store(store, registered):
    from flows.registry import mlflow_client, resolve_model_uri

    cfg, _, reg = registered
    client, name = mlflow_client(store), cfg.registry.model_name
    location = client.get_model_version_download_uri(name, reg.version)
    logged = client.get_run(reg.run_id).outputs.model_outputs[0].model_id  # the logged model's id
    for uri in (f"models:/{name}/{reg.version}", f"models:/{name}/latest", f"models:/{name}@champion",
                f"models:/{logged}"):
        assert resolve_model_uri(client, uri) == location, uri
    pack = resolve_model_uri(client, f"models:/{name}@champion/artifacts/model_pack")
    assert pack == f"{location}/artifacts/model_pack"
    assert resolve_model_uri(client, "runs:/abc/model") == "runs:/abc/model"
