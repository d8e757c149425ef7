"""Muon for the hidden matrices with AdamW for the rest, as one optimizer; the warmup-stable-decay schedule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_core import Muon, MuonWithAdamW, TrainState, configure_optimizer, lr_at, orthogonalize, train_step


def batch(seed: int):
    x = torch.randint(32, (2, 16), generator=torch.Generator().manual_seed(seed))
    return x, torch.roll(x, -1, 1)


def group_names(model, optimizer) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, set[str]] = {}
    for group in optimizer.param_groups:
        key = f"{group['algorithm']} decay={group['weight_decay']}"
        out.setdefault(key, set()).update(names[id(p)] for p in group["params"])
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_model, tied):
    model = tiny_model(tie_embeddings=tied, norm="rmsnorm", qk_norm=True)
    optimizer = configure_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="muon", muon_lr=0.02)
    assert isinstance(optimizer, MuonWithAdamW)
    groups = group_names(model, optimizer)
    every = {n for n, _ in model.named_parameters()}
    matrices = {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("h.")}
    assert groups["muon decay=0.0"] == matrices
    assert all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in matrices)
    # an untied head is a matrix too, but Muon is for hidden layers: AdamW decays it
    assert groups.get("adamw decay=0.1", set()) == (set() if tied else {"lm_head.weight"})
    assert set().union(*groups.values()) == every
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_the_schedule_moves_each_group_by_its_own_scale(tiny_model):
    model = tiny_model()
    optimizer = configure_optimizer(model, lr=2e-3, weight_decay=0.1, optimizer="muon", muon_lr=0.03)
    lrs = {g["algorithm"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"muon": 0.03, "adamw": 2e-3}  # before any step: the peak rates
    train_step(model, optimizer, [batch(0)], lr=1e-3)  # half way down the schedule
    for group in optimizer.param_groups:
        assert math.isclose(group["lr"], (0.015 if group["algorithm"] == "muon" else 1e-3))


def test_one_optimizer_steps_exactly_as_muon_and_adamw_side_by_side(tiny_model):
    model, reference = tiny_model(seed=3), tiny_model(seed=3)
    combined = configure_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="muon", muon_lr=0.02,
                                   muon_weight_decay=0.05, fused=False)
    groups = combined.param_groups
    by_name = dict(reference.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}

    def same(group):
        return [by_name[names[id(p)]] for p in group["params"]]

    muon = Muon([{"params": same(g), "weight_decay": g["weight_decay"]}
                 for g in groups if g["algorithm"] == "muon"], lr=0.02, momentum=0.95, nesterov=True)
    adamw = torch.optim.AdamW([{"params": same(g), "weight_decay": g["weight_decay"]}
                               for g in groups if g["algorithm"] == "adamw"], lr=1e-3, betas=(0.9, 0.95),
                              eps=1e-8, fused=False)
    for step in range(3):
        x, y = batch(step)
        train_step(model, combined, [(x, y)], grad_clip=0.0)
        muon.zero_grad(), adamw.zero_grad()
        reference(x, y)[1].backward()
        muon.step(), adamw.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, by_name[name], rtol=0, atol=0, msg=name)


def muon_pair(tiny_model, steps=3, **ours):
    model, reference = tiny_model(seed=5), tiny_model(seed=5)
    matrices = [n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("h.")]
    by_name = dict(reference.named_parameters())
    start = {n: p.detach().clone() for n, p in by_name.items()}
    mine = Muon([dict(model.named_parameters())[n] for n in matrices], lr=0.02, weight_decay=0.1, **ours)
    theirs = torch.optim.Muon([by_name[n] for n in matrices], lr=0.02, weight_decay=0.1)
    for step in range(steps):
        x, y = batch(step)
        for m, opt in ((model, mine), (reference, theirs)):
            opt.zero_grad()
            m(x, y)[1].backward()
            opt.step()
    return [(n, dict(model.named_parameters())[n] - start[n], by_name[n] - start[n]) for n in matrices]


def test_muon_in_bfloat16_is_torch_optim_muon_exactly(tiny_model):
    # the same algorithm, state and arithmetic: only the matrices of one shape go through together
    for name, moved, reference in muon_pair(tiny_model, ns_dtype=torch.bfloat16):
        torch.testing.assert_close(moved, reference, rtol=0, atol=0, msg=name)
    assert len({p.shape for _, p, _ in muon_pair(tiny_model)}) < len(muon_pair(tiny_model))  # batched


def test_muon_on_cpu_orthogonalises_in_float32(tiny_model):
    # float32 is more precise than torch's bf16: a step moves each matrix in the same direction by
    # the same amount, up to bf16's rounding inside the iteration
    for name, moved, reference in muon_pair(tiny_model, steps=1):
        assert not torch.equal(moved, reference)
        cosine = torch.nn.functional.cosine_similarity(moved.flatten(), reference.flatten(), dim=0)
        assert cosine > 0.99 and 0.95 < moved.norm() / reference.norm() < 1.05, (name, cosine)


def test_orthogonalize_pushes_every_singular_value_towards_one():
    g = torch.randn(3, 96, 32, generator=torch.Generator().manual_seed(0))  # tall: run on its transpose
    g[1] *= 1e3  # scale does not matter
    out = orthogonalize(g)
    assert out.shape == g.shape and out.dtype == torch.float32
    for matrix, single in zip(out, g):
        values = torch.linalg.svdvals(matrix)
        assert 0.5 < values.min() and values.max() < 1.5
        torch.testing.assert_close(matrix, orthogonalize(single))  # the batch changes nothing
    assert orthogonalize(g, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_muon_refuses_a_non_matrix():
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_a_muon_checkpoint_resumes_exactly(tiny_model, tmp_path):
    def run(model, optimizer, steps):
        return [train_step(model, optimizer, [batch(s)], lr=1e-3).loss for s in steps]

    def build(seed):
        model = tiny_model(seed=seed, tie_embeddings=False)
        return model, configure_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="muon")

    model, optimizer = build(0)
    run(model, optimizer, range(2))
    TrainState(model, optimizer, step=2).save(tmp_path / "ckpt")
    expected = run(model, optimizer, range(2, 4))

    other, other_opt = build(1)
    TrainState.load(tmp_path / "ckpt", other, other_opt)
    assert other_opt.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert run(other, other_opt, range(2, 4)) == expected


def test_an_unknown_optimizer_is_refused(tiny_model):
    with pytest.raises(ValueError, match="^optimizer: 'sgd'"):
        configure_optimizer(tiny_model(), 1e-3, 0.1, optimizer="sgd")


# ----------------------------------------------------------------------------------------------
# warmup-stable-decay


def test_wsd_warms_up_holds_then_decays_linearly():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, schedule="wsd", decay_fraction=0.3)
    assert [lr_at(s, **kw) for s in range(10)] == [lr_at(s, **{**kw, "schedule": "cosine"}) for s in range(10)]
    assert all(lr_at(s, **kw) == 1e-3 for s in range(10, 70))  # held until the last 30 steps
    assert math.isclose(lr_at(70, **kw), 1e-3)
    decay = [lr_at(s, **kw) for s in range(70, 101)]
    assert decay == sorted(decay, reverse=True)
    assert math.isclose(lr_at(85, **kw), (1e-3 + 1e-4) / 2)  # linear: half way at half way
    assert lr_at(100, **kw) == 1e-4 and lr_at(1000, **kw) == 1e-4


def test_wsd_edge_cases():
    # a decay longer than what is left after warmup starts right after warmup
    assert lr_at(5, lr=1.0, min_lr=0.0, warmup_steps=5, max_steps=10, schedule="wsd", decay_fraction=1.0) == 1.0
    assert lr_at(6, lr=1.0, min_lr=0.0, warmup_steps=5, max_steps=10, schedule="wsd", decay_fraction=1.0) == 0.8
    # no decay at all: the peak until max_steps
    assert lr_at(9, lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=10, schedule="wsd", decay_fraction=0.0) == 1.0
    with pytest.raises(ValueError, match="^schedule: 'step'"):
        lr_at(0, lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=10, schedule="step")
    with pytest.raises(ValueError, match="^decay_fraction"):
        lr_at(0, lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=10, schedule="wsd", decay_fraction=1.5)


@settings(max_examples=50, deadline=None)
@given(step=st.integers(0, 3000), warmup=st.integers(0, 300), extra=st.integers(0, 3000),
       ratio=st.floats(0.0, 1.0), fraction=st.floats(0.0, 1.0))
def test_wsd_stays_between_min_and_peak(step, warmup, extra, ratio, fraction):
    value = lr_at(step, lr=1e-3, min_lr=1e-3 * ratio, warmup_steps=warmup, max_steps=warmup + extra,
                  schedule="wsd", decay_fraction=fraction)
    if step < warmup:
        assert 0 < value <= 1e-3
    else:
        assert 1e-3 * ratio * (1 - 1e-12) <= value <= 1e-3 * (1 + 1e-12)
