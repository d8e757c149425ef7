"""One tiny model for every attention_core test, overridable field by field (litgpt's way).

`tiny(**overrides)` is the config and `tiny_model(seed, **overrides)` the model built from it
under a fixed seed. A test that needs something else (more heads for grouped-query attention, a
short block_size so generation runs past it, dropout) passes just those fields, so what it needs
shows at the call.
"""

from __future__ import annotations

import pytest
import torch

from attention_core import ModelConfig, Transformer

# small enough that a forward pass takes about a millisecond on one CPU core
TINY = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def tiny_transformer(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)  # the same seed gives the same weights, whatever ran before
    return Transformer(tiny_config(**overrides))


@pytest.fixture(scope="session")
def tiny():
    """tiny(**overrides) -> ModelConfig: TINY with the given fields replaced."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(seed=0, **overrides) -> Transformer, initialised after torch.manual_seed(seed)."""
    return tiny_transformer
