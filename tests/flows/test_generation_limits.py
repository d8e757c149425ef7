"""Sampling requests are checked before anything is generated: the limit on new and prompt tokens, the
sampling parameters, prompts a tokenizer cannot encode; the pyfunc turns each mistake into MLflow's
INVALID_PARAMETER_VALUE, and the CLI into one line with exit code 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attention_core import ModelConfig, Transformer, save_model
from flows.errors import UserError
from flows.modelpack import MAX_NEW_TOKENS, check_sampling, default_max_new_tokens_limit, generate_text
from flows.tokenizer import BPETokenizer, ByteTokenizer, new_tokenizer

ALPHABET = "abcdefgh \n"


def tiny(pos: str = "learned", block_size: int = 16) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=len(ALPHABET) + 1, block_size=block_size, n_layer=1, n_head=2,
                                   n_embd=16, pos=pos)).eval()


@pytest.fixture
def model():
    return tiny()


@pytest.fixture
def tok():
    return new_tokenizer("char", ALPHABET)


def never_generates(model):
    def fail(*args, **kwargs):
        raise AssertionError("generation started")

    model.generate = fail
    return model


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=10**9), f"max_new_tokens: 1000000000 must be an integer from 1 to {MAX_NEW_TOKENS}"),
    (dict(max_new_tokens=MAX_NEW_TOKENS + 1), "max_new_tokens: 1025 must be an integer from 1 to 1024"),
    (dict(max_new_tokens=0), "max_new_tokens: 0 "),
    (dict(max_new_tokens=-5), "max_new_tokens: -5 "),
    (dict(max_new_tokens=2.5), "max_new_tokens: 2.5 "),
    (dict(max_new_tokens=True), "max_new_tokens: True "),
    (dict(max_new_tokens="10"), "max_new_tokens: '10' "),
    (dict(max_new_tokens=None), "max_new_tokens: None "),
    (dict(temperature=-0.1), "temperature: -0.1 must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature: nan "),
    (dict(temperature=math.inf), "temperature: inf "),
    (dict(temperature="hot"), "temperature: 'hot' "),
    (dict(temperature=None), "temperature: None "),
    (dict(top_k=-1), "top_k: -1 must be an integer >= 0"),
    (dict(top_k=2.0), "top_k: 2.0 "),
    (dict(seed=2**63), "seed: 9223372036854775808 must be an integer from -2**63 to 2**63-1"),
    (dict(seed=-2**63 - 1), "seed: -9223372036854775809 "),
    (dict(seed=1.5), "seed: 1.5 "),
    (dict(max_new_tokens=5, max_new_tokens_limit=4), "max_new_tokens: 5 must be an integer from 1 to 4"),
    (dict(max_new_tokens_limit=0), "max_new_tokens_limit: 0 must be a positive integer"),
    (dict(max_new_tokens_limit=1e9), "max_new_tokens_limit: 1000000000.0 "),
])
def test_a_bad_parameter_is_named_before_anything_is_generated(model, tok, kwargs, message):
    request = dict(max_new_tokens=4, temperature=0.8, top_k=None, seed=0) | kwargs
    with pytest.raises(UserError) as err:
        generate_text(never_generates(model), tok, ["abc"], **request)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("prompts, message", [
    (["abcΩ"], "prompt: text has characters outside the char vocabulary: 'Ω'"),
    (["abc", "abé"], "prompt 1: text has characters outside the char vocabulary: 'é'"),
    (["a\ud800b"], "prompt: text is not valid Unicode: '\\ud800' at character 1"),
    ([None], "prompt: None is not a string"),
    (["abc", 7], "prompt 1: 7 is not a string"),
    (["a" * 5], "prompt: 5 tokens, more than the 4 allowed (max_new_tokens_limit)"),
])
def test_a_bad_prompt_is_named_before_anything_is_generated(model, tok, prompts, message):
    with pytest.raises(UserError) as err:
        generate_text(never_generates(model), tok, prompts, max_new_tokens=2, max_new_tokens_limit=4)
    assert str(err.value) == message or str(err.value).startswith(message)


def test_every_tokenizer_names_a_lone_surrogate():
    bpe = BPETokenizer.train(iter([["abc abd abe " * 20]]), 300)
    for tokenizer in (new_tokenizer("char", ALPHABET), ByteTokenizer(), bpe):
        with pytest.raises(UserError, match=r"not valid Unicode: '\\ud800' at character 2 \(surrogates not allowed\)"):
            tokenizer.encode("ab\ud800")


def test_the_default_limit_is_the_block_size_or_1024():
    assert default_max_new_tokens_limit(16) == MAX_NEW_TOKENS == 1024
    assert default_max_new_tokens_limit(4096) == 4096
    model = tiny(block_size=2048)  # a model whose positions reach past 1024 may generate that far
    with pytest.raises(UserError, match="from 1 to 2048"):
        generate_text(never_generates(model), new_tokenizer("char", ALPHABET), ["a"], max_new_tokens=2049)


def test_accepted_edges(model, tok):
    """The limit itself, numpy integers (what pandas hands over), 0 and a top_k past the vocabulary (no cut)."""
    kwargs = dict(temperature=1.0, seed=3)
    exact = generate_text(model, tok, ["ab", ""], max_new_tokens=5, max_new_tokens_limit=5, **kwargs)
    assert all(len(t) <= 5 for t in exact)  # a char tokenizer: one character per token (end-of-text: none)
    assert generate_text(model, tok, ["ab"], max_new_tokens=np.int64(5), top_k=np.int64(0), **kwargs) == exact[:1]
    assert generate_text(model, tok, ["ab"], max_new_tokens=5, top_k=10**6, **kwargs) == exact[:1]
    check_sampling(1, 0, 0, -2**63)
    check_sampling(1, 0.0, None, 2**63 - 1, limit=1)


def test_a_configured_limit_far_above_the_default_keeps_the_cache_bounded(tok):
    """max_new_tokens 10**9 allowed by a configured limit: a RoPE model's cache starts at the prompt plus
    block_size (the loop is stopped after a few tokens; the old code asked for 10**9 positions at once)."""
    model = tiny(pos="rope")
    sizes, make = [], model.make_kv_cache

    def spy(batch_size, max_len, **kwargs):
        sizes.append(max_len)
        assert max_len <= 10**6
        return make(batch_size, max_len, **kwargs)

    class Stop(Exception):
        pass

    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    model.make_kv_cache = spy
    model.register_forward_hook(hook)
    with pytest.raises(Stop):
        generate_text(model, tok, ["abc"], max_new_tokens=10**9, max_new_tokens_limit=10**9)
    assert sizes == [3 + 16]


# ------------------------------------------------------------------------------------------ the pyfunc

@pytest.fixture
def pyfunc_model(tmp_path, model, tok):
    """model_config -> AttentionLM loaded from a model pack of the tiny model, as MLflow loads it."""
    from mlflow.pyfunc import PythonModelContext

    from flows.registry.pyfunc import PACK, AttentionLM

    save_model(model, tmp_path / "pack")
    tok.save(tmp_path / "pack" / "tokenizer.json")

    def load(model_config=None):
        lm = AttentionLM()
        lm.load_context(PythonModelContext(artifacts={PACK: str(tmp_path / "pack")}, model_config=model_config))
        return lm

    return load


@pytest.mark.parametrize("prompts, params, message", [
    (["abc"], {"max_new_tokens": 10**9}, "max_new_tokens: 1000000000 must be an integer from 1 to 1024"),
    (["abc"], {"temperature": -1.0}, "temperature: -1.0 "),
    (["abc"], {"top_k": -2}, "top_k: -2 "),
    (["abc"], {"seed": 2**63}, "seed: 9223372036854775808 "),
    (["abc", None], {}, "prompt 1: nan is not a string"),  # pandas holds a missing string as nan
    (["abcΩ"], {}, "prompt: text has characters outside the char vocabulary: 'Ω'"),
])
def test_the_pyfunc_answers_invalid_parameter_value(pyfunc_model, prompts, params, message):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    lm = pyfunc_model()
    with pytest.raises(MlflowException) as err:
        lm.predict(None, pd.DataFrame({0: prompts}), params=params)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert err.value.get_http_status_code() == 400
    assert err.value.message.startswith(message)
    assert len(lm.predict(None, pd.DataFrame({0: ["abc"]}), params={"max_new_tokens": 3})[0]) == 3  # still serves


def test_the_pyfunc_limit_comes_from_model_config(pyfunc_model):
    from mlflow.exceptions import MlflowException

    assert pyfunc_model().max_new_tokens_limit == 1024
    lm = pyfunc_model({"max_new_tokens_limit": 3})
    assert len(lm.predict(None, ["ab"], params={"max_new_tokens": 3})[0]) == 3
    with pytest.raises(MlflowException, match="max_new_tokens: 4 must be an integer from 1 to 3"):
        lm.predict(None, ["ab"], params={"max_new_tokens": 4})
    assert pyfunc_model({"max_new_tokens_limit": 5000}).max_new_tokens_limit == 5000
    with pytest.raises(MlflowException, match="model_config: max_new_tokens_limit: '5000' must be a positive integer"):
        pyfunc_model({"max_new_tokens_limit": "5000"})
