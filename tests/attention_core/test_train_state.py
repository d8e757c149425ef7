"""TrainState and the weight helpers: exact resumption, safe loading, whole-directory replacement."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import safetensors.torch
import torch

from attention_core import (TrainState, configure_optimizer, load_model, load_weights, save_model, save_weights,
                            train_step)


@pytest.fixture
def fresh(tiny_model):
    """fresh(seed=0, **overrides) -> (model, optimizer); dropout makes a step depend on torch's RNG."""
    def make(seed=0, **overrides):
        model = tiny_model(seed, dropout=0.1, **overrides)
        return model, configure_optimizer(model, 1e-2, 0.1)
    return make


def run_steps(model, optimizer, n):
    """Steps whose outcome depends on torch's global RNG (dropout) and on python's random (offsets)."""
    data = torch.arange(200) % 32
    losses = []
    for _ in range(n):
        starts = [random.randrange(0, 150) for _ in range(2)]
        x = torch.stack([data[s:s + 16] for s in starts])
        y = torch.stack([data[s + 1:s + 17] for s in starts])
        losses.append(train_step(model, optimizer, [(x, y)]).loss)
    return losses


def test_resuming_from_a_saved_state_continues_exactly(fresh, tmp_path):
    random.seed(0)
    model, optimizer = fresh()
    run_steps(model, optimizer, 2)
    TrainState(model, optimizer, step=2, extra={"run": "abc"}).save(tmp_path / "ckpt")
    expected = run_steps(model, optimizer, 3)

    random.seed(999)  # scramble every RNG and start from a differently initialised model
    torch.manual_seed(999)
    other, other_opt = fresh(seed=1)
    state = TrainState.load(tmp_path / "ckpt", other, other_opt)
    assert state.step == 2 and state.extra == {"run": "abc"}
    assert state.model is other and state.optimizer is other_opt
    assert run_steps(other, other_opt, 3) == expected
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_files_written(fresh, tmp_path):
    model, optimizer = fresh()
    run_steps(model, optimizer, 1)
    TrainState(model, optimizer, step=7, extra={"a": [1, 2]}).save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state == {"step": 7, "model_config": model.config.to_dict(), "extra": {"a": [1, 2]}}
    # the tied matrix is stored once, and both optimizer and RNG files load without unpickling code
    tensors = safetensors.torch.load_file(tmp_path / "ckpt" / "model.safetensors")
    assert len([k for k in tensors if k in ("wte.weight", "lm_head.weight")]) == 1
    torch.load(tmp_path / "ckpt" / "optimizer.pt", weights_only=True)
    torch.load(tmp_path / "ckpt" / "rng.pt", weights_only=True)


def test_tied_weights_stay_tied_after_loading(fresh, tmp_path):
    model, _ = fresh()
    save_weights(model, tmp_path / "w.safetensors")
    other, _ = fresh(seed=1)
    load_weights(other, tmp_path / "w.safetensors")
    assert other.lm_head.weight is other.wte.weight
    assert torch.equal(other.wte.weight, model.wte.weight)


def test_untied_weights_round_trip(fresh, tmp_path):
    model, _ = fresh(tie_embeddings=False, pos="rope", mlp="swiglu")
    save_weights(model, tmp_path / "w.safetensors")
    other, _ = fresh(seed=1, tie_embeddings=False, pos="rope", mlp="swiglu")
    load_weights(other, tmp_path / "w.safetensors")
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_pickled_object_is_refused(fresh, tmp_path):
    model, optimizer = fresh()
    TrainState(model, optimizer).save(tmp_path / "ckpt")

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "ckpt" / "optimizer.pt", "wb") as f:
        pickle.dump({"state": Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        TrainState.load(tmp_path / "ckpt", model, optimizer)


def test_saving_over_a_state_replaces_it_whole(fresh, tmp_path, monkeypatch):
    model, optimizer = fresh()
    TrainState(model, optimizer, step=1).save(tmp_path / "ckpt")
    TrainState(model, optimizer, step=2).save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or old siblings left

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        TrainState(model, optimizer, step=3).save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 2  # intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with pytest.raises(TypeError):
        TrainState(model, optimizer, extra={"x": object()}).save(tmp_path / "ckpt")


def test_without_optimizer_and_without_rng(fresh, tmp_path):
    model, optimizer = fresh()
    TrainState(model, None, step=4).save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "optimizer.pt").exists()
    with pytest.raises(FileNotFoundError, match="optimizer"):
        TrainState.load(tmp_path / "ckpt", model, optimizer)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    state = TrainState.load(tmp_path / "ckpt", model, restore_rng=False)
    assert torch.equal(torch.get_rng_state(), before) and state.step == 4


@pytest.mark.parametrize("how", ["train_state", "save_model"])
def test_load_model_builds_the_model_from_its_directory(fresh, tmp_path, how):
    model, optimizer = fresh(pos="rope", n_kv_head=1)
    if how == "train_state":
        TrainState(torch.compile(model), optimizer).save(tmp_path / "m")  # wrappers are stripped
    else:
        save_model(model, tmp_path / "m")
        assert json.loads((tmp_path / "m" / "config.json").read_text()) == model.config.to_dict()
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    idx = torch.randint(32, (2, 8))
    torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0], atol=0, rtol=0)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing")
