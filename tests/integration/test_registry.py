"""The flow's registry side on real components (Prefect test harness, local Ray, MLflow on SQLite):
run name and lineage, evaluation logging, Prefect artifacts, the data cache, and retries that change
nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.config import load_config

pytestmark = pytest.mark.integration

TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "train.max_steps=12", "train.batch_size=8", "train.eval_interval=6", "train.eval_batches=2",
    "train.log_interval=3", "train.checkpoint_interval=6", "train.warmup_steps=2",
    "eval.max_tokens=4096", "eval.max_new_tokens=16", "train.num_workers=1",
]


def prefect_client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def flow_run_filter(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))


def samples_table(client, run_id: str) -> dict:
    """The samples table as MLflow stored it ({"columns": [...], "data": [[...], ...]})."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, "samples.json", tmp)).read_text())


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, prefect_harness, ray_local):
    """One whole pipeline run: (cfg, flow run id, Registration, MLflow client, MLflow run)."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import training_pipeline_flow

    cfg = load_config(overrides=[f"workdir={tmp_path_factory.mktemp('registry')}", *TINY])
    state = training_pipeline_flow(config=cfg, return_state=True)
    reg = state.result()
    client = MlflowClient(cfg.tracking_uri())
    return cfg, state.state_details.flow_run_id, reg, client, client.get_run(reg.run_id)


def test_flow_run_is_named_after_dataset_and_model_and_matches_the_mlflow_run(pipeline_run):
    cfg, flow_run_id, reg, client, run = pipeline_run
    with prefect_client() as prefect:
        name = prefect.read_flow_run(flow_run_id).name
    # TINY's changed settings that tell runs apart, the most telling first
    assert re.fullmatch(r"python-stdlib-char-1x32-steps=12,bs=8,ctx=32,heads=2-\d{8}-\d{4}", name), name
    assert run.info.run_name == name


def test_one_mlflow_run_carries_the_lineage(pipeline_run):
    cfg, flow_run_id, reg, client, run = pipeline_run
    tags = run.data.tags
    assert run.info.status == "FINISHED"  # closed by the flow's completion hook
    assert tags["prefect.flow_run_id"] == str(flow_run_id)
    assert tags["prefect.flow_run_name"] == run.info.run_name
    assert "prefect.deployment_id" not in tags  # run from the CLI/test, not from a deployment
    # a temporary Prefect server has no UI URL: no tag rather than "None/flow-runs/flow-run/<id>"
    assert tags.get("prefect.flow_run_url", "http://").startswith(("http://", "https://")), tags
    assert tags["ray.run_name"] == f"train-{flow_run_id}"
    assert tags["ray.storage_path"] == cfg.storage_path()
    assert Path(tags["ray.checkpoint_path"]).is_dir()
    assert re.fullmatch(r"[0-9a-f]{16}", tags["data.fingerprint"])
    assert {"versions.torch", "versions.ray", "versions.prefect", "versions.mlflow", "versions.python"} <= set(tags)
    if (Path(__file__).resolve().parents[2] / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    # the MLflow UI opens the experiment in its model-training view, not the GenAI one
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([run.info.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1


def test_evaluation_metrics_samples_and_figures(pipeline_run):
    cfg, _, reg, client, run = pipeline_run
    metrics = run.data.metrics
    assert metrics["eval_bits_per_byte"] > 0 and run.data.tags["eval.tokens"] == "4096"
    assert "eval_tokens" not in metrics and "eval_bytes" not in metrics  # bookkeeping: tags, not charts
    assert metrics["eval_perplexity"] == pytest.approx(2.718281828 ** metrics["eval_val_loss"], rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"samples.json", "figures/loss_curves.png", "figures/attention_heatmaps.png"} <= artifacts
    table = samples_table(client, run.info.run_id)
    assert table["columns"] == ["prompt", "completion"]
    prompts = [row[0] for row in table["data"]]  # eval.prompts unset: lines of the validation split
    assert cfg.eval.prompts is None and 1 <= len(prompts) <= 3 and all(p and "\n" not in p for p in prompts)
    # the figures also as images by key, which the compare and chart views show side by side
    images = [Path(a.path).name for a in client.list_artifacts(run.info.run_id, "images")]
    for key in ("loss_curves", "attention_heatmaps"):
        assert sum(re.match(rf"{key}[+%]step[+%]0[+%]", name) is not None and name.endswith(".png")
                   for name in images) == 1, images


def test_registration_records_the_gate_and_publishes_prefect_artifacts(pipeline_run):
    cfg, flow_run_id, reg, client, run = pipeline_run
    assert reg.champion and reg.method == "no champion" and reg.version == "1"
    version = client.get_model_version(cfg.registry.model_name, 1)
    assert version.tags["gate.decision"] == "promoted"
    assert version.tags["data.fingerprint"] == run.data.tags["data.fingerprint"]
    assert client.get_model_version_by_alias(cfg.registry.model_name, "champion").version == 1
    with prefect_client() as prefect:
        artifacts = {a.key: a for a in prefect.read_artifacts(flow_run_filter=flow_run_filter(flow_run_id))}
    assert {"pipeline-summary", "mlflow-run"} <= set(artifacts)
    summary = artifacts["pipeline-summary"]
    assert summary.type == "markdown"
    assert "bits per byte" in summary.data and "Champion comparison" in summary.data
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in summary.data
    assert f"/runs/{run.info.run_id}" in str(artifacts["mlflow-run"].data)


def test_stage_times_and_parameter_count_are_logged_and_summarised(pipeline_run):
    from attention_core import TrainState

    cfg, flow_run_id, _, client, run = pipeline_run
    stages = {k.removeprefix("stage_seconds."): v for k, v in run.data.metrics.items() if k.startswith("stage_seconds.")}
    # every stage of a flow run (the CLI's own, startup to flow_start, come only with `flows run`); no
    # ray_stop: the Ray is the test's (ray_local), which the flow joins and leaves running
    assert set(stages) == {"prep", "mlflow_run", "ray_start", "worker_startup", "worker_setup", "first_step",
                           "training", "evaluations", "checkpoints", "train_teardown", "final_eval",
                           "figures", "model_logging", "gate"}
    assert all(v >= 0 for v in stages.values())
    # rank 0 logs its running totals at each checkpoint (6 and 12): the run shows the whole loop's
    history = sorted(client.get_metric_history(run.info.run_id, "stage_seconds.checkpoints"), key=lambda m: m.step)
    assert [m.step for m in history] == [6, 12] and history[0].value <= history[1].value == stages["checkpoints"]
    model = TrainState.read(run.data.tags["ray.checkpoint_path"]).model
    expected = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()  # nanoGPT's count
    assert run.data.params["model.num_params"] == str(expected)
    with prefect_client() as prefect:
        [summary] = [a for a in prefect.read_artifacts(flow_run_filter=flow_run_filter(flow_run_id))
                     if a.key == "pipeline-summary"]
    assert "## Stage times" in summary.data and "| worker_startup | " in summary.data
    assert f"| {expected:,} |" in summary.data


def test_retried_evaluation_and_registration_change_nothing(pipeline_run, monkeypatch):
    """Each task fails once right after its MLflow side effects; Prefect retries it, and the retry
    finds the run, the logged metrics, the model version and the recorded decision."""
    from prefect import flow

    import flows.pipeline as pipeline
    import flows.registry as registry
    from flows.train import TrainResult

    cfg, _, _, client, first = pipeline_run
    tags = first.data.tags
    fails = {"log_evaluation": 1, "_publish_summary": 1}

    def failing_once(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            if fails[name]:
                fails[name] -= 1
                raise ConnectionError(f"injected failure after {name}")
            return out

        monkeypatch.setattr(module, name, wrapper)

    failing_once(registry, "log_evaluation")
    failing_once(pipeline, "_publish_summary")

    @flow(name="retry-check")
    def evaluate_and_register(config, trained):
        data = pipeline._prepare_dataset_cached(config)
        result = pipeline.evaluate_model_task(config, data, trained)
        return pipeline.register_model_task(config, data, trained, result)

    trained = TrainResult(checkpoint_path=tags["ray.checkpoint_path"], run_name=tags["ray.run_name"],
                          storage_path=tags["ray.storage_path"], metrics={})
    state = evaluate_and_register(cfg, trained, return_state=True)
    reg = state.result()
    assert fails == {"log_evaluation": 0, "_publish_summary": 0}  # both failures happened

    flow_run_id = state.state_details.flow_run_id
    runs = client.search_runs([first.info.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert len(client.get_metric_history(run_id, "eval_bits_per_byte")) == 1
    # logged once, not appended: as many samples as the first run has, on the same validation split
    assert len(samples_table(client, run_id)["data"]) == len(samples_table(client, first.info.run_id)["data"])
    versions = client.search_model_versions(f"name='{cfg.registry.model_name}' and run_id='{run_id}'")
    assert [int(v.version) for v in versions] == [int(reg.version)] == [2]
    logged = client.search_logged_models([first.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert len(logged) == 1
    with prefect_client() as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=flow_run_filter(flow_run_id))
    attempts = {t.name.rsplit("-", 1)[0]: t.run_count for t in task_runs}
    assert attempts["evaluate_model"] == 2 and attempts["register_model"] == 2
    champions = [v for v in client.search_model_versions(f"name='{cfg.registry.model_name}'")
                 if "champion" in client.get_model_version(cfg.registry.model_name, v.version).aliases]
    assert len(champions) == 1


def test_prepare_dataset_is_cached_across_flow_runs_until_its_directory_is_gone(tmp_path, prefect_harness):
    import shutil

    from prefect import flow

    from flows.pipeline import _prepare_dataset_cached

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(200)))
    cfg = load_config(overrides=[f"workdir={tmp_path / 'wd'}", f"data.source={corpus}", "model.block_size=16"])

    @flow(name="prepare-only")
    def prepare_only(config):
        return _prepare_dataset_cached(config, return_state=True)

    def run():
        state = prepare_only(cfg)
        return state.name, state.result()

    name1, data1 = run()
    name2, data2 = run()
    assert (name1, name2) == ("Completed", "Cached")
    assert data2 == data1  # the persisted JSON result, read back
    assert list((tmp_path / "wd" / "prefect-results").iterdir())
    shutil.rmtree(data1.path)
    name3, data3 = run()
    assert name3 == "Completed" and Path(data3.path, "meta.json").is_file()  # rebuilt, not a dangling path
    assert run()[0] == "Cached"
    corpus.write_text("different content entirely, repeated\n" * 100)
    name5, data5 = run()
    assert name5 == "Completed" and data5.fingerprint != data1.fingerprint


def test_each_version_carries_a_transformers_loadable_export_and_flows_export_writes_one(pipeline_run, tmp_path):
    """The registered version's `hf/` folder (what `mlflow artifacts download` gives) and `flows export`
    from the registry both load in transformers' stock GPT-2 class and compute the registered model's logits."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is part of the dev extras")
    import mlflow.artifacts
    import torch

    from flows.__main__ import main
    from flows.registry.loading import download_model_pack

    cfg, flow_run_id, reg, client, run = pipeline_run
    version = client.get_model_version(reg.model_name, reg.version)
    assert version.tags["hf.export"] == "hf/" and version.tags["hf.architecture"] == "GPT2LMHeadModel"
    downloaded = mlflow.artifacts.download_artifacts(artifact_uri=f"{client.get_model_version_download_uri(reg.model_name, reg.version)}/hf",
                                                     dst_path=str(tmp_path / "dl"), tracking_uri=cfg.tracking_uri())
    code = main(["export", "--model-uri", reg.model_uri, "--format", "hf", "--out", str(tmp_path / "cli"),
                 "--tracking-uri", cfg.tracking_uri(), "--check-text", "def f(x):\n    return x\n"])
    assert code == 0
    model, tokenizer = download_model_pack(cfg.tracking_uri(), reg.model_uri, tmp_path / "pack")
    ids = torch.tensor([tokenizer.encode("import os\nclass A:\n")])
    for directory in (downloaded, tmp_path / "cli"):
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(directory))
        assert type(theirs).__name__ == "GPT2LMHeadModel"
        with torch.no_grad():
            assert (theirs(ids).logits - model(ids)[0]).abs().max() <= 1e-4


def test_export_of_a_missing_model_is_one_line_exit_2(pipeline_run, tmp_path, capsys):
    from flows.__main__ import main

    cfg, *_ = pipeline_run
    code = main(["export", "--model-uri", "models:/no-such-model@champion", "--out", str(tmp_path / "x"),
                 "--tracking-uri", cfg.tracking_uri()])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no-such-model" in err, err
    assert not (tmp_path / "x").exists()


def test_each_version_has_a_model_card_and_its_gist_as_description(pipeline_run, tmp_path):
    """model_card.md beside the version's model (and as hf/README.md) says what the model is, how it was
    trained, how good it is, what the gate decided and where it came from; the version's description,
    which the MLflow UI shows, is its gist."""
    import mlflow.artifacts

    cfg, flow_run_id, reg, client, run = pipeline_run
    version = client.get_model_version(reg.model_name, reg.version)
    root = client.get_model_version_download_uri(reg.model_name, reg.version)
    card = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/model_card.md", dst_path=str(tmp_path / "a"),
                                                    tracking_uri=cfg.tracking_uri())).read_text()
    readme = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/hf/README.md", dst_path=str(tmp_path / "b"),
                                                      tracking_uri=cfg.tracking_uri())).read_text()
    assert readme == card
    for heading in ("## Data", "## Model", "## Training", "## Evaluation", "## Champion gate", "## Lineage",
                    "## Intended use", "## Limitations"):
        assert heading in card
    assert run.data.tags["data.fingerprint"] in card and f"`{flow_run_id}`" in card
    assert run.data.tags["ray.run_name"] in card and f"{reg.decision}" in card
    assert f"{float(run.data.metrics['eval_bits_per_byte']):.4f}" in card
    assert "1 layers × 32 dims" in card and "GPT2LMHeadModel" in card
    assert version.description.startswith(f"**{reg.decision}**") and "model_card.md" in version.description


def test_the_run_says_what_it_is_in_the_mlflow_ui(pipeline_run):
    """What the UI shows beside the numbers: a description naming the settings that differ from the
    defaults, who and what created the run, the dataset it used (fingerprint as digest), a logged model
    named after its run, and the tokenizer's real vocabulary size instead of the bpe target."""
    cfg, flow_run_id, reg, client, run = pipeline_run
    run = client.get_run(run.info.run_id)  # after the evaluation and the registration
    tags, params = run.data.tags, run.data.params
    note = tags["mlflow.note.content"]
    assert "Settings that differ from the defaults:" in note and "`train.max_steps=12`" in note
    assert "workdir" not in note.split("defaults:")[1]
    assert tags["mlflow.user"] and tags["mlflow.source.name"].startswith("attention-pipeline")
    (dataset,) = [i.dataset for i in run.inputs.dataset_inputs]
    assert dataset.digest == tags["data.fingerprint"] and '"train_tokens"' in dataset.profile
    assert "data.vocab_size" not in params  # a char tokenizer has no target size
    assert int(params["model.vocab_size"]) > 10
    from flows.registry.versions import logged_model_of

    assert logged_model_of(client, run.info.run_id).name == run.info.run_name


def test_the_mlflow_ui_links_the_version_and_its_logged_model(pipeline_run, free_port, tmp_path):
    """Read as the UI reads it, from a real `mlflow server` on the run's store: the logged model lists its
    version (`mlflow.modelVersions`: else its page says "Not registered"), the run's page lists it under
    "Registered models", and the version's source is `models:/<model id>` (the version page's "Source
    Model" link), as `mlflow.register_model` records it; the version still downloads the model's files."""
    import json
    import urllib.parse
    import urllib.request

    from tests.integration.test_servers import BIN, base_env, start, stop, wait_until_healthy

    cfg, _, reg, client, run = pipeline_run
    port, log = free_port(), tmp_path / "mlflow-server.log"
    server = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--backend-store-uri", cfg.tracking_uri()], base_env(), log, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"

    def get(path: str, **query: str) -> dict:
        with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}") as response:
            return json.load(response)

    try:
        wait_until_healthy(f"{base}/health", server, log)
        outputs = get("runs/get", run_id=reg.run_id)["run"]["outputs"]["model_outputs"]
        (model_id,) = {o["model_id"] for o in outputs}  # the run's "Logged models"
        info = get(f"logged-models/{model_id}")["model"]["info"]
        tags = {t["key"]: t["value"] for t in info.get("tags", [])}
        links = [(link["name"], str(link["version"])) for link in json.loads(tags["mlflow.modelVersions"])]
        assert links == [(cfg.registry.model_name, str(reg.version))]
        version = get("model-versions/get", name=cfg.registry.model_name, version=str(reg.version))["model_version"]
        assert version["source"] == f"models:/{model_id}" and version["run_id"] == reg.run_id
        download = get("model-versions/get-download-uri", name=cfg.registry.model_name, version=str(reg.version))
        assert download["artifact_uri"] == info["artifact_uri"]
    finally:
        stop(server)
