from pathlib import Path

import pytest

from flows.config import PipelineConfig, load_config
from flows.errors import UserError


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.data.source == "python-stdlib"
    assert cfg.registry.model_name == "attention-transformer"
    assert cfg.data.tokenizer == "char"


def test_yaml_then_overrides(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_layer: 3\ntrain:\n  lr: 0.01\n  min_lr: 0.001\n")
    cfg = load_config(f, ["train.lr=3e-3", "model.dropout=0.1", "data.source=some/where.txt"])
    assert cfg.model.n_layer == 3
    assert cfg.train.lr == pytest.approx(3e-3)
    assert cfg.model.dropout == pytest.approx(0.1)
    assert cfg.data.source == "some/where.txt"


def test_override_values_are_yaml_scalars():
    cfg = load_config(overrides=["train.use_gpu=true", "train.ray_address=null", "eval.top_k=5"])
    assert cfg.train.use_gpu is True and cfg.train.ray_address is None and cfg.eval.top_k == 5


@pytest.mark.parametrize(
    "override, key",
    [
        (["train.lrr=1"], "train.lrr"),
        (["nope=1"], "nope"),
        (["model.n_embd=30"], "model.n_embd"),
        (["train.lr=abc"], "train.lr"),
        (["data.tokenizer=wordpiece"], "data.tokenizer"),
        (["data.val_fraction=1.5"], "data.val_fraction"),
        (["train.min_lr=1", "train.lr=0.1"], "train.min_lr"),
        (["model.n_kv_head=3"], "model.n_kv_head"),
        (["train.optimizer=sgd"], "train.optimizer"),
        (["train.schedule=step"], "train.schedule"),
        (["train.decay_fraction=1.5"], "train.decay_fraction"),
        (["model.logit_softcap=-1"], "model.logit_softcap"),
        (["model.mlp=relu"], "model.mlp"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError) as err:
        load_config(overrides=override)
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file_names_it(tmp_path: Path):
    with pytest.raises(UserError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_round_trips_through_a_plain_dict():
    cfg = load_config(overrides=["model.n_layer=2"])
    assert PipelineConfig.model_validate(cfg.model_dump()) == cfg


def test_muon_is_refused_under_fsdp_in_one_line():
    with pytest.raises(UserError, match=r"^invalid config: train.optimizer: muon .* use train.strategy=ddp"):
        load_config(overrides=["train.optimizer=muon", "train.strategy=fsdp"])
    # Muon and wsd are the defaults; under fsdp, unless muon is asked for, the optimizer is AdamW
    assert (load_config().train.optimizer, load_config().train.schedule) == ("muon", "wsd")
    assert load_config(overrides=["train.strategy=fsdp"]).train.optimizer == "adamw"
    cfg = load_config(overrides=["train.optimizer=muon", "train.schedule=wsd", "model.logit_softcap=15",
                                 "model.mlp=relu2", "model.zero_init_proj=true"])
    assert (cfg.train.optimizer, cfg.train.schedule, cfg.model.logit_softcap) == ("muon", "wsd", 15.0)
