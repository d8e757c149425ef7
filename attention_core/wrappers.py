"""Finding the model inside the wrappers that parallelism and compilation put around it.

Training wraps a `Transformer` in `torch.compile` (`._orig_mod`) and DDP (`.module`); saving weights,
reading the config and sampling all want the model underneath. `strip_wrappers` peels any module;
`unwrap_model` also checks that what it found is a Transformer. This module sits below both
model.py and generation.py so that neither has to import the other for it: it recognises a
Transformer by its `ModelConfig` rather than by its class, which would need model.py.
"""

from __future__ import annotations

import torch.nn as nn

from .config import ModelConfig


def strip_wrappers(model: nn.Module) -> nn.Module:
    """Peel torch.compile and DDP wrappers off any module. (FSDP2 shards in place: nothing to peel.)"""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Transformer inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    inner = strip_wrappers(model)
    # a Transformer is the module whose config is a ModelConfig (see the module docstring for why
    # not isinstance(inner, Transformer))
    if not isinstance(getattr(inner, "config", None), ModelConfig):
        raise TypeError(f"model: expected a Transformer (possibly wrapped), got {type(model).__name__}")
    return inner
