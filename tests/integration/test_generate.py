"""The registered pyfunc in a fresh process with pickle loading disabled, and `python -m flows generate`.

A tiny random model is registered on a SQLite MLflow store (no training needed: what matters is that
the model loads without the pipeline's process and samples exactly as the model pack does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CORPUS = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120))


@pytest.fixture(scope="module")
def registered(tmp_path_factory, prepared_corpus, tiny_checkpoint):
    from flows.evaluate import EvalResult
    from flows.registry import champion_gate, log_model_version, start_pipeline_run

    cfg, data = prepared_corpus(CORPUS)
    cfg.registry.model_name = "generate-test"
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    checkpoint = tiny_checkpoint(data.vocab_size, seed=3)
    result = EvalResult(val_loss=3.0, perplexity=20.0, bits_per_byte=4.3, tokens=1, bytes=1, windows=1,
                        block_size=16, samples=[])
    run_id = start_pipeline_run(cfg, uri, flow_run_id=str(uuid.uuid4()), run_name="generate-test")
    version = log_model_version(cfg, uri, run_id, checkpoint_path=str(checkpoint), data=data, result=result)
    champion_gate(cfg, uri, version, data=data, result=result)
    return uri, cfg, data, checkpoint


def generate_cli(uri: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m flows generate` in a fresh process that may not unpickle anything."""
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "flows", "generate", *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(uri.removeprefix("sqlite:///")).parent)


def test_the_logged_model_holds_no_pickle(registered, tmp_path, monkeypatch):
    import mlflow.artifacts
    import yaml
    from mlflow.entities import LoggedModelStatus

    from flows.registry import mlflow_client

    uri, cfg, _, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as a user would: MLflow resolves models:/ through it
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{cfg.registry.model_name}/1",
                                                     dst_path=str(tmp_path), tracking_uri=uri, registry_uri=uri))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"artifacts/model_pack/model.safetensors", "artifacts/model_pack/config.json",
            "artifacts/model_pack/tokenizer.json", "_pyfunc_entry.py", "MLmodel"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin"))]
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # "models from code": no pickle
    assert pyfunc["model_code_path"].endswith("_pyfunc_entry.py")
    assert mlmodel["signature"]["params"]
    assert (local / "input_example.json").is_file()
    client = mlflow_client(uri)
    version = client.get_model_version(cfg.registry.model_name, 1)
    logged = client.get_logged_model(mlmodel["model_id"])  # the MLmodel names its logged model, as log_model writes it
    assert logged.status == LoggedModelStatus.READY
    assert logged.source_run_id == mlmodel["run_id"] == version.run_id
    assert version.source == logged.artifact_location
    links = json.loads(logged.tags["mlflow.modelVersions"])  # the logged model lists its version
    assert [(link["name"], str(link["version"])) for link in links] == [(cfg.registry.model_name, "1")]
    assert client.get_run(version.run_id).outputs.model_outputs[0].model_id == logged.model_id
    store_dir = Path(uri.removeprefix("sqlite:///")).parent
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    assert experiment.artifact_location == (store_dir / "mlartifacts").as_uri()  # beside the store, not ./mlruns


def test_generate_cli_samples_exactly_like_the_model_pack(registered):
    from flows.modelpack import export_model_pack, load_model_pack, generate_text

    uri, cfg, data, checkpoint = registered
    proc = generate_cli(uri, "--model-uri", f"models:/{cfg.registry.model_name}@champion", "--prompt", "def ",
                        "--max-new-tokens", "20", "--temperature", "1.0", "--top-k", "5", "--seed", "7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tok = load_model_pack(export_model_pack(checkpoint, data.path, checkpoint.parent / "cli-pack"))
    expected = generate_text(model, tok, ["def "], max_new_tokens=20, temperature=1.0, top_k=5, seed=7)[0]
    assert proc.stdout == "def " + expected + "\n"


@pytest.mark.parametrize("args, needle", [
    (["--model-uri", "models:/no-such-model@champion", "--prompt", "def "], "no-such-model"),
    (["--model-uri", "models:/generate-test@champion", "--prompt", "Ω"], "outside the char vocabulary"),
])
def test_generate_cli_errors_are_one_line(registered, args, needle):
    proc = generate_cli(registered[0], *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert "Traceback" not in proc.stderr
