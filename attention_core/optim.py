"""Optimizers and learning-rate schedules: AdamW, or Muon for the hidden matrices with AdamW for the rest.

`configure_optimizer` builds AdamW with weight decay only on matmul weights (nanoGPT's groups) or,
with `optimizer="muon"`, one `MuonWithAdamW`: `Muon` (Jordan et al. 2024; modded-nanogpt)
orthogonalises the update of every matrix inside the blocks, and AdamW keeps the embeddings, the head,
norm gains and biases, which Muon is not meant for. Every parameter group carries `lr_scale`, its
learning rate relative to the schedule's (Muon's 0.02 next to AdamW's 2e-3), which `train_step`
applies. `lr_at` is linear warmup, then cosine decay or warmup-stable-decay ("wsd": the peak held,
then a linear cooldown to min_lr over the last `decay_fraction` of the steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95),
                        eps: float = 1e-8, device_type: str = "cpu", *, fused: bool | None = None,
                        optimizer: str = "adamw", muon_lr: float = 0.02, muon_momentum: float = 0.95,
                        muon_weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW, or Muon for the blocks' matrices and AdamW for the rest (`optimizer="muon"`).

    AdamW decays >=2-D weights that are not embeddings and leaves the rest alone: pulling norm gains,
    biases and embeddings towards zero does not regularise anything useful (a tied head counts as
    the embedding). Muon takes every 2-D weight except embeddings and the output head, at `muon_lr`
    (with torch's shape adjustment, sqrt(max(1, rows/cols))) and `muon_weight_decay`. fused=None
    picks the fused single-kernel AdamW, which both CUDA and CPU builds of PyTorch provide.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = getattr(model, "lm_head", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    hidden, decay, no_decay = [], [], []
    for p in model.parameters():  # a tied parameter is yielded once
        if not p.requires_grad:
            continue
        if optimizer == "muon" and p.dim() == 2 and id(p) not in embeddings | head_ids:
            hidden.append(p)
        elif p.dim() >= 2 and id(p) not in embeddings:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    groups = [g for g in groups if g["params"]]
    if fused is None:
        fused = device_type in ("cuda", "cpu")
    for group in groups:
        group["lr"] = lr
    adamw = dict(betas=tuple(betas), eps=eps, fused=fused)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **adamw)
    muon = [{"params": hidden, "weight_decay": muon_weight_decay, "lr_scale": muon_lr / lr, "lr": muon_lr}]
    return MuonWithAdamW([g for g in muon if g["params"]], groups, momentum=muon_momentum, adamw=adamw)


def orthogonalize(g: torch.Tensor, steps: int = 5, coefficients=(3.4445, -4.7750, 2.0315),
                  eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Newton-Schulz iteration of Muon: g (..., rows, cols) mapped to roughly the nearest
    semi-orthogonal matrix (singular values pushed to ~1, within about 0.5-1.5 with these
    coefficients), each matrix of a batch on its own. Computed in `dtype` and returned in it.

    Each step is X <- aX + (bA + cA^2)X with A = XX^T; the short side is kept first so that A is the
    small Gram matrix. Dividing by the Frobenius norm first puts every singular value in (0, 1].
    """
    a, b, c = coefficients
    x = g.to(dtype).reshape(-1, *g.shape[-2:])  # (batch, rows, cols)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A@A
        x = torch.baddbmm(x, poly, x, beta=a)  # a*X + poly@X
    return (x.mT if tall else x).reshape(g.shape)


def _evaluate(closure: Callable[[], float] | None) -> float | None:
    """An optimizer step's closure, called with gradients on (the torch.optim convention), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Optimizer):
    """Muon: SGD with Nesterov momentum whose update, for each matrix, is orthogonalised by
    `orthogonalize` before it is applied. The algorithm, defaults and state ("momentum_buffer") are
    torch.optim.Muon's; two things differ, both for speed:

    - the iteration runs in `ns_dtype`: by default bfloat16 on CUDA (as torch.optim.Muon always does)
      but float32 elsewhere. A CPU without native bf16 matrix units (AVX2, most laptops) multiplies
      bf16 matrices ~20x slower than fp32: torch.optim.Muon there took 1.04 s a step against 0.07 s
      for AdamW on nanoGPT's CPU model (BENCHMARKS.md, "muon_step"). On a CPU that has them, fp32 was
      still as fast (23 against 21 ms).
    - the matrices of one shape (every layer's c_attn, ...) are orthogonalised together, one batched
      matmul per step of the iteration instead of one per matrix.

    The learning rate is scaled by sqrt(max(1, rows/cols)) (torch's "original" adjustment) so every
    shape moves by about the same RMS; weight decay is decoupled and uses the unscaled rate.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=(3.4445, -4.7750, 2.0315), eps: float = 1e-7,
                 ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"Muon: lr={lr}, momentum={momentum}, weight_decay={weight_decay} must be >= 0")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _evaluate(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                updates.append(p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
            by_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault((tuple(p.shape), p.device), []).append(i)
            for (_, device), index in by_shape.items():
                dtype = self.ns_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
                stacked = torch.stack([updates[i] for i in index])
                ortho = orthogonalize(stacked, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype)
                for k, i in enumerate(index):
                    p, lr = params[i], group["lr"]
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(ortho[k].to(p.dtype), alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for some parameter groups and torch.optim.AdamW for the others, as one optimizer.

    One optimizer rather than two, so that whatever handles "the optimizer" works unchanged: the
    schedule setting each group's lr, `train_step`, TrainState's by-name state and
    torch.distributed.checkpoint's full state dicts. Each group names its `algorithm`; `step` hands
    the groups to a Muon and an AdamW that read and write this optimizer's per-parameter state, and
    does so anew every step, because `load_state_dict` replaces the groups and the state.
    """

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], *, momentum: float = 0.95,
                 adamw: dict | None = None):
        # the inner optimizers fill in each group's defaults; this one then owns the same groups
        self._inner: dict[str, torch.optim.Optimizer] = {}
        for name, groups, build in (
                ("muon", muon_groups, lambda g: Muon(g, momentum=momentum, nesterov=True)),
                ("adamw", adamw_groups, lambda g: torch.optim.AdamW(g, **(adamw or {})))):
            if groups:
                self._inner[name] = build(groups)
                for group in self._inner[name].param_groups:
                    group["algorithm"] = name
        super().__init__([g for inner in self._inner.values() for g in inner.param_groups], {})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _evaluate(closure)
        for name, inner in self._inner.items():
            inner.param_groups = [g for g in self.param_groups if g["algorithm"] == name]
            inner.state = self.state  # keyed by parameter: the two never touch each other's entries
            inner.step()
        return loss


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          schedule: str = "cosine", decay_fraction: float = 0.4) -> float:
    """The learning rate of `step`: linear warmup from lr/(warmup+1) to lr, then down to min_lr at
    max_steps (and min_lr after), by a cosine or, with schedule="wsd", held at lr until the last
    decay_fraction of max_steps and then linear (warmup-stable-decay)."""
    if step < 0 or warmup_steps < 0 or max_steps < 0:
        raise ValueError(f"lr_at: step={step}, warmup_steps={warmup_steps}, max_steps={max_steps} must be >= 0")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction: {decay_fraction!r} must be in [0, 1]")
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)  # never exactly 0: step 0 still learns
    if step >= max_steps:
        return min_lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    decay_start = max(warmup_steps, max_steps - math.ceil(decay_fraction * max_steps))
    if step < decay_start:
        return lr
    return min_lr + (lr - min_lr) * (max_steps - step) / (max_steps - decay_start)  # lr -> min_lr
