"""Self-attention: the fused and explicit paths agree, GQA reduces to MHA, RoPE is relative, masks are sound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_core import Transformer, apply_rope, attention_bias, rope_angles
from attention_core.attention import causal_mask


def padding_mask(lengths: list[int], T: int, side: str) -> torch.Tensor:
    """(B, T) long mask with lengths[b] real tokens on the given side ("left" or "right")."""
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    return mask


@st.composite
def attention_cases(draw):
    n_head = draw(st.sampled_from([1, 2, 4]))
    n_kv_head = draw(st.sampled_from([d for d in (1, 2, 4) if n_head % d == 0]))
    head_dim = draw(st.sampled_from([4, 8]))
    options = dict(  # the overrides of the tiny config: a strategy cannot take the fixture itself
        n_head=n_head, n_kv_head=n_kv_head, n_embd=n_head * head_dim, block_size=16,
        pos=draw(st.sampled_from(["learned", "rope"])), norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        mlp=draw(st.sampled_from(["gelu", "swiglu"])), qk_norm=draw(st.booleans()), bias=draw(st.booleans()),
        causal=draw(st.booleans()), tie_embeddings=draw(st.booleans()))
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, options["block_size"]))
    padding = draw(st.sampled_from(["none", "left", "right", "holes"]))
    mask = None
    if padding in ("left", "right"):
        mask = padding_mask(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)), T, padding)
    elif padding == "holes":  # an arbitrary key-padding mask with at least one real token per row
        rows = draw(st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B))
        mask = torch.tensor(rows, dtype=torch.bool)
        mask[:, -1] = True
    split = draw(st.integers(0, T - 1))  # for the KV-cache check: prefill `split` tokens, then the rest
    return options, B, T, mask, split, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(case=attention_cases())
def test_fused_equals_explicit_for_every_option(tiny, case):
    options, B, T, mask, split, seed = case
    config = tiny(**options)
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    idx = torch.randint(config.vocab_size, (B, T))
    fused, _ = model(idx, attention_mask=mask, attn_impl="fused")
    explicit, _ = model(idx, attention_mask=mask, attn_impl="explicit")
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)

    if config.causal and split > 0:
        # the same through a KV cache: prefill `split` tokens, then the remaining ones at once
        for impl in ("fused", "explicit"):
            cache = model.make_kv_cache(B, T)
            first, _ = model(idx[:, :split], attention_mask=None if mask is None else mask[:, :split],
                             kv_cache=cache, attn_impl=impl)
            rest, _ = model(idx[:, split:], attention_mask=mask, kv_cache=cache, attn_impl=impl)
            torch.testing.assert_close(torch.cat((first, rest), dim=1), explicit, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_module_default_path_equals_per_call_choice(tiny, causal):
    torch.manual_seed(0)
    fused_model = Transformer(tiny(causal=causal, attn_impl="fused"))
    explicit_model = Transformer(tiny(causal=causal, attn_impl="explicit"))
    explicit_model.load_state_dict(fused_model.state_dict())
    idx = torch.randint(32, (2, 10))
    by_module, _ = explicit_model(idx)
    by_call, _ = fused_model(idx, attn_impl="explicit")
    assert torch.equal(by_module, by_call)
    with pytest.raises(ValueError, match="attn_impl"):
        fused_model(idx, attn_impl="flash")


def test_gqa_with_as_many_kv_heads_as_heads_is_multi_head_attention(tiny_model):
    mha = tiny_model(n_head=4, n_kv_head=None)
    gqa = tiny_model(n_head=4, n_kv_head=4)
    idx = torch.randint(32, (2, 12))
    assert all(torch.equal(a, b) for a, b in zip(mha.state_dict().values(), gqa.state_dict().values()))
    assert torch.equal(mha(idx)[0], gqa(idx)[0])


@pytest.mark.parametrize("n_kv_head", [1, 2])
@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
def test_gqa_equals_mha_with_key_value_heads_repeated(tiny, n_kv_head, attn_impl):
    """A GQA model computes what an MHA model computes when each group's K/V weights are copied to its heads."""
    torch.manual_seed(0)
    config = tiny(n_head=4, n_kv_head=n_kv_head, pos="rope", qk_norm=True, bias=True)
    gqa = Transformer(config)
    mha = Transformer(tiny(n_head=4, n_kv_head=4, pos="rope", qk_norm=True, bias=True))
    state = dict(gqa.state_dict())
    nh, hs, rep = 4, config.head_dim, 4 // n_kv_head
    for i in range(config.n_layer):
        for suffix in ("weight", "bias"):
            name = f"h.{i}.attn.c_attn.{suffix}"
            q, k, v = state[name].split([nh * hs, n_kv_head * hs, n_kv_head * hs], dim=0)
            # kv head j serves query heads j*rep .. j*rep + rep - 1
            k = k.view(n_kv_head, hs, -1).repeat_interleave(rep, dim=0).reshape(nh * hs, *k.shape[1:])
            v = v.view(n_kv_head, hs, -1).repeat_interleave(rep, dim=0).reshape(nh * hs, *v.shape[1:])
            state[name] = torch.cat((q, k, v), dim=0)
    mha.load_state_dict(state)
    idx = torch.randint(32, (2, 12))
    torch.testing.assert_close(gqa(idx, attn_impl=attn_impl)[0], mha(idx, attn_impl=attn_impl)[0],
                               atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(shift=st.integers(1, 2000), T=st.integers(1, 12), head_dim=st.sampled_from([2, 8, 16]),
       seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_relative_position(shift, T, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, T, head_dim, generator=g)
    k = torch.randn(1, 2, T, head_dim, generator=g)
    positions = torch.arange(T)[None]

    def scores(pos):
        cos, sin = rope_angles(pos, head_dim, 10000.0)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-2, -1)

    # float32 angles at position ~2000 carry ~1e-4 rad of rounding; scores are O(head_dim)
    torch.testing.assert_close(scores(positions + shift), scores(positions), atol=2e-3, rtol=1e-4)


def test_rope_rotates_but_preserves_norms():
    x = torch.randn(1, 2, 6, 8)
    cos, sin = rope_angles(torch.arange(6)[None], 8, 10000.0)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is the identity
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("causal", [True, False])
def test_rope_model_is_invariant_to_shifting_all_positions(tiny, causal):
    torch.manual_seed(0)
    model = Transformer(tiny(pos="rope", causal=causal)).eval()
    idx = torch.randint(32, (2, 10))
    positions = torch.arange(10)[None]
    base, _ = model(idx, position_ids=positions)
    shifted, _ = model(idx, position_ids=positions + 37)
    torch.testing.assert_close(shifted, base, atol=1e-5, rtol=1e-4)


def test_causal_mask_with_cached_keys():
    # 2 new queries after 3 cached keys: query 0 sees keys 0..3, query 1 sees keys 0..4
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_attention_bias_takes_the_fast_path_when_nothing_is_masked():
    assert attention_bias(8, 0, True, None) == (None, True)
    assert attention_bias(8, 0, False, None) == (None, False)
    assert attention_bias(1, 5, True, None) == (None, False)
    with pytest.raises(ValueError, match="attention_mask"):
        attention_bias(4, 2, True, torch.ones(1, 4))


@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
def test_rows_of_padding_stay_finite(tiny, attn_impl):
    model = Transformer(tiny()).eval()
    idx = torch.randint(32, (2, 6))
    mask = padding_mask([2, 6], 6, "left")
    logits, _ = model(idx, attention_mask=mask, attn_impl=attn_impl)
    assert torch.isfinite(logits).all()
