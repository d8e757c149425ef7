"""Registry pieces that need no MLflow store: the recorded gate decision, lineage tags, the summary,
the flow-run name and the nightly schedule (the data cache key: tests/flows/test_data_cache.py)."""

from __future__ import annotations

import importlib

import math
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from flows.config import load_config, validate_config
from flows.evaluate import EvalResult
from flows.pipeline import PREFECT_YAML, run_name_for
from flows.registry import GateDecision, Registration, git_tags, library_versions, run_url, summary_markdown


@pytest.mark.parametrize("decision", [
    GateDecision(promote=True, method="no champion", challenger_bits_per_byte=2.5, min_improvement=0.01),
    GateDecision(promote=False, method="re-evaluated champion on the same validation split",
                 challenger_bits_per_byte=2.5, champion_version=3, champion_bits_per_byte=2.4,
                 challenger_val_loss=1.7, champion_val_loss=1.6),
])
def test_gate_decision_round_trips_through_version_tags(decision):
    tags = decision.tags()
    assert tags["gate.decision"] == ("promoted" if decision.promote else "kept champion")
    assert list(tags)[-1] == "gate.decision"  # written last: it marks a complete record
    assert GateDecision.from_tags({**tags, "unrelated": "x"}) == decision


def test_no_recorded_decision_without_the_decision_tag():
    tags = GateDecision(promote=True, method="m", challenger_bits_per_byte=1.0).tags()
    del tags["gate.decision"]
    assert GateDecision.from_tags(tags) is None


@pytest.mark.parametrize("overrides, name", [
    ([], "python-stdlib-char-4x128-20250301-0200"),
    (["model.n_layer=6", "model.n_embd=384", "model.n_head=6"], "python-stdlib-char-6x384-heads=6-20250301-0200"),
    (["train.lr=3e-3", "train.min_lr=3e-4"], "python-stdlib-char-4x128-lr=3e-3-20250301-0200"),
    (["train.lr=2.5e-4", "train.weight_decay=0.05", "train.max_steps=5000", "train.batch_size=64",
      "model.block_size=512", "model.pos=rope"], "python-stdlib-char-4x128-lr=2.5e-4,steps=5000,bs=64+3-20250301-0200"),
])
def test_flow_run_name_says_dataset_tokenizer_model_size_and_the_main_changed_settings(overrides, name):
    cfg = load_config(overrides=overrides)
    when = datetime(2025, 3, 1, 2, 0, tzinfo=timezone.utc)
    assert run_name_for(cfg, when) == name


def test_the_changed_settings_in_a_run_name_are_capped():
    from flows.pipeline import MAX_SETTINGS_CHARS, NAMED_SETTINGS, changed_for_name

    cfg = load_config(overrides=["train.lr=1e-4", "train.min_lr=1e-5", "train.optimizer=adamw", "train.max_steps=12345",
                                 "train.batch_size=48", "model.block_size=1024", "model.n_head=8", "model.pos=rope",
                                 "model.norm=rmsnorm", "model.mlp=swiglu", "train.seed=7"])
    shown, _, more = changed_for_name(cfg).partition("+")
    assert len(shown) <= MAX_SETTINGS_CHARS and shown.startswith("lr=1e-4,opt=adamw")
    assert len(shown.split(",")) + int(more) == 10 == sum(key in NAMED_SETTINGS for key in (
        "train.lr", "train.optimizer", "train.max_steps", "train.batch_size", "model.block_size", "model.n_head",
        "model.pos", "model.norm", "model.mlp", "train.seed"))


def test_library_versions_and_git_tags():
    versions = library_versions()
    assert {"versions.python", "versions.torch", "versions.ray", "versions.prefect", "versions.mlflow"} <= set(versions)
    tags = git_tags()
    if tags:  # a checkout: the commit the run's code came from
        assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git.dirty"] in {"true", "false"}
    assert git_tags(Path("/")) == {}  # not a repository


@pytest.mark.parametrize("uri, base", [
    ("http://127.0.0.1:5000/", "http://127.0.0.1:5000"), ("https://mlflow.example", "https://mlflow.example"),
    ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000"),
])
def test_run_url(uri, base):
    assert run_url(uri, "7", "abc") == f"{base}/#/experiments/7/runs/abc"


def test_summary_names_metrics_comparison_and_link():
    result = EvalResult(val_loss=1.5, perplexity=math.exp(1.5), bits_per_byte=2.25, tokens=4096, bytes=4200,
                        windows=128, block_size=32, samples=[])
    reg = Registration(model_name="m", version="4", model_uri="models:/m/4", champion=False,
                       decision="kept champion", method="re-evaluated champion on the same validation split",
                       challenger_bits_per_byte=2.25, champion_bits_per_byte=2.2, champion_version=3,
                       run_id="r1", experiment_id="1")
    md = summary_markdown(reg, result, url="http://x/#/experiments/1/runs/r1", lineage={"data.fingerprint": "fp"})
    for needle in ("bits per byte | 2.2500", "perplexity", "| champion before | v3 | 2.2000 |",
                   "**kept champion**", "still v3", "[r1](http://x/#/experiments/1/runs/r1)", "`fp`"):
        assert needle in md


def test_the_card_gist_has_no_table_the_description_view_would_show_as_text():
    from flows.registry.card import gist

    card = ("# m v4\n\n**promoted**: 2.25 bits per byte\n\n## Data\n\n- source: x\n\n## Model\n\n- 1 layer\n\n"
            "## Evaluation (whole validation split)\n\n| bits per byte | perplexity |\n|---|---|\n| 2.2500 | 4.48 |\n")
    text = gist(card)
    assert text.startswith("**promoted**: 2.25 bits per byte")
    assert "- bits per byte 2.2500, perplexity 4.48" in text and "|" not in text
    assert "- source: x" in text and "- 1 layer" in text


def test_prefect_yaml_deployments():
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly", "smoke", "sweep"}
    schedule = deployments["nightly"]["schedules"][0]
    assert schedule["cron"] and schedule["timezone"]
    for d in deployments.values():
        assert d["work_pool"]["name"] == "attention-process"
        validate_config(d["parameters"]["config"])  # the parameters are a valid PipelineConfig
        module, _, attr = d["entrypoint"].rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr))


def test_the_sweep_deployment_is_weekly_off_by_default_and_valid():
    from flows.sweep.spec import SweepConfig, check_sweep

    sweep = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}["sweep"]
    assert sweep["schedules"][0]["active"] is False and sweep["schedules"][0]["cron"].endswith("* 0")
    dims = check_sweep(validate_config(sweep["parameters"]["config"]), SweepConfig(**sweep["parameters"]["sweep"]))
    assert {d.key for d in dims} == {"train.lr", "model.n_embd"}


@pytest.mark.parametrize("args, needle", [
    (["--timezone", "Mars/Olympus"], "Mars/Olympus"),
    (["--cron", "61 * * * *"], "61 * * * *"),
    (["--set", "train.nope=1"], "train.nope"),
])
def test_serve_rejects_a_bad_schedule_or_config_in_one_line(args, needle, capsys):
    from flows.__main__ import main

    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
