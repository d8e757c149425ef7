"""The KV cache follows what is generated, never what was asked for: a huge max_new_tokens allocates nothing big."""

from __future__ import annotations

import pytest
import torch

from attention_core import generate


class Stop(Exception):
    """Raised from a forward hook: the generation loop is cut short after a few steps."""


def record_cache_sizes(model, stop_after: int | None = None) -> list[int]:
    """max_len of every cache the model makes from now on; generation stops after stop_after forward calls.

    A request beyond a million positions fails here, before the allocation (the tiny model's cache
    for 10**9 positions would take 64 GB per tensor)."""
    sizes: list[int] = []
    make = model.make_kv_cache

    def spy(batch_size, max_len, **kwargs):
        sizes.append(max_len)
        assert max_len <= 10**6, f"a KV cache of {max_len} positions"
        return make(batch_size, max_len, **kwargs)

    model.make_kv_cache = spy
    if stop_after is not None:
        calls = []

        def hook(module, args, output):
            calls.append(1)
            if len(calls) >= stop_after:
                raise Stop

        model.register_forward_hook(hook)
    return sizes


@pytest.mark.parametrize("pos, bound", [("learned", 16), ("rope", 3 + 16)])
def test_a_billion_new_tokens_preallocate_only_the_window(tiny_model, pos, bound):
    model = tiny_model(pos=pos)  # block_size 16
    sizes = record_cache_sizes(model, stop_after=5)
    with pytest.raises(Stop):
        generate(model, torch.randint(32, (1, 3)), 10**9, temperature=0)
    assert sizes == [bound]


def test_a_rope_cache_doubles_as_the_sequence_grows(tiny_model):
    model = tiny_model(pos="rope", block_size=8)
    prompt = torch.randint(32, (2, 3))
    sizes = record_cache_sizes(model)
    cached = generate(model, prompt, 25, temperature=0)
    # prompt + block_size first, then doubled, and never past prompt + max_new_tokens
    assert sizes == [11, 22, 28]
    assert torch.equal(cached, generate(model, prompt, 25, temperature=0, use_cache=False))


def test_a_short_request_caches_only_itself(tiny_model):
    for pos in ("learned", "rope"):
        model = tiny_model(pos=pos)
        sizes = record_cache_sizes(model)
        generate(model, torch.randint(32, (1, 3)), 4, temperature=0)
        assert sizes == [7], pos
