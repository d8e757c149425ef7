"""Deterministic batches and seeds: what makes a resumed run bitwise equal to an uninterrupted one.

The global batch of a step is drawn from a generator seeded by (seed, step, micro-step) and each rank
takes its slice; dropout is seeded by (seed, step, rank). Nothing depends on state carried between
steps except the weights and the optimizer, which checkpoints hold, so a run resumed from a checkpoint
replays exactly, and N workers see the same data as one worker with N times the batch.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_batch(tokens: np.ndarray, *, batch_size: int, block_size: int, seed: int, step: int,
                 rank: int = 0, world_size: int = 1, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's `batch_size` windows of the global batch of (seed, step, micro).

    The global batch (world_size * batch_size windows) depends only on (seed, step, micro); rank r
    takes the r-th slice. No state is shared or carried, so resumes replay batches exactly.
    """
    rng = np.random.default_rng([seed, step, micro])
    # a window needs block_size + 1 tokens (inputs and next-token targets): the last start is n - block_size - 1
    starts = rng.integers(0, len(tokens) - block_size, size=world_size * batch_size)
    starts = starts[rank * batch_size: (rank + 1) * batch_size]
    x = np.stack([tokens[s: s + block_size] for s in starts]).astype(np.int64)  # (B, T)
    y = np.stack([tokens[s + 1: s + 1 + block_size] for s in starts]).astype(np.int64)  # (B, T)
    return torch.from_numpy(x), torch.from_numpy(y)


def mix_seed(*values: int) -> int:
    """A deterministic 31-bit seed from integers (Python's hash of str is salted; this is not)."""
    h = 0x345678
    for v in values:
        h = (h * 1_000_003) ^ (v & 0xFFFF_FFFF)
    return h & 0x7FFF_FFFF
