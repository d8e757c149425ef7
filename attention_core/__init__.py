"""attention_core: a self-attention transformer in pure PyTorch, and the primitives to train it.

The package holds the model (`ModelConfig`, `Transformer`), sampling (`generate`), and what a
training loop needs without any orchestration framework (`configure_optimizer`, `lr_at`,
`train_step`, `TrainState`). It imports torch, the standard library and safetensors only, and does
nothing at import time. Read it in this order: config.py, attention.py, model.py, generation.py,
wrappers.py, training.py.
"""

from .attention import ForwardContext, KVCache, SelfAttention, apply_rope, attention_bias, rope_angles
from .config import ConfigError, ModelConfig
from .generation import generate, sample_next_token
from .model import Transformer
from .training import (
    StepResult,
    TrainState,
    configure_optimizer,
    load_model,
    load_weights,
    lr_at,
    peak_flops,
    save_model,
    save_weights,
    train_step,
)
from .wrappers import unwrap_model

__all__ = [
    "ConfigError",
    "ForwardContext",
    "KVCache",
    "ModelConfig",
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
    "peak_flops",
    "rope_angles",
    "sample_next_token",
    "save_model",
    "save_weights",
    "train_step",
    "unwrap_model",
]
