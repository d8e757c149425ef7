"""Where the config comes from: --set values parsed by their field's type, the environment read once at
the edge, one model section (attention_core's ModelConfig), and prefect.yaml as the nightly schedule's
one source."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from attention_core import ModelConfig
from flows.config import PipelineConfig, load_config, with_environment
from flows.errors import UserError
from flows.pipeline import PREFECT_YAML, nightly_deployment


@pytest.mark.parametrize("override, key, value", [
    ("data.source=123", ("data", "source"), "123"),            # a string key stays a string
    ("train.run_name=2024", ("train", "run_name"), "2024"),
    ("train.run_name=null", ("train", "run_name"), None),        # optional: null is None
    ("data.source=null", ("data", "source"), "null"),            # not optional: the text itself
    ("train.lr=3e-4", ("train", "lr"), 3e-4),                    # a float, by the field's type
    ("train.use_gpu=true", ("train", "use_gpu"), True),
    ("eval.top_k=none", ("eval", "top_k"), None),
    ("eval.prompts=[a, 'b c']", ("eval", "prompts"), ["a", "b c"]),
    ("model.mlp_hidden=96", ("model", "mlp_hidden"), 96),        # model fields the old section lacked
    ("model.n_kv_head=2", ("model", "n_kv_head"), 2),
])
def test_set_values_are_parsed_by_the_field_type(override, key, value):
    cfg = load_config(overrides=[override, "train.min_lr=1e-5"])
    got = getattr(getattr(cfg, key[0]), key[1])
    assert got == value and type(got) is type(value)


def test_numbers_for_string_keys_in_yaml_are_strings(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  run_name: 2024\ndata:\n  source: 123\n")
    cfg = load_config(f)
    assert (cfg.train.run_name, cfg.data.source) == ("2024", "123")


def test_the_model_section_is_attention_core_model_config():
    cfg = load_config(overrides=["model.n_layer=2", "model.block_size=64"])
    assert type(cfg.model) is ModelConfig
    # one set of defaults: the pipeline's are ModelConfig's own
    assert dataclasses.asdict(PipelineConfig().model) == dataclasses.asdict(ModelConfig())
    built = cfg.model.with_vocab(65)
    assert (built.vocab_size, built.n_layer, built.block_size) == (65, 2, 64)
    # round trip as Ray workers get it (a plain dict), validated back to the same dataclass
    assert PipelineConfig.model_validate(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize("override, message", [
    ("model.n_embd=30", "model.n_embd: 30 is not divisible"),   # attention_core's check, with its section
    ("model.pos=absolute", "model.pos"),
    ("model.nope=1", "unknown config key 'model.nope'"),
    ("model.vocab_size=100", "model.vocab_size"),                # comes from the tokenizer
    ("model.causal=false", "model.causal"),                     # the pipeline trains a language model
    ("model.n_layer.x=1", "'model.n_layer' is not a section"),
])
def test_model_section_errors_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")) as err:
        load_config(overrides=[override])
    assert "\n" not in str(err.value)


def test_the_environment_fills_only_unset_keys():
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "RAY_ADDRESS": "ray-head:6379"}
    cfg = with_environment(load_config(), env)
    assert (cfg.tracking_uri(), cfg.train.ray_address) == ("http://mlflow:5000", "ray-head:6379")
    explicit = load_config(overrides=["registry.tracking_uri=sqlite:////tmp/x.db", "train.ray_address=auto"])
    assert with_environment(explicit, env) == explicit
    # without the environment, the SQLite store under the workdir; the config never reads os.environ itself
    plain = load_config(overrides=["workdir=/tmp/wd"])
    assert with_environment(plain, {}).tracking_uri() == "sqlite:////tmp/wd/mlflow.db"


def test_config_json_is_read_whole(tmp_path: Path):
    cfg = load_config(overrides=["train.max_steps=7", "model.n_layer=2"])
    again = load_config(json_text=cfg.model_dump_json(), overrides=["train.lr=1e-3"])
    assert again.train.max_steps == 7 and again.model.n_layer == 2 and again.train.lr == 1e-3
    with pytest.raises(UserError, match="--config-json"):
        load_config(json_text="[1, 2]")
    with pytest.raises(UserError, match="not both"):
        load_config(tmp_path / "c.yaml", json_text="{}")


def test_nightly_schedule_comes_from_prefect_yaml():
    spec = next(d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"] if d["name"] == "nightly")
    nightly = nightly_deployment()
    assert nightly["config"] == spec["parameters"]["config"]
    assert (nightly["cron"], nightly["timezone"]) == (spec["schedules"][0]["cron"], spec["schedules"][0]["timezone"])
    assert nightly["config"]["train"]["max_steps"] == 2000  # what prefect.yaml says, not a copy's default
    with pytest.raises(UserError, match="prefect.yaml"):
        nightly_deployment(Path("/nonexistent/prefect.yaml"))
