"""Muon's Newton-Schulz iteration on this machine: torch.optim.Muon's way (bfloat16, one matrix at a
time) against attention_core's (float32 on CPU, the matrices of one shape batched), for the hidden
matrices of the issue-15 recipe model (4 layers, 128 dims, MLP 496: c_attn 384x128, attn c_proj
128x128, c_fc 496x128, mlp c_proj 128x496, four of each). Prints ms per optimizer step's worth of
orthogonalisation and whether the CPU has native bf16 matrix instructions; asserts nothing.

    PYTHONPATH=$PWD .venv/bin/python bench/muon_step.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.optim._muon import _zeropower_via_newtonschulz  # torch.optim.Muon's own iteration

from attention_core import orthogonalize

SHAPES = [(384, 128), (128, 128), (496, 128), (128, 496)] * 4
COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return ", ".join(have) or "none of avx2/avx512/bf16"


def per_matrix_torch(grads):
    return [_zeropower_via_newtonschulz(g, COEFFICIENTS, 5, 1e-7) for g in grads]


def per_matrix(grads, dtype):
    return [orthogonalize(g, dtype=dtype) for g in grads]


def batched(grads, dtype):
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_shape.setdefault(tuple(g.shape), []).append(g)
    return [orthogonalize(torch.stack(group), dtype=dtype) for group in by_shape.values()]


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    grads = [torch.randn(*s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    print(f"torch {torch.__version__}, {args.threads} threads, CPU flags: {cpu_flags()}, "
          f"{len(grads)} matrices, 5 Newton-Schulz steps, median of {args.repeats}")
    print("| iteration | ms per optimizer step |\n|---|---:|")
    for label, fn in (("torch.optim.Muon's: bf16, one matrix at a time", lambda: per_matrix_torch(grads)),
                      ("bf16, batched by shape", lambda: batched(grads, torch.bfloat16)),
                      ("fp32, one matrix at a time", lambda: per_matrix(grads, torch.float32)),
                      ("fp32, batched by shape (attention_core's default on CPU)",
                       lambda: batched(grads, torch.float32))):
        print(f"| {label} | {timed(fn, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
