"""The Transformer: causality, padding invariance, gradients, initialisation, sizes, maps, compilation."""

from __future__ import annotations

import math

import pytest
import torch

from attention_core import ModelConfig, Transformer, configure_optimizer, train_step

OPTION_SETS = [
    dict(),
    dict(pos="rope", norm="rmsnorm", mlp="swiglu"),
    dict(pos="rope", qk_norm=True, n_head=4, n_kv_head=2, bias=True),
    dict(n_kv_head=1, tie_embeddings=False, mlp="swiglu", qk_norm=True),
    dict(pos="rope", mlp="relu2", tie_embeddings=False, logit_softcap=5.0),
]


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
@pytest.mark.parametrize("padded", [False, True])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(tiny_model, options, attn_impl, padded):
    model = tiny_model(**options).eval()
    idx = torch.randint(32, (2, 12))
    mask = None
    if padded:
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, :3] = 0  # three tokens of left padding in row 0
    t = 7
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 32
    before, _ = model(idx, attention_mask=mask, attn_impl=attn_impl)
    after, _ = model(changed, attention_mask=mask, attn_impl=attn_impl)
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, t:], before[:, t:])


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_an_encoder_sees_the_future(tiny_model, pos):
    model = tiny_model(causal=False, pos=pos).eval()
    idx = torch.randint(32, (1, 12))
    changed = idx.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 32
    assert not torch.allclose(model(idx)[0][:, 0], model(changed)[0][:, 0])


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
def test_left_padding_does_not_change_a_decoder_prompt(tiny_model, options, attn_impl):
    model = tiny_model(**options).eval()
    prompts = [torch.randint(32, (n,)) for n in (3, 9, 6)]
    T = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):], mask[b, T - len(p):] = p, True
    batched, _ = model(idx, attention_mask=mask, attn_impl=attn_impl)
    for b, p in enumerate(prompts):
        alone, _ = model(p[None], attn_impl=attn_impl)
        torch.testing.assert_close(batched[b, T - len(p):], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
def test_an_encoder_ignores_padding(tiny_model, pos, attn_impl):
    model = tiny_model(causal=False, pos=pos).eval()
    idx = torch.randint(32, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0  # right padding
    out, _ = model(idx, attention_mask=mask, attn_impl=attn_impl)
    alone, _ = model(idx[:1, :6], attn_impl=attn_impl)
    torch.testing.assert_close(out[0, :6], alone[0], atol=1e-5, rtol=0)
    other_pad = idx.clone()
    other_pad[0, 6:] = (other_pad[0, 6:] + 5) % 32  # what sits under the padding does not matter
    out2, _ = model(other_pad, attention_mask=mask, attn_impl=attn_impl)
    torch.testing.assert_close(out2[0, :6], out[0, :6], atol=1e-6, rtol=0)
    hidden = model.encode(idx, attention_mask=mask, attn_impl=attn_impl)
    assert hidden.shape == (2, 10, 16)  # n_embd


@pytest.mark.parametrize("options", OPTION_SETS + [dict(causal=False, bias=True, norm="rmsnorm")])
def test_every_parameter_receives_gradient(tiny_model, options):
    model = tiny_model(**options)
    idx = torch.randint(32, (3, 16))  # T = block_size: every learned position is used
    _, loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.slow
def test_a_tiny_model_overfits_one_batch(tiny_model):
    model = tiny_model()
    optimizer = configure_optimizer(model, lr=1e-2, weight_decay=0.0)
    x = torch.randint(32, (4, 16))
    y = torch.randint(32, (4, 16))
    first = train_step(model, optimizer, [(x, y)]).loss
    for _ in range(150):
        last = train_step(model, optimizer, [(x, y)]).loss
    assert first > 3.0  # about ln(32) = 3.47 at initialisation
    assert last < 0.05


def test_targets_of_minus_one_are_ignored(tiny_model):
    model = tiny_model()
    idx = torch.randint(32, (2, 8))
    targets = torch.randint(32, (2, 8))
    masked = targets.clone()
    masked[:, :5] = -1
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 32), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    full, no_loss = model(idx)
    assert full.shape == (2, 8, 32) and no_loss is None


def test_gpt2_initialisation_scales_residual_projections(tiny):
    torch.manual_seed(0)
    n_layer = 8
    model = Transformer(tiny(n_layer=n_layer, n_embd=64, vocab_size=256))
    stds = {name: p.std().item() for name, p in model.named_parameters() if p.dim() == 2}
    for name, std in stds.items():
        expected = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
        assert abs(std - expected) < 0.1 * expected, name
    for name, p in model.named_parameters():
        if name.endswith("ln_1.weight"):
            assert torch.equal(p, torch.ones_like(p))


def test_tied_and_untied_embeddings(tiny):
    tied = Transformer(tiny())
    untied = Transformer(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight


def test_gpt2_small_has_gpt2s_parameter_count_and_flops():
    config = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)
    with torch.device("meta"):  # no memory, no initialisation work
        model = Transformer(config)
    assert model.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, as published
    N = 124_439_808 - 1024 * 768  # nanoGPT reports 123.65M: position embeddings left out
    assert model.num_params() == N
    assert model.flops_per_token() == 6 * N + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize("options", [dict(), dict(pos="rope"), dict(tie_embeddings=False)])
def test_num_params_leaves_out_only_lookup_tables(tiny, options):
    model = Transformer(tiny(**options))
    total = sum(p.numel() for p in model.parameters())
    # block_size x n_embd position embeddings, vocab_size x n_embd token embeddings
    lookups = (16 * 16 if model.wpe is not None else 0) + (0 if model.config.tie_embeddings else 32 * 16)
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - lookups


@pytest.mark.parametrize("options", [dict(n_head=4), dict(pos="rope", n_head=4, n_kv_head=2, qk_norm=True)])
def test_attention_maps_are_causal_distributions(tiny_model, options):
    model = tiny_model(**options)
    idx = torch.randint(32, (10,))
    maps = model.attention_maps(idx)
    assert maps.shape == (2, 4, 10, 10) and maps.dtype == torch.float32
    torch.testing.assert_close(maps.sum(dim=-1), torch.ones(2, 4, 10))
    assert torch.equal(maps.triu(diagonal=1), torch.zeros_like(maps))
    assert model.training  # restored after the eval-mode pass
    torch.testing.assert_close(model.attention_maps(idx[None]), maps)
    with pytest.raises(ValueError, match="one sequence"):
        model.attention_maps(torch.randint(32, (2, 10)))


def test_encoder_attention_maps_are_full_distributions(tiny):
    model = Transformer(tiny(causal=False))
    maps = model.attention_maps(torch.randint(32, (6,)))
    torch.testing.assert_close(maps.sum(dim=-1), torch.ones(2, 2, 6))  # (n_layer, n_head, T)
    assert (maps > 0).all()  # every query sees every key, later ones too


def test_attention_maps_match_a_hand_computed_first_layer(tiny_model):
    model = tiny_model()  # n_head=2, n_embd=16: head_dim 8
    idx = torch.randint(32, (5,))
    maps = model.attention_maps(idx)
    x = model.h[0].ln_1(model.wte(idx) + model.wpe(torch.arange(5)))  # (T, C)
    q, k, _ = model.h[0].attn.c_attn(x).split(16, dim=-1)
    q, k = q.view(5, 2, 8).transpose(0, 1), k.view(5, 2, 8).transpose(0, 1)  # (nh, T, hs)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(maps[0], scores.softmax(dim=-1), atol=1e-6, rtol=0)


def test_learned_positions_refuse_more_than_block_size_but_rope_does_not(tiny):
    idx = torch.randint(32, (1, 20))
    with pytest.raises(ValueError, match="block_size"):
        Transformer(tiny())(idx)
    logits, _ = Transformer(tiny(pos="rope"))(idx)
    assert logits.shape == (1, 20, 32)


def test_bad_input_shapes_are_named(tiny):
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="idx"):
        model(torch.randint(32, (8,)))
    with pytest.raises(ValueError, match="kv_cache"):
        Transformer(tiny(causal=False))(torch.randint(32, (1, 4)), kv_cache=model.make_kv_cache(1, 8))
    with pytest.raises(TypeError, match="config"):
        Transformer(dict(vocab_size=32))


COMPILE_CASES = [
    (dict(), False),
    (dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, n_kv_head=2), False),
    (dict(causal=False, pos="rope", dropout=0.1), True),
]


@pytest.mark.slow
@pytest.mark.parametrize("options, with_mask", COMPILE_CASES)
def test_forward_and_backward_trace_as_one_graph(tiny_model, options, with_mask):
    """fullgraph=True raises at the first graph break; aot_eager also traces the backward."""
    torch._dynamo.reset()
    model = tiny_model(**options)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(32, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    kwargs = dict(attention_mask=mask) if with_mask else {}
    for impl in ("fused", "explicit"):
        _, loss = compiled(idx, idx, attn_impl=impl, **kwargs)
        loss.backward()
        if model.config.dropout == 0:
            torch.testing.assert_close(loss, model(idx, idx, attn_impl=impl, **kwargs)[1])


@pytest.mark.slow
def test_inductor_compiles_the_training_step_without_graph_breaks(tiny_model):
    torch._dynamo.reset()
    model = tiny_model(n_layer=1, block_size=8)
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(32, (2, 8))
    _, loss = compiled(idx, idx)
    loss.backward()
    torch.testing.assert_close(loss, model(idx, idx)[1], atol=1e-5, rtol=1e-5)
