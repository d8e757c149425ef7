"""TrainState's one format: optimizer state keyed by parameter name, full state dicts handed over by a
sharded trainer (`TrainState.read`), every file inside the atomic directory, strict loads."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

from attention_core import ModelConfig, TrainState, Transformer, configure_optimizer, train_step


def trained(seed: int = 0, steps: int = 2, **kwargs):
    """A tiny model and its AdamW after `steps` steps (so the optimizer has state)."""
    torch.manual_seed(seed)
    config = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = Transformer(ModelConfig(**{**config, **kwargs}))
    optimizer = configure_optimizer(model, 1e-2, 0.1)
    x = torch.randint(32, (2, 8))
    for _ in range(steps):
        train_step(model, optimizer, [(x, torch.roll(x, -1, 1))])
    return model, optimizer


def names(model) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, value in sa["state"][k].items():
            assert torch.equal(value, sb["state"][k][key]), (k, key)


def test_optimizer_state_is_keyed_by_parameter_name(tmp_path):
    model, optimizer = trained()
    TrainState(model, optimizer, step=2).save(tmp_path / "ckpt")
    saved = torch.load(tmp_path / "ckpt" / TrainState.OPTIMIZER, weights_only=True)
    assert set(saved["state"]) == names(model)  # a tied matrix once, under its first name
    assert {n for g in saved["param_groups"] for n in g["params"]} == names(model)
    assert saved["param_groups"][0]["weight_decay"] == 0.1 and saved["param_groups"][1]["weight_decay"] == 0.0


def test_a_by_name_state_dict_saves_like_the_optimizer_it_came_from(tmp_path):
    """What a sharded trainer hands over (a plain model and a by-name dict) is the same format."""
    model, optimizer = trained()
    TrainState(model, optimizer, step=2).save(tmp_path / "from-optimizer")
    by_name = TrainState.read(tmp_path / "from-optimizer").optimizer
    TrainState(model, by_name, step=2).save(tmp_path / "from-dict")

    for directory in ("from-optimizer", "from-dict"):
        other, other_opt = trained(seed=1, steps=1)
        state = TrainState.load(tmp_path / directory, other, other_opt, restore_rng=False)
        assert state.step == 2
        assert_same_optimizer_state(other_opt, optimizer)
        for a, b in zip(model.parameters(), other.parameters()):
            assert torch.equal(a, b)


def test_read_returns_a_plain_model_and_the_by_name_state(tmp_path):
    model, optimizer = trained(pos="rope", tie_embeddings=False)
    TrainState(torch.compile(model), optimizer, step=3, extra={"k": 1}).save(tmp_path / "ckpt")
    state = TrainState.read(tmp_path / "ckpt")
    assert isinstance(state.model, Transformer) and state.model.config == model.config
    assert state.step == 3 and state.extra == {"k": 1}
    for (name, a), b in zip(model.state_dict().items(), state.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert set(state.optimizer["state"]) == names(model)

    TrainState(model, None).save(tmp_path / "no-optimizer")
    assert TrainState.read(tmp_path / "no-optimizer").optimizer is None


def test_groups_listing_parameters_in_another_order_still_load_each_its_own_state(tmp_path):
    model, optimizer = trained()
    TrainState(model, optimizer).save(tmp_path / "ckpt")
    state = TrainState.read(tmp_path / "ckpt")
    for group in state.optimizer["param_groups"]:
        group["params"].reverse()
    TrainState(model, state.optimizer).save(tmp_path / "reversed")
    other, other_opt = trained(seed=1, steps=1)
    TrainState.load(tmp_path / "reversed", other, other_opt, restore_rng=False)
    assert_same_optimizer_state(other_opt, optimizer)


def test_every_file_is_inside_the_directory_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    model, optimizer = trained()
    TrainState(model, optimizer).save(tmp_path / "src")
    by_name = TrainState.read(tmp_path / "src").optimizer
    renamed: dict[str, list[str]] = {}
    replace = os.replace

    def recording_replace(src, dst):
        if os.path.isdir(src):
            renamed[os.path.basename(dst)] = sorted(os.listdir(src))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    TrainState(model, by_name, step=1).save(tmp_path / "ckpt")
    assert renamed["ckpt"] == sorted([TrainState.WEIGHTS, TrainState.OPTIMIZER, TrainState.RNG, TrainState.STATE])
    assert sorted(os.listdir(tmp_path / "ckpt")) == renamed["ckpt"]


def drop_weight(directory, name):
    path = directory / TrainState.WEIGHTS
    tensors = safetensors.torch.load_file(path)
    del tensors[name]
    safetensors.torch.save_file(tensors, path)


@pytest.mark.parametrize("how", ["load", "read"])
def test_a_missing_weight_is_an_error(tmp_path, how):
    model, optimizer = trained()
    TrainState(model, optimizer).save(tmp_path / "ckpt")
    drop_weight(tmp_path / "ckpt", "h.1.mlp.c_proj.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        if how == "load":
            TrainState.load(tmp_path / "ckpt", *trained(seed=1, steps=0))
        else:
            TrainState.read(tmp_path / "ckpt")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
@pytest.mark.parametrize("how", ["load", "read", "save"])
def test_a_missing_or_unexpected_optimizer_parameter_is_an_error(tmp_path, change, how):
    model, optimizer = trained()
    TrainState(model, optimizer).save(tmp_path / "ckpt")
    bad = TrainState.read(tmp_path / "ckpt").optimizer
    victim = "h.0.attn.c_attn.weight"
    group = next(g for g in bad["param_groups"] if victim in g["params"])
    if change == "missing":
        group["params"].remove(victim)
        del bad["state"][victim]
    else:
        group["params"].append("h.9.attn.c_attn.weight")
    if how == "save":
        with pytest.raises(KeyError, match="h.9.attn.c_attn.weight" if change == "unexpected" else victim):
            TrainState(model, bad).save(tmp_path / "bad")
        return
    torch.save(bad, tmp_path / "ckpt" / TrainState.OPTIMIZER)  # as a buggy writer might have left it
    with pytest.raises(KeyError, match="h.9.attn.c_attn.weight" if change == "unexpected" else victim):
        if how == "load":
            TrainState.load(tmp_path / "ckpt", *trained(seed=1, steps=0))
        else:
            TrainState.read(tmp_path / "ckpt")


def test_an_optimizer_over_other_parameters_is_refused(tmp_path):
    model, _ = trained()
    stranger = torch.nn.Linear(2, 2)
    with pytest.raises(KeyError, match="not parameters of the model"):
        TrainState(model, torch.optim.AdamW(stranger.parameters())).save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_an_optimizer_state_keyed_by_index_is_refused_with_a_message(tmp_path):
    model, optimizer = trained()
    TrainState(model, optimizer).save(tmp_path / "ckpt")
    torch.save(optimizer.state_dict(), tmp_path / "ckpt" / TrainState.OPTIMIZER)  # the format before names
    with pytest.raises(ValueError, match="keyed by index"):
        TrainState.load(tmp_path / "ckpt", *trained(seed=1, steps=0))
