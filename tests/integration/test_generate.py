"""The registered pyfunc in a fresh process with pickle loading disabled, `python -m flows generate`, and
the same model behind a real `mlflow models serve`.

A tiny random model is registered on a SQLite MLflow store (no training needed: what matters is that
the model loads without the pipeline's process and samples exactly as the model pack does). Bad
requests get one line from the CLI (exit 2) and a 400 with the message from the server, which goes on
serving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
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
    assert version.source == f"models:/{logged.model_id}"  # as mlflow.register_model records it
    assert client.get_model_version_download_uri(cfg.registry.model_name, 1) == logged.artifact_location
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
    (["--model-uri", "models:/generate-test@champion", "--prompt", "Ω"],
     "prompt: text has characters outside the char vocabulary: 'Ω'"),
    (["--model-uri", "models:/generate-test@champion", "--prompt", "def ", "--max-new-tokens", "1000000000"],
     "max_new_tokens: 1000000000 must be an integer from 1 to 1024 (max_new_tokens_limit)"),
    (["--prompt", "def ", "--max-new-tokens", "30", "--max-new-tokens-limit", "20"],
     "max_new_tokens: 30 must be an integer from 1 to 20"),
    (["--prompt", "def ", "--temperature", "nan"], "temperature: nan must be a finite number >= 0"),
])
def test_generate_cli_errors_are_one_line(registered, args, needle):
    proc = generate_cli(registered[0], *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------- `mlflow models serve`

def post(url: str, body: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def served(registered, free_port, tmp_path_factory):
    """`mlflow models serve` of the champion on 127.0.0.1 -> (url, process)."""
    uri, cfg, _, _ = registered
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}  # its uvicorn
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
           f"models:/{cfg.registry.model_name}@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no answer on /ping:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/invocations", proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group started here
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.mark.parametrize("body, message", [
    ('{"inputs": ["def "], "params": {"max_new_tokens": 1000000000}}',
     "max_new_tokens: 1000000000 must be an integer from 1 to 1024 (max_new_tokens_limit)"),
    ('{"inputs": ["def "], "params": {"temperature": -1.5}}', "temperature: -1.5 must be a finite number >= 0"),
    ('{"inputs": ["def "], "params": {"top_k": -1}}', "top_k: -1 must be an integer >= 0"),
    ('{"inputs": ["def ", "\u03a9"]}', "prompt 1: text has characters outside the char vocabulary: 'Ω'"),
    (r'{"inputs": ["\ud800"]}', "surrogates not allowed"),  # MLflow's schema check answers first
])
def test_a_bad_request_gets_a_400_and_the_server_goes_on(served, registered, body, message):
    from flows.modelpack import export_model_pack, generate_text, load_model_pack

    url, proc = served
    status, answer = post(url, body)
    assert status == 400, answer
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert message in answer["message"]
    assert proc.poll() is None
    status, answer = post(url, '{"inputs": ["def "], "params": {"max_new_tokens": 64, "temperature": 1.0, "seed": 5}}')
    assert status == 200, answer
    _, _, data, checkpoint = registered
    model, tok = load_model_pack(export_model_pack(checkpoint, data.path, checkpoint.parent / "serve-pack"))
    assert answer["predictions"] == generate_text(model, tok, ["def "], max_new_tokens=64, temperature=1.0, seed=5)
