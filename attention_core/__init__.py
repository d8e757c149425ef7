"""attention_core: a self-attention transformer in pure PyTorch, and the primitives to train it.

The package holds the model (`ModelConfig`, `Transformer`), sampling (`generate`), and what a
training loop needs without any orchestration framework (`configure_optimizer` with AdamW or Muon,
`lr_at`, `train_step`, `TrainState`). It imports torch, the standard library and safetensors only, and does
nothing at import time. Read it in this order: config.py, attention.py, model.py, generation.py,
wrappers.py, optim.py, training.py.

Importing the package imports its config alone: `ModelConfig` needs no torch, so a program checks a
configuration (and refuses a bad one) before paying seconds for torch's import. Every other name is
imported, with torch, on the first use of any of them (PEP 562's module `__getattr__`).
"""

from __future__ import annotations

from .config import ConfigError, ModelConfig

__all__ = [
    "ConfigError",
    "ForwardContext",
    "KVCache",
    "ModelConfig",
    "Muon",
    "MuonWithAdamW",
    "SelfAttention",
    "StepResult",
    "TrainState",
    "Transformer",
    "apply_rope",
    "attention_bias",
    "configure_optimizer",
    "generate",
    "load_model",
    "load_weights",
    "lr_at",
    "orthogonalize",
    "peak_flops",
    "rope_angles",
    "sample_next_token",
    "save_model",
    "save_weights",
    "train_step",
    "unwrap_model",
]


def __getattr__(name: str):
    """The names that need torch (each module's public names listed in __all__), all bound on the
    first use of any of them."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import attention, generation, model, optim, training, wrappers

    for module in (attention, generation, model, optim, training, wrappers):
        globals().update((k, v) for k, v in vars(module).items() if k in __all__)
    if name not in globals():  # a name added to __all__ without its module in the line above
        raise AttributeError(f"module {__name__!r}: {name!r} is in __all__ but none of its modules defines it")
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(__all__)
