"""ModelConfig: valid configurations round-trip through JSON; invalid ones name their field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from attention_core import ConfigError, ModelConfig, Transformer


def test_defaults_round_trip_through_json():
    config = ModelConfig(vocab_size=100)
    assert config.kv_heads == config.n_head and config.head_dim == 32
    restored = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert {f.name for f in dataclasses.fields(ModelConfig)} == set(config.to_dict())


@pytest.mark.parametrize("n_kv_head", [None, 1, 2, 4])
def test_grouped_query_choices(n_kv_head):
    config = ModelConfig(vocab_size=10, n_head=4, n_kv_head=n_kv_head)
    assert config.kv_heads == (4 if n_kv_head is None else n_kv_head)
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kwargs, field", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(block_size=-1), "block_size"),
    (dict(n_layer=True), "n_layer"),  # a bool is not a layer count
    (dict(n_layer=2.0), "n_layer"),
    (dict(n_head=0), "n_head"),
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(n_kv_head=3, n_head=4), "n_kv_head"),
    (dict(n_kv_head=0), "n_kv_head"),
    (dict(pos="alibi"), "pos"),
    (dict(pos="rope", n_embd=24, n_head=8), "pos"),  # head_dim 3: rope rotates pairs
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rope_theta=float("nan")), "rope_theta"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mlp="relu"), "mlp"),
    (dict(mlp_hidden=0), "mlp_hidden"),
    (dict(qk_norm="yes"), "qk_norm"),
    (dict(bias=None), "bias"),
    (dict(tie_embeddings=0), "tie_embeddings"),
    (dict(causal=1), "causal"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(attn_impl="flash"), "attn_impl"),
])
def test_an_invalid_field_is_named_first(kwargs, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**{"vocab_size": 10, **kwargs})
    assert str(err.value).startswith(f"{field}: ")


def test_messages_say_what_is_wrong():
    with pytest.raises(ConfigError, match=r"^n_embd: 30 is not divisible by n_head=4$"):
        ModelConfig(vocab_size=10, n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match=r"^n_kv_head: 3 does not divide n_head=4$"):
        ModelConfig(vocab_size=10, n_kv_head=3)
    assert issubclass(ConfigError, ValueError)


def test_from_dict_names_an_unknown_or_missing_key():
    with pytest.raises(ConfigError, match=r"^n_embed: unknown"):
        ModelConfig.from_dict({"vocab_size": 10, "n_embed": 64})
    with pytest.raises(ConfigError, match=r"^vocab_size: required"):
        ModelConfig.from_dict({"n_layer": 2})
    with pytest.raises(ConfigError, match="model_config"):
        ModelConfig.from_dict([("vocab_size", 10)])


@pytest.mark.parametrize("mlp, n_embd, hidden", [("gelu", 32, 128), ("relu2", 32, 128), ("swiglu", 32, 88),
                                                  ("swiglu", 768, 2048)])
def test_mlp_width(mlp, n_embd, hidden):
    assert ModelConfig(vocab_size=10, mlp=mlp, n_embd=n_embd).hidden_dim == hidden
    assert ModelConfig(vocab_size=10, mlp=mlp, mlp_hidden=40).hidden_dim == 40


def test_vocab_size_may_wait_for_the_tokenizer_but_a_model_needs_it():
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16)  # the pipeline's model section, before the data
    assert config.vocab_size is None
    with pytest.raises(ConfigError, match="vocab_size"):
        Transformer(config)
    built = config.with_vocab(65)
    assert built.vocab_size == 65 and config.vocab_size is None  # a copy
    assert Transformer(built).lm_head.out_features == 65
    with pytest.raises(ConfigError, match="vocab_size"):
        config.with_vocab(0)
