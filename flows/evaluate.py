"""Evaluation of a trained checkpoint: validation loss, perplexity, bits per byte, and samples.

The validation split is cut into consecutive non-overlapping windows of block_size tokens (the same
windows every time), so two models evaluated on one dataset are compared on identical text. Bits per
byte normalises by the UTF-8 bytes those windows cover, which makes models with different tokenizers
comparable.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel

from flows.config import PipelineConfig
from flows.data import PreparedData


class EvalResult(BaseModel):
    val_loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    samples: list[dict[str, str]]

    def metrics(self) -> dict[str, float]:
        return {"eval_val_loss": self.val_loss, "eval_perplexity": self.perplexity,
                "eval_bits_per_byte": self.bits_per_byte, "eval_tokens": float(self.tokens)}


@torch.no_grad()
def score_split(model, tokenizer, tokens: np.ndarray, *, block_size: int, batch_size: int,
                max_tokens: int | None = None) -> tuple[float, int, int]:
    """(total negative log-likelihood in nats, tokens scored, UTF-8 bytes of the scored tokens)."""
    usable = len(tokens) - 1
    if max_tokens is not None:
        usable = min(usable, max_tokens)
    n_windows = max(1, usable // block_size)
    device = next(model.parameters()).device
    nll, n_tok, n_bytes = 0.0, 0, 0
    for start in range(0, n_windows, batch_size):
        idx = range(start, min(start + batch_size, n_windows))
        x = np.stack([tokens[i * block_size: (i + 1) * block_size] for i in idx]).astype(np.int64)
        y = np.stack([tokens[i * block_size + 1: (i + 1) * block_size + 1] for i in idx]).astype(np.int64)
        logits, _ = model(torch.from_numpy(x).to(device))
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), torch.from_numpy(y).to(device).view(-1),
                               reduction="sum")
        nll += float(loss)
        n_tok += y.size
        n_bytes += sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in y)
    return nll, n_tok, n_bytes


def evaluate_pack(model, tokenizer, data: PreparedData, cfg: PipelineConfig) -> EvalResult:
    from flows.modelpack import generate_text

    nll, n_tok, n_bytes = score_split(model, tokenizer, data.tokens("val"), block_size=model.config.block_size,
                                      batch_size=cfg.eval.batch_size, max_tokens=cfg.eval.max_tokens)
    val_loss = nll / n_tok
    texts = generate_text(model, tokenizer, cfg.eval.prompts, max_new_tokens=cfg.eval.max_new_tokens,
                          temperature=cfg.eval.temperature, top_k=cfg.eval.top_k, seed=cfg.eval.seed)
    return EvalResult(val_loss=val_loss, perplexity=math.exp(min(val_loss, 50.0)),
                      bits_per_byte=nll / math.log(2) / max(n_bytes, 1), tokens=n_tok, bytes=n_bytes,
                      samples=[{"prompt": p, "completion": t} for p, t in zip(cfg.eval.prompts, texts)])
