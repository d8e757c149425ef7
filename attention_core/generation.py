"""Autoregressive sampling with a KV cache: greedy, temperature, top-k and top-p (nucleus).

`generate` feeds the prompt once, then one token at a time, reusing every earlier key and value
from a `KVCache` instead of recomputing the whole sequence. The result is the same as full
recomputation token for token (a test checks it). A batch of prompts of different lengths is
given left-padded with an `attention_mask`; positions count real tokens only, so each row
continues exactly as its prompt would alone. Past `block_size`, a model with learned positions has
no embedding for the next position, so it slides the window: each further token is computed from
scratch on the last `block_size` tokens (no cache, since every position shifts at each step).
A RoPE model has no such limit and keeps going with its cache. The cache is never preallocated for
the whole request: a learned-position model's holds at most `block_size` positions, a RoPE model's
starts at the prompt plus `block_size` and doubles as the sequence grows, so memory follows what is
generated, not what was asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .wrappers import unwrap_model


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token: int | None = None, attention_mask: torch.Tensor | None = None, *,
             use_cache: bool = True) -> torch.Tensor:
    """Continue each row of idx (B, T) by max_new_tokens tokens -> (B, T + max_new_tokens).

    temperature 0 is greedy (argmax). top_k keeps the k likeliest tokens, top_p the smallest set
    whose probability reaches p. seed samples from a local torch.Generator (the global RNG is left
    alone); None uses the global RNG. Once a row emits eos_token it keeps emitting it. An (T,)
    prompt gives a (T + max_new_tokens,) result. The model runs in eval mode and is put back after.
    """
    model = unwrap_model(model)
    cfg = model.config
    if not cfg.causal:
        raise ValueError("model: generate needs a causal model (config.causal is False)")
    _check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    squeeze = idx.dim() == 1
    if squeeze:
        idx = idx[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx: expected a non-empty (B, T) prompt, got {tuple(idx.shape)}")
    B, T = idx.size()
    mask = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask: expected shape {(B, T)}, got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(device=idx.device, dtype=torch.bool)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)

    # learned positions exist only for the last block_size tokens; RoPE has no limit
    window = cfg.block_size if cfg.pos == "learned" else None
    total = T + max_new_tokens
    cache = None
    if use_cache:
        # never the whole request up front: a learned model cannot cache past its window, and a
        # RoPE model's cache grows (see _grown) only as far as the sequence really gets
        cache = model.make_kv_cache(B, min(total, window if window is not None else T + cfg.block_size))

    was_training = model.training
    model.eval()
    try:
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            if cache is not None and window is None and idx.size(1) > cache[0].max_len:
                cache = _grown(model, cache, min(total, 2 * cache[0].max_len))
            if cache is not None and idx.size(1) <= cache[0].max_len:
                new_tokens = idx[:, cache[0].length:]  # the whole prompt first, then one token
                logits, _ = model(new_tokens, attention_mask=mask, kv_cache=cache)
            else:
                cache = None  # the window slid past what the cache holds: recompute from here on
                context = idx if window is None else idx[:, -window:]  # (B, <= window)
                context_mask = None if mask is None else mask[:, -context.size(1):]
                logits, _ = model(context, attention_mask=context_mask)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            if eos_token is not None:
                next_token = next_token.masked_fill(finished[:, None], eos_token)
                finished = finished | (next_token[:, 0] == eos_token)
            idx = torch.cat((idx, next_token), dim=1)  # (B, T + step + 1)
            if mask is not None:
                mask = torch.cat((mask, mask.new_ones(B, 1)), dim=1)
            if eos_token is not None and bool(finished.all()):
                # every row is done: the rest would be eos anyway
                rest = idx.new_full((B, max_new_tokens - step - 1), eos_token)
                idx = torch.cat((idx, rest), dim=1)
                break
    finally:
        model.train(was_training)
    return idx[0] if squeeze else idx


def _grown(model, cache: list, max_len: int) -> list:
    """A copy of cache (one KVCache per layer) with room for max_len positions."""
    first = cache[0]
    bigger = model.make_kv_cache(first.k.size(0), max_len, device=first.k.device, dtype=first.k.dtype)
    for old, new in zip(cache, bigger):
        n = old.length
        new.k[:, :, :n], new.v[:, :, :n] = old.k[:, :, :n], old.v[:, :, :n]  # (B, n_kv_head, n, hs)
        new.length = n
    return bigger


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, vocab) -> (B, 1) long."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, vocab)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token once the likelier tokens before it already reach top_p (the best always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def _check_sampling_args(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: {max_new_tokens!r} must be a non-negative integer")
    if not temperature >= 0:
        raise ValueError(f"temperature: {temperature!r} must be >= 0 (0 is greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: {top_k!r} must be a positive integer or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: {top_p!r} must be in (0, 1] or None")
