"""Self-attention: the fused and explicit paths, rotary positions, grouped-query heads, KV cache.

`SelfAttention` projects its input to queries, keys and values, optionally normalises queries and
keys (qk_norm) and rotates them (RoPE), appends keys and values to a `KVCache` when decoding, and
then attends along one of two paths that compute the same function:

* `fused`: `torch.nn.functional.scaled_dot_product_attention`, which lets PyTorch pick the flash,
  cuDNN, memory-efficient or math kernel for the device, dtype and mask;
* `explicit`: softmax(Q K^T / sqrt(head_dim) + mask) V written out, which can also return the
  attention weights (what each head attends to).

Masks are boolean with True meaning "may attend". They are built once per forward pass by
`attention_bias` (causality, left/right padding, the offset of cached keys) and, with the rotary
angles and the chosen path, travel to every layer in one `ForwardContext`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

# ----------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE, Su et al. 2021)


def rope_angles(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) pair, shaped to broadcast over heads.

    position_ids (B or 1, T) -> cos, sin each (B or 1, 1, T, head_dim/2), float32. Computed from the
    positions on every call rather than looked up in a table: it is cheap, works for any position
    (generation may run past block_size), and has no state to extend or move between devices.
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (hs/2,)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, T, hs/2)
    return angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, T, hs/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of features of x (B, nh, T, hs) by their position's angles.

    Feature i is paired with feature i + hs/2 (the "rotate half" layout of GPT-NeoX and LLaMA).
    The dot product of a rotated query at position m with a rotated key at position n then depends
    only on m - n: that is what makes the scores relative. The rotation runs in float32 so that
    long positions stay accurate under bf16 autocast.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hs)
    return rotated.type_as(x)


# ----------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    Buffers are preallocated at (B, n_kv_head, max_len, head_dim) so decoding never reallocates;
    `length` counts the positions filled so far. `update` writes the new keys/values after them and
    returns views of everything filled, which is what the new queries attend to.
    """

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, n_kv_head, T, hs); return all cached keys and values (B, n_kv_head, length, hs)."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"kv_cache: {end} positions do not fit in a cache of max_len={self.max_len}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.length = 0


# ----------------------------------------------------------------------------------------------
# Masks


def causal_mask(T: int, T_k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T_k) bool: query i (the last T of T_k positions) may attend to keys 0..T_k-T+i."""
    return torch.ones(T, T_k, dtype=torch.bool, device=device).tril(diagonal=T_k - T)


def attention_bias(T: int, past: int, causal: bool, attention_mask: torch.Tensor | None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor | None, bool]:
    """The (mask, is_causal) pair every layer's attention uses for T new queries after `past` cached keys.

    attention_mask (B, past + T) is a key-padding mask, 1 for real tokens. Returns mask None with
    is_causal True in the common training case (the fused path then takes its fastest kernel), or
    a bool mask broadcastable to (B, nh, T, past + T) with is_causal False.
    """
    T_k = past + T
    if attention_mask is None:
        if past == 0:
            return None, causal
        if T == 1 or not causal:  # one new query sees every cached key: nothing to mask
            return None, False
        return causal_mask(T, T_k, device)[None, None], False  # (1, 1, T, T_k)
    if attention_mask.dim() != 2 or attention_mask.size(1) != T_k:
        raise ValueError(f"attention_mask: expected shape (B, {T_k}), got {tuple(attention_mask.shape)}")
    allowed = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T_k)
    if causal:
        allowed = allowed & causal_mask(T, T_k, device)  # (B, 1, T, T_k)
    # Every query may also attend to itself. For real tokens that changes nothing (they already can);
    # a padding query would otherwise have no key at all, and a softmax over nothing is NaN.
    # Padding outputs are never read, and real tokens never attend to padding keys.
    diagonal = torch.arange(T_k, device=device)[None, :] == torch.arange(past, T_k, device=device)[:, None]
    return allowed | diagonal, False  # (B, 1, T, T_k)


# ----------------------------------------------------------------------------------------------
# What one forward pass shares across layers


@dataclass(frozen=True)
class ForwardContext:
    """Everything every layer's attention needs from one forward pass, built once by the Transformer.

    rope: (cos, sin) from `rope_angles`, each (B or 1, 1, T, hs/2), or None for learned positions.
    mask, is_causal: from `attention_bias`. attn_impl: "fused" or "explicit" for this pass, or None
    for each module's default. need_weights: take the explicit path and return attention weights.
    The default context is plain bidirectional attention over the whole input.
    """

    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    mask: torch.Tensor | None = None  # bool, True = may attend, broadcastable to (B, nh, T, T_k)
    is_causal: bool = False
    attn_impl: str | None = None
    need_weights: bool = False


# ----------------------------------------------------------------------------------------------
# The two attention paths


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    is_causal: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA: q (B, nh, T, hs), k and v (B, n_kv, T_k, hs) -> (B, nh, T, hs)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
        enable_gqa=q.size(1) != k.size(1))


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       is_causal: bool, dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(hs) + mask) V, written out. Returns (y (B, nh, T, hs), weights (B, nh, T, T_k))."""
    n_rep = q.size(1) // k.size(1)
    if n_rep > 1:
        # grouped-query attention: query head h reads key/value head h // n_rep
        k = k.repeat_interleave(n_rep, dim=1)  # (B, nh, T_k, hs)
        v = v.repeat_interleave(n_rep, dim=1)  # (B, nh, T_k, hs)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, T_k)
    if is_causal:
        mask = causal_mask(q.size(2), k.size(2), q.device)  # (T, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores, dim=-1)  # (B, nh, T, T_k)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    return dropped @ v, weights  # (B, nh, T, T_k) x (B, nh, T_k, hs) -> (B, nh, T, hs)


class SelfAttention(nn.Module):
    """Multi-head self-attention with grouped-query heads, optional qk-norm and RoPE, and a KV cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        # queries for n_head heads, keys and values for n_kv_head heads, all in one matmul
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # qk-norm keeps attention logits from growing without bound (OLMo-2, Qwen3)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if config.qk_norm else None

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None, *,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) -> (y (B, T, C), weights (B, nh, T, T_k) or None).

        ctx holds the pass's rotary angles, mask and choice of path (see `ForwardContext`); its
        `attn_impl` overrides the module's default path, and `need_weights` forces the explicit
        path and returns its weights. kv_cache, when decoding, holds this layer's earlier keys.
        """
        ctx = ForwardContext() if ctx is None else ctx
        B, T, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, nkv, T_k, hs) with T_k = cached + T

        dropout_p = self.dropout if self.training else 0.0
        impl = ctx.attn_impl or self.attn_impl
        weights = None
        if impl == "explicit" or ctx.need_weights:
            y, weights = explicit_attention(q, k, v, ctx.mask, ctx.is_causal, dropout_p)
        elif impl == "fused":
            y = fused_attention(q, k, v, ctx.mask, ctx.is_causal, dropout_p)
        else:
            raise ValueError(f"attn_impl: {impl!r} is not one of fused, explicit")
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh*hs): heads side by side
        return self.resid_dropout(self.c_proj(y)), weights
