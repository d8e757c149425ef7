"""Generation: the KV cache changes nothing, padding changes nothing, the window slides, sampling obeys its knobs."""

from __future__ import annotations

import functools

import pytest
import torch

from attention_core import generate, unwrap_model


@pytest.fixture
def model_for(tiny_model):
    """The tiny model with block_size 8, so that a few new tokens already run past it."""
    return functools.partial(tiny_model, block_size=8)


OPTION_SETS = [
    dict(),
    dict(pos="rope"),
    dict(pos="rope", n_kv_head=1, qk_norm=True, mlp="swiglu", norm="rmsnorm"),
    dict(n_head=4, n_kv_head=2, bias=True, tie_embeddings=False),
]


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), 31, dtype=torch.long)  # the pad id is arbitrary: it is masked
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):], mask[b, T - len(p):] = p, 1
    return idx, mask


@pytest.mark.parametrize("options", OPTION_SETS)
def test_greedy_with_cache_equals_full_recomputation(model_for, options):
    model = model_for(**options)
    prompt = torch.randint(32, (2, 3))
    # 3 + 15 tokens runs well past block_size = 8: learned positions slide, rope keeps its cache
    cached = generate(model, prompt, 15, temperature=0)
    recomputed = generate(model, prompt, 15, temperature=0, use_cache=False)
    assert cached.shape == (2, 18)
    assert torch.equal(cached, recomputed)


def test_cached_logits_equal_full_logits(model_for):
    model = model_for(pos="rope", n_head=4, n_kv_head=2).eval()
    idx = torch.randint(32, (2, 12))  # longer than block_size: rope has no limit
    full, _ = model(idx)
    cache = model.make_kv_cache(2, 12)
    steps = [model(idx[:, :5], kv_cache=cache)[0]]
    steps += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_len"):
        model(idx[:, :1], kv_cache=cache)


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_continues_each_prompt_as_if_alone(model_for, options, use_cache):
    model = model_for(**options)
    prompts = [torch.randint(31, (n,)) for n in (2, 6, 4)]
    idx, mask = left_pad(prompts)
    n_new = 10  # 6 + 10 crosses block_size = 8 for every row
    batched = generate(model, idx, n_new, temperature=0, attention_mask=mask, use_cache=use_cache)
    for b, p in enumerate(prompts):
        alone = generate(model, p[None], n_new, temperature=0, use_cache=use_cache)
        assert torch.equal(batched[b, idx.size(1):], alone[0, len(p):]), f"row {b}"


def test_an_all_ones_mask_changes_nothing(model_for):
    model = model_for()
    idx = torch.randint(32, (3, 5))
    plain = generate(model, idx, 6, temperature=0)
    masked = generate(model, idx, 6, temperature=0, attention_mask=torch.ones(3, 5, dtype=torch.bool))
    assert torch.equal(plain, masked)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_generation_runs_far_past_block_size(model_for, pos):
    model = model_for(pos=pos)
    out = generate(model, torch.randint(32, (1, 6)), 30, temperature=1.0, top_k=5, seed=0)
    assert out.shape == (1, 36)


def test_learned_positions_slide_a_window_of_block_size(model_for):
    model = model_for().eval()
    prompt = torch.randint(32, (1, 13))  # already longer than block_size = 8
    out = generate(model, prompt, 1, temperature=0)
    expected = model(prompt[:, -8:])[0][:, -1].argmax(dim=-1)
    assert out[0, -1] == expected[0]


def test_a_seed_uses_its_own_generator_and_leaves_the_global_rng_alone(model_for):
    model = model_for()
    prompt = torch.randint(32, (4, 3))
    state = torch.get_rng_state()
    a = generate(model, prompt, 12, temperature=1.0, seed=123)
    b = generate(model, prompt, 12, temperature=1.0, seed=123)
    c = generate(model, prompt, 12, temperature=1.0, seed=124)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_and_a_tiny_top_p_are_greedy(model_for):
    model = model_for()
    prompt = torch.randint(32, (3, 4))
    greedy = generate(model, prompt, 8, temperature=0)
    assert torch.equal(generate(model, prompt, 8, temperature=0.7, top_k=1, seed=0), greedy)
    assert torch.equal(generate(model, prompt, 8, temperature=0.7, top_p=1e-6, seed=0), greedy)


@pytest.mark.parametrize("knob", [dict(top_k=3), dict(top_p=0.2)])
def test_sampling_stays_inside_the_allowed_set(model_for, knob):
    model = model_for().eval()
    model.lm_head.weight.data.mul_(100)  # sharpen the distribution so top_p=0.2 keeps few tokens
    prompt = torch.randint(32, (1, 4)).repeat(256, 1)
    out = generate(model, prompt, 1, temperature=1.0, seed=0, **knob)
    probs = model(prompt[:1])[0][0, -1].softmax(-1)
    order = probs.argsort(descending=True)
    if "top_k" in knob:
        allowed = set(order[:3].tolist())
    else:  # the smallest prefix whose mass reaches 0.2
        n = int((probs[order].cumsum(0) < 0.2).sum()) + 1
        allowed = set(order[:n].tolist())
    assert set(out[:, -1].tolist()) <= allowed


def test_finished_rows_keep_emitting_eos(model_for):
    model = model_for()
    prompt = torch.randint(32, (3, 4))
    greedy = generate(model, prompt, 10, temperature=0)
    eos = int(greedy[0, 6])  # row 0 emits this as its third new token
    out = generate(model, prompt, 10, temperature=0, eos_token=eos)
    assert out.shape == greedy.shape
    for b in range(3):
        hits = (greedy[b, 4:] == eos).nonzero()
        if len(hits) == 0:
            assert torch.equal(out[b], greedy[b])
        else:
            first = 4 + int(hits[0])
            assert torch.equal(out[b, :first + 1], greedy[b, :first + 1])
            assert (out[b, first:] == eos).all()


def test_all_rows_finished_still_fills_max_new_tokens(model_for):
    model = model_for()
    prompt = torch.randint(32, (2, 3))
    first = generate(model, prompt, 1, temperature=0)[:, -1]
    eos = int(first[0])
    out = generate(model, prompt[:1], 9, temperature=0, eos_token=eos)
    assert out.shape == (1, 12) and (out[0, 3:] == eos).all()


def test_shapes_modes_and_wrappers(model_for):
    model = model_for()
    model.train()
    out = model.generate(torch.randint(32, (5,)), 4, temperature=0)  # a 1-D prompt gives a 1-D result
    assert out.shape == (9,)
    assert model.training  # restored
    compiled = torch.compile(model)  # not called: only unwrapped
    assert unwrap_model(compiled) is model
    assert torch.equal(generate(compiled, out[None, :5], 4, temperature=0)[0], out)
    assert generate(model, out[None, :5], 0).shape == (1, 5)


def test_invalid_requests_are_named(model_for):
    prompt = torch.randint(32, (1, 3))
    with pytest.raises(ValueError, match="causal"):
        generate(model_for(causal=False), prompt, 2)
    model = model_for()
    for kwargs, name in [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                         (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                         (dict(attention_mask=torch.ones(1, 4)), "attention_mask")]:
        with pytest.raises(ValueError, match=name):
            generate(model, prompt, 2, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, -1)
