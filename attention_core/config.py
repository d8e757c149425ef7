"""The model's configuration: one plain dataclass, validated when it is built.

`ModelConfig` says everything needed to build a `Transformer`: sizes, the positional scheme,
the normalisation and MLP flavours, grouped-query attention, the initialisation and logit
soft-capping, and whether the model is a causal decoder or a bidirectional encoder. It is also the pipeline's `model` config section (litgpt's way:
the model's own config is the YAML and CLI type), so each field carries its one-line docstring,
and `vocab_size` may stay None until a tokenizer fills it in (`with_vocab`). Every mistake a user
can make is raised as `ConfigError` (a `ValueError`) whose message starts with the name of the
offending field, so a pipeline can point at the exact key. `to_dict` / `from_dict` round-trip
through JSON (checkpoints store it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Position = Literal["learned", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
Mlp = Literal["gelu", "swiglu", "relu2"]
AttnImpl = Literal["fused", "explicit"]
# the allowed values, for checks and messages (typing.get_args without a call at import time)
POSITIONS, NORMS, MLPS, ATTN_IMPLS = Position.__args__, Norm.__args__, Mlp.__args__, AttnImpl.__args__


class ConfigError(ValueError):
    """A configuration a user wrote is invalid; the message starts with the field's name."""


@dataclass
class ModelConfig:
    vocab_size: int | None = None
    """Tokens in the vocabulary; None until the tokenizer is known (a model needs it)."""
    block_size: int = 128
    """Longest context in tokens; learned positions have exactly this many rows."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention): None means n_head, 1 is multi-query; divides n_head."""
    n_embd: int = 128
    """Model width; divisible by n_head."""
    pos: Position = "learned"
    """Position encoding."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm: Norm = "layernorm"
    """Normalisation layer."""
    mlp: Mlp = "gelu"
    """Feed-forward type: gelu (GPT-2), swiglu (LLaMA) or relu2 (ReLU squared, modded-nanogpt)."""
    mlp_hidden: int | None = None
    """MLP hidden width; None: 4*n_embd for gelu and relu2, ~8/3*n_embd (a multiple of 8) for swiglu."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys before attention."""
    bias: bool = False
    """Biases in Linear layers and LayerNorm (GPT-2 had them; not needed)."""
    dropout: float = 0.0
    """Dropout probability, in [0, 1)."""
    tie_embeddings: bool = True
    """The output head shares its weight with the token embedding."""
    zero_init_proj: bool = False
    """Every block's two output projections start at zero, so each block starts as the identity."""
    logit_softcap: float | None = None
    """Cap logits smoothly at +-this (cap * tanh(logits / cap), Gemma 2); None: no cap."""
    causal: bool = True
    """True: decoder language model; False: bidirectional encoder."""
    attn_impl: AttnImpl = "fused"
    """Default attention path of every layer: fused (SDPA kernels) or explicit."""

    def __post_init__(self) -> None:
        if self.vocab_size is not None:
            _check_positive_int("vocab_size", self.vocab_size)
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            _check_positive_int(name, getattr(self, name))
        if self.n_kv_head is not None:
            _check_positive_int("n_kv_head", self.n_kv_head)
            if self.n_head % self.n_kv_head != 0:
                raise ConfigError(
                    f"n_kv_head: {self.n_kv_head} does not divide n_head={self.n_head}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(f"n_embd: {self.n_embd} is not divisible by n_head={self.n_head}")
        _check_choice("pos", self.pos, POSITIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        if self.pos == "rope" and self.head_dim % 2 != 0:
            raise ConfigError(
                f"pos: rope needs an even head dimension, n_embd/n_head = {self.head_dim}")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) \
                or not math.isfinite(self.rope_theta) or self.rope_theta <= 0:
            raise ConfigError(f"rope_theta: {self.rope_theta!r} must be a positive number")
        if self.mlp_hidden is not None:
            _check_positive_int("mlp_hidden", self.mlp_hidden)
        if self.logit_softcap is not None and (
                isinstance(self.logit_softcap, bool) or not isinstance(self.logit_softcap, (int, float))
                or not math.isfinite(self.logit_softcap) or self.logit_softcap <= 0):
            raise ConfigError(f"logit_softcap: {self.logit_softcap!r} must be a positive number or null")
        for name in ("qk_norm", "bias", "tie_embeddings", "zero_init_proj", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: {getattr(self, name)!r} must be true or false")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: {self.dropout!r} must be a number in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads, with None resolved to n_head."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_dim(self) -> int:
        """Width of the MLP's hidden layer."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp in ("gelu", "relu2"):
            return 4 * self.n_embd
        # SwiGLU has three matrices instead of two: 2/3 of 4*n_embd keeps the parameter count of
        # the GELU MLP (LLaMA's choice), rounded up to a multiple of 8 for friendlier matmuls.
        return 8 * math.ceil(8 * self.n_embd / 3 / 8)

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        """A copy with vocab_size filled in (from the tokenizer), validated again."""
        return dataclasses.replace(self, vocab_size=vocab_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (None stays None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict such as `to_dict` writes; an unknown key raises ConfigError naming it."""
        if not isinstance(d, dict):
            raise ConfigError(f"model_config: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(f"{key}: unknown ModelConfig field")
        if "vocab_size" not in d:
            raise ConfigError("vocab_size: required")
        return cls(**d)


def _check_positive_int(name: str, value: Any) -> None:
    # bool is a subclass of int: `n_layer=True` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: {value!r} must be a positive integer")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
