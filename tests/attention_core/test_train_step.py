"""Training primitives: optimizer groups, the learning-rate schedule, and one train step."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_core import StepResult, configure_optimizer, lr_at, train_step, unwrap_model


def batch(B=4, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, (B, T), generator=g), torch.randint(32, (B, T), generator=g)


# ----------------------------------------------------------------------------------------------
# configure_optimizer


@pytest.mark.parametrize("options", [dict(), dict(bias=True, tie_embeddings=False, norm="rmsnorm", qk_norm=True)])
def test_weight_decay_only_on_matmul_weights(tiny_model, options):
    model = tiny_model(**options)
    optimizer = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    expected = {n for n, p in model.named_parameters()
                if p.dim() >= 2 and not n.startswith(("wte.", "wpe."))}
    assert decayed == expected
    assert all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight", "lm_head.weight")) for n in decayed)
    assert ("lm_head.weight" in decayed) == (not model.config.tie_embeddings)
    # every parameter exactly once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_optimizer_settings(tiny_model):
    optimizer = configure_optimizer(tiny_model(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-6)
    for group in optimizer.param_groups:
        assert group["lr"] == 3e-4 and group["betas"] == (0.9, 0.99) and group["eps"] == 1e-6
    assert optimizer.param_groups[0]["fused"]  # the fused kernel exists for CPU and CUDA
    assert not configure_optimizer(tiny_model(), 1e-3, 0.1, fused=False).param_groups[0]["fused"]


# ----------------------------------------------------------------------------------------------
# lr_at


def test_warmup_then_cosine_then_floor():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert 0 < lr_at(0, **kw) < 1e-4
    warm = [lr_at(s, **kw) for s in range(11)]
    assert warm == sorted(warm) and warm[-1] == 1e-3
    assert math.isclose(lr_at(60, **kw), (1e-3 + 1e-4) / 2)
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert decay == sorted(decay, reverse=True)
    assert lr_at(110, **kw) == 1e-4 and lr_at(10_000, **kw) == 1e-4


def test_schedule_edge_cases():
    assert lr_at(0, lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=10) == 1.0
    assert lr_at(5, lr=1.0, min_lr=0.1, warmup_steps=5, max_steps=5) == 0.1
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=10)


@settings(max_examples=50, deadline=None)
@given(step=st.integers(0, 5000), warmup=st.integers(0, 500), extra=st.integers(0, 5000),
       lr=st.floats(1e-6, 1.0), ratio=st.floats(0.0, 1.0))
def test_lr_stays_between_min_and_peak(step, warmup, extra, lr, ratio):
    min_lr = lr * ratio
    value = lr_at(step, lr=lr, min_lr=min_lr, warmup_steps=warmup, max_steps=warmup + extra)
    if step < warmup:
        assert 0 < value <= lr
    else:
        assert min_lr * (1 - 1e-12) <= value <= lr * (1 + 1e-12)


# ----------------------------------------------------------------------------------------------
# train_step


def test_accumulating_two_halves_equals_one_whole_batch(tiny_model):
    x, y = batch(B=4)
    whole, halves = tiny_model(), tiny_model()
    opt_whole = configure_optimizer(whole, 1e-2, 0.1)
    opt_halves = configure_optimizer(halves, 1e-2, 0.1)
    r1 = train_step(whole, opt_whole, [(x, y)], grad_clip=0.5)
    r2 = train_step(halves, opt_halves, [(x[:2], y[:2]), (x[2:], y[2:])], grad_clip=0.5)
    assert math.isclose(r1.loss, r2.loss, rel_tol=1e-5)
    assert math.isclose(r1.grad_norm, r2.grad_norm, rel_tol=1e-4)
    assert r1.tokens == r2.tokens == 64
    for a, b in zip(whole.parameters(), halves.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_step_result_reports_loss_norm_and_clips(tiny_model):
    model = tiny_model()
    optimizer = configure_optimizer(model, 1e-3, 0.0)
    x, y = batch()
    with torch.no_grad():
        expected_loss = model(x, y)[1].item()
    result = train_step(model, optimizer, [(x, y)], grad_clip=1e-3, lr=5e-4)
    assert isinstance(result, StepResult)
    assert math.isclose(result.loss, expected_loss, rel_tol=1e-6)
    assert result.grad_norm > 1e-3  # the norm before clipping
    clipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)
    assert all(g["lr"] == 5e-4 for g in optimizer.param_groups)


def test_no_clipping_still_reports_the_norm(tiny_model):
    model = tiny_model()
    optimizer = configure_optimizer(model, 1e-3, 0.0)
    result = train_step(model, optimizer, [batch()], grad_clip=0.0)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert result.grad_norm == pytest.approx(norm, rel=1e-6)


def test_one_host_sync_per_step(tiny_model, monkeypatch):
    model = tiny_model()
    optimizer = configure_optimizer(model, 1e-3, 0.1)
    micro_batches = [batch(B=2, seed=s) for s in range(3)]
    calls = []
    for method in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *a, _o=original, _m=method, **k: calls.append(_m) or _o(self, *a, **k))
    train_step(model, optimizer, micro_batches)
    assert calls == ["tolist"]


def test_bf16_autocast_on_cpu(tiny_model):
    model = tiny_model()
    optimizer = configure_optimizer(model, 1e-3, 0.1)
    result = train_step(model, optimizer, [batch()], autocast_dtype=torch.bfloat16, device_type="cpu")
    assert math.isfinite(result.loss) and math.isfinite(result.grad_norm)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_zero_grad_at_the_start_of_each_step(tiny_model):
    model = tiny_model()
    optimizer = configure_optimizer(model, 0.0, 0.0)  # lr 0: weights and so gradients stay the same
    first = train_step(model, optimizer, [batch()], grad_clip=0.0)
    second = train_step(model, optimizer, [batch()], grad_clip=0.0)
    assert second.grad_norm == pytest.approx(first.grad_norm, rel=1e-6)  # not doubled
    with pytest.raises(ValueError, match="micro_batches"):
        train_step(model, optimizer, [])


class FSDP2Like(nn.Module):
    """Stands in for a module that fully_shard made: records set_requires_gradient_sync calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def set_requires_gradient_sync(self, flag):
        self.calls.append(flag)

    def forward(self, x, y):
        return self.inner(x, y)


def test_gradient_sync_only_on_the_last_micro_batch_fsdp2(tiny_model):
    wrapped = FSDP2Like(tiny_model())
    optimizer = configure_optimizer(wrapped, 1e-3, 0.1)
    train_step(wrapped, optimizer, [batch(B=2), batch(B=2, seed=2), batch(B=2, seed=3)])
    assert wrapped.calls == [False, False, True]


@pytest.fixture
def single_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_accumulates_under_no_sync_and_matches_plain_training(tiny_model, single_process_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    plain = tiny_model()
    ddp = DDP(tiny_model())
    assert unwrap_model(ddp) is ddp.module
    entered = []
    original = ddp.no_sync

    @contextlib.contextmanager
    def spy():
        entered.append(True)
        with original():
            yield

    ddp.no_sync = spy
    micro = [batch(B=2), batch(B=2, seed=2)]
    r_plain = train_step(plain, configure_optimizer(plain, 1e-2, 0.1), micro)
    r_ddp = train_step(ddp, configure_optimizer(ddp, 1e-2, 0.1), micro)
    assert entered == [True]  # the first of two micro-batches skipped the all-reduce
    assert r_ddp.loss == pytest.approx(r_plain.loss, rel=1e-6)
    for a, b in zip(plain.parameters(), ddp.module.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_unwrap_model(tiny_model):
    model = tiny_model()
    assert unwrap_model(model) is model
    assert unwrap_model(torch.compile(model)) is model
    with pytest.raises(TypeError, match="Transformer"):
        unwrap_model(nn.Linear(2, 2))


def test_peak_flops_is_known_only_for_listed_gpus():
    from attention_core import peak_flops

    assert peak_flops(torch.device("cpu")) is None
