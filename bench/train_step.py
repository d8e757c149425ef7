"""Training-step throughput of attention_core: prints ms/iter, tokens/s and MFU; never asserts.

Presets mirror the reference runs in ../shared/ANCHORS.md so the numbers can be compared side by
side with nanoGPT's train.py on the same machine:

    python bench/train_step.py --preset nanogpt-cpu
    python bench/train_step.py --preset gpt2-124m --batch-size 16 --compile --device cuda

Each iteration samples a batch from a pre-made random token stream (as nanoGPT's loader does from
its memmap), then runs `attention_core.train_step`: forward, backward, clip, fused AdamW, and the
one host sync that reads the loss. MFU uses nanoGPT's 6N + 12·L·H·Q·T FLOPs per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from attention_core import ModelConfig, Transformer, configure_optimizer, peak_flops, train_step  # noqa: E402

PRESETS = {
    # nanoGPT's CPU "baby GPT" command (README / ANCHORS.md): shakespeare_char's 65-symbol vocabulary
    "nanogpt-cpu": dict(model=dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
                        batch_size=12, device="cpu", dtype="float32"),
    # GPT-2 small as nanoGPT trains it: vocab padded to 50304, no biases, bf16 autocast
    "gpt2-124m": dict(model=dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
                      batch_size=16, device="cuda", dtype="bfloat16"),
}

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="nanogpt-cpu")
    p.add_argument("--batch-size", type=int, help="default: the preset's")
    p.add_argument("--block-size", type=int, help="default: the preset's")
    p.add_argument("--device", help="default: the preset's (cpu or cuda)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="autocast dtype; default: the preset's")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--attn-impl", choices=["fused", "explicit"], default="fused")
    p.add_argument("--iters", type=int, default=50, help="timed iterations")
    p.add_argument("--warmup", type=int, default=10, help="untimed iterations first (compilation happens here)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    device = torch.device(args.device or preset["device"])
    dtype_name = args.dtype or preset["dtype"]
    batch_size = args.batch_size or preset["batch_size"]
    model_kwargs = dict(preset["model"])
    if args.block_size:
        model_kwargs["block_size"] = args.block_size
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    config = ModelConfig(**model_kwargs, attn_impl=args.attn_impl)
    raw_model = Transformer(config).to(device)
    model = torch.compile(raw_model) if args.compile else raw_model
    optimizer = configure_optimizer(raw_model, lr=6e-4, weight_decay=0.1, device_type=device.type)
    autocast_dtype = torch.bfloat16 if dtype_name == "bfloat16" else None
    T = config.block_size

    # a random token stream standing in for a dataset; each step samples batch_size windows of it
    stream = torch.randint(config.vocab_size, (1_000_000,), device=device)
    offsets = torch.arange(T + 1, device=device)

    def get_batch():
        starts = torch.randint(len(stream) - T - 1, (batch_size, 1), device=device)
        xy = stream[starts + offsets]  # (B, T + 1)
        return xy[:, :-1], xy[:, 1:]

    def step():
        return train_step(model, optimizer, [get_batch()], grad_clip=1.0,
                          autocast_dtype=autocast_dtype, device_type=device.type)

    print(f"preset {args.preset}: {config.n_layer} layers, {config.n_head} heads, {config.n_embd} dims, "
          f"block {T}, batch {batch_size}, {dtype_name}, compile={args.compile}, device={device}, "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(f"parameters: {raw_model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding, "
          f"{raw_model.num_params(non_embedding=False) / 1e6:.2f}M total")
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    print(f"warmup: {args.warmup} iterations in {time.perf_counter() - t0:.1f} s")

    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        result = step()  # train_step reads the loss: the device has finished when it returns
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    tokens_per_iter = batch_size * T
    tokens_per_s = tokens_per_iter / (ms / 1000)
    p10 = sorted(times)[len(times) // 10] * 1000  # on a shared machine the fast tail is the least disturbed
    print(f"{args.iters} iterations: median {ms:.2f} ms/iter (p10 {p10:.2f}, mean {statistics.mean(times) * 1000:.2f}, "
          f"min {min(times) * 1000:.2f}), final loss {result.loss:.4f}")
    print(f"tokens/s: {tokens_per_s:,.0f}")
    peak = peak_flops(device)
    flops = raw_model.flops_per_token() * tokens_per_s
    if peak is not None:
        print(f"MFU: {100 * flops / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s ({flops / 1e12:.1f} TFLOP/s achieved)")
    else:
        print(f"MFU: no peak known for {device.type} ({flops / 1e9:.1f} GFLOP/s achieved)")


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    main()
