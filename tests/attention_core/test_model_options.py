"""The options that make a small model learn more per step: ReLU², zero-initialised output projections,
logit soft-capping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attention_core import ConfigError, ForwardContext, ModelConfig, configure_optimizer, train_step


def test_relu2_mlp_squares_the_rectified_hidden_layer(tiny_model):
    model = tiny_model(mlp="relu2")
    mlp = model.h[0].mlp
    assert mlp.c_fc.out_features == 4 * 16  # the width of GELU's MLP: the same parameter count
    x = torch.randn(2, 5, 16)
    expected = mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2)
    torch.testing.assert_close(mlp(x), expected)


def test_zero_initialised_projections_start_every_block_as_the_identity_and_then_learn(tiny_model):
    model = tiny_model(zero_init_proj=True)
    projections = [p for n, p in model.named_parameters() if n.endswith("c_proj.weight")]
    assert len(projections) == 2 * model.config.n_layer and all(not p.any() for p in projections)
    idx = torch.randint(32, (2, 8))
    embedded = model.wte(idx) + model.wpe(torch.arange(8))
    x = embedded
    for block in model.h:
        x, _ = block(x, ForwardContext(is_causal=True))
    torch.testing.assert_close(x, embedded)  # attention and MLP add nothing yet
    optimizer = configure_optimizer(model, 1e-2, 0.0)
    train_step(model, optimizer, [(idx, torch.roll(idx, -1, 1))])
    assert all(p.any() for p in projections)  # their gradients are not zero: they learn at once


@pytest.mark.parametrize("tied", [True, False])
def test_soft_capped_logits_are_the_capped_tanh_of_the_uncapped_ones(tiny_model, tied):
    capped = tiny_model(seed=4, logit_softcap=2.0, tie_embeddings=tied)
    plain = tiny_model(seed=4, tie_embeddings=tied)
    idx = torch.randint(32, (2, 8))
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(5)  # large logits, where the cap bites
        capped.load_state_dict(plain.state_dict())
    raw, _ = plain(idx)
    logits, loss = capped(idx, torch.roll(idx, -1, 1))
    assert raw.abs().max() > 4.0 and logits.abs().max() <= 2.0
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 32), torch.roll(idx, -1, 1).view(-1)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(logit_softcap=0.0), "logit_softcap"),
    (dict(logit_softcap=float("inf")), "logit_softcap"),
    (dict(logit_softcap=True), "logit_softcap"),
    (dict(zero_init_proj="yes"), "zero_init_proj"),
])
def test_invalid_options_name_their_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        ModelConfig(vocab_size=10, **kwargs)


def test_options_round_trip_through_a_dict():
    config = ModelConfig(vocab_size=10, mlp="relu2", zero_init_proj=True, logit_softcap=15.0)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.hidden_dim == 4 * config.n_embd
