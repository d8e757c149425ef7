"""The transformer: embeddings, pre-norm blocks of attention and MLP, and the language-model head.

`Transformer(config)` is a GPT-2-shaped model whose parts are chosen by `ModelConfig`: learned or
rotary positions, LayerNorm or RMSNorm, GELU, SwiGLU or ReLU² MLP, grouped-query attention, logit
soft-capping, causal decoder or bidirectional encoder. `forward(idx, targets)` returns `(logits, loss)`
like nanoGPT's; it also takes a key-padding `attention_mask` and a KV cache (see `generation.py`).
Weights start from GPT-2's initialisation, with residual projections scaled by 1/sqrt(2 * n_layer) so
the residual stream's variance does not grow with depth, or at zero (`zero_init_proj`). `num_params` and `flops_per_token` give what an MFU
figure needs, and `attention_maps` shows what every head attends to.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import ForwardContext, KVCache, SelfAttention, attention_bias, rope_angles
from .config import ConfigError, ModelConfig
from .generation import generate


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, bias=config.bias)
    return nn.RMSNorm(dim, eps=1e-5)


class MLP(nn.Module):
    """The position-wise feed-forward network: GELU (GPT-2), SwiGLU (LLaMA) or ReLU² (Primer)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        self.swiglu = config.mlp == "swiglu"
        hidden = config.hidden_dim
        # SwiGLU's gate and up projections are a single matmul whose output is split in two
        self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden), or (B, T, 2*hidden) for SwiGLU
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)  # (B, T, hidden) each
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()  # So et al. 2021 (Primer); modded-nanogpt
        else:
            h = F.gelu(h)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = SelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, *,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) -> (x (B, T, C), this layer's attention weights or None)."""
        a, weights = self.attn(self.ln_1(x), ctx, kv_cache=kv_cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class Transformer(nn.Module):
    """A decoder language model (causal=True) or a bidirectional encoder (causal=False)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected ModelConfig, got {type(config).__name__}")
        if config.vocab_size is None:
            raise ConfigError("vocab_size: required to build a model (config.with_vocab(n))")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: each block adds two residual contributions, so scale their projections by
        # 1/sqrt(2 * n_layer) to keep the residual stream's variance independent of depth; or start
        # them at zero (modded-nanogpt), so each block starts as the identity and learns what to add
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, kv_cache: list[KVCache] | None = None,
                attn_impl: str | None = None, position_ids: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, vocab_size), mean cross-entropy or None).

        targets (B, T): next tokens, -1 where no loss is wanted. attention_mask: key-padding mask,
        1 for real tokens, shape (B, T), or (B, cached + T) with a kv_cache (one KVCache per layer,
        see `make_kv_cache`). attn_impl: "fused" or "explicit" for every layer in this call.
        position_ids (B or 1, T): explicit positions; by default they count real tokens, so left
        padding does not shift them. Logits are returned for every position.
        """
        x, _ = self._run_blocks(idx, attention_mask=attention_mask, kv_cache=kv_cache, attn_impl=attn_impl,
                                position_ids=position_ids)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap  # smooth and differentiable: no logit leaves (-cap, cap)
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def encode(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               attn_impl: str | None = None) -> torch.Tensor:
        """Final hidden states (B, T, n_embd), for classification or pooling on top of an encoder."""
        x, _ = self._run_blocks(idx, attention_mask=attention_mask, attn_impl=attn_impl)
        return x

    def _run_blocks(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                    kv_cache: list[KVCache] | None = None, attn_impl: str | None = None,
                    position_ids: torch.Tensor | None = None, need_weights: bool = False,
                    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Embed idx and run every block; returns (normed hidden states (B, T, C), per-layer weights)."""
        past = self._check_inputs(idx, kv_cache)
        B, T = idx.size()
        cfg = self.config
        if position_ids is None:
            position_ids = self._position_ids(T, past, attention_mask, idx.device)  # (B or 1, T)

        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)  # (B or 1, T, C) broadcasts over the batch
        # built once here and shared by every layer: the mask and angles depend only on positions
        mask, is_causal = attention_bias(T, past, cfg.causal, attention_mask, idx.device)
        rope = rope_angles(position_ids, cfg.head_dim, cfg.rope_theta) if cfg.pos == "rope" else None
        ctx = ForwardContext(rope=rope, mask=mask, is_causal=is_causal, attn_impl=attn_impl,
                             need_weights=need_weights)
        x = self.drop(x)
        all_weights = []
        for i, block in enumerate(self.h):
            x, weights = block(x, ctx, kv_cache=None if kv_cache is None else kv_cache[i])
            all_weights.append(weights)
        return self.ln_f(x), all_weights

    def _check_inputs(self, idx: torch.Tensor, kv_cache: list[KVCache] | None) -> int:
        """Raise on a malformed idx or kv_cache; return how many positions the cache already holds."""
        if idx.dim() != 2:
            raise ValueError(f"idx: expected shape (B, T), got {tuple(idx.shape)}")
        cfg = self.config
        if kv_cache is not None:
            if not cfg.causal:
                raise ValueError("kv_cache: only a causal model decodes incrementally")
            if len(kv_cache) != cfg.n_layer:
                raise ValueError(f"kv_cache: expected {cfg.n_layer} layers, got {len(kv_cache)}")
        past = kv_cache[0].length if kv_cache is not None else 0
        if self.wpe is not None and past + idx.size(1) > cfg.block_size:
            raise ValueError(f"idx: {past + idx.size(1)} positions exceed block_size={cfg.block_size} "
                             "(learned positions; crop the context, as generate does)")
        return past

    @staticmethod
    def _position_ids(T: int, past: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.arange(past, past + T, device=device)[None]  # (1, T)
        # A token's position is the number of real tokens before it: with left padding, the first
        # real token is at position 0, exactly as if the prompt had been given alone.
        positions = attention_mask.long().cumsum(dim=-1) - 1  # (B, past + T)
        return positions[:, past:].clamp(min=0)  # (B, T); padding sits at 0 and is never attended to

    # ------------------------------------------------------------------------------------------

    def make_kv_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> list[KVCache]:
        """One empty KVCache per layer, on the model's device and dtype unless told otherwise."""
        p = self.wte.weight
        return [KVCache(batch_size, self.config.kv_heads, max_len, self.config.head_dim,
                        device=device or p.device, dtype=dtype or p.dtype)
                for _ in range(self.config.n_layer)]

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """What every head attends to: idx (T,) or (1, T) -> (n_layer, n_head, T, T) float.

        Runs the explicit path in eval mode (no dropout); row i of a map is query i's distribution
        over keys, so rows sum to 1 and, in a causal model, are zero above the diagonal.
        """
        if idx.dim() == 1:
            idx = idx[None]
        if idx.dim() != 2 or idx.size(0) != 1:
            raise ValueError(f"idx: expected one sequence, shape (T,) or (1, T), got {tuple(idx.shape)}")
        was_training = self.training
        self.eval()
        try:
            _, weights = self._run_blocks(idx, attn_impl="explicit", need_weights=True)
        finally:
            self.train(was_training)
        return torch.stack(weights)[:, 0].float()  # (n_layer, n_head, T, T)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                 eos_token=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """Continue idx by max_new_tokens tokens; see `attention_core.generation.generate`."""
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, eos_token=eos_token, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (a tied matrix counted once).

        With non_embedding, position embeddings are left out, and so are token embeddings unless
        they are tied to the head, where they do matmul work (nanoGPT's convention).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token, nanoGPT/PaLM's estimate: 6N + 12·L·H·Q·T (T = block_size)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * L * H * Q * T

