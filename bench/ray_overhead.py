"""How much does Ray Train cost? Steady-state tokens/s of one Ray Train worker against the same loop
run directly with attention_core's primitives (same model, batches, optimizer, threads), plus the
seconds Ray takes to start. Prints numbers; asserts nothing.

    .venv/bin/python bench/ray_overhead.py [--steps 300] [--log-interval 25] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def direct_loop(cfg, data, steps: int, log_interval: int) -> list[float]:
    """The worker loop's work without Ray: tokens/s per log interval."""
    from attention_core import Transformer, configure_optimizer, lr_at, train_step
    from flows.train import model_config_for, sample_batch

    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = Transformer(model_config_for(cfg, data.vocab_size))
    opt = configure_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2))
    tokens = data.tokens("train")
    rates, t_last = [], time.perf_counter()
    for step in range(steps):
        x, y = sample_batch(tokens, batch_size=tc.batch_size, block_size=cfg.model.block_size, seed=tc.seed,
                            step=step)
        lr = lr_at(step, lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps, max_steps=steps)
        train_step(model, opt, [(x, y)], lr=lr, grad_clip=tc.grad_clip)
        if (step + 1) % log_interval == 0:
            now = time.perf_counter()
            rates.append(tc.batch_size * cfg.model.block_size * log_interval / (now - t_last))
            t_last = now
    return rates


def ray_loop(cfg, data, run: int) -> tuple[list[float], float]:
    from mlflow.tracking import MlflowClient

    from flows.train import train_model

    uri = f"sqlite:///{cfg.workdir_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    t0 = time.perf_counter()
    train_model(cfg, data, run_name=f"bench-{run}", tracking_uri=uri, mlflow_run_id=run_id)
    wall = time.perf_counter() - t0
    history = sorted(client.get_metric_history(run_id, "tokens_per_sec"), key=lambda m: m.step)
    return [m.value for m in history], wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log-interval", type=int, default=25)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from flows.config import load_config
    from flows.data import prepare_dataset

    workdir = tempfile.mkdtemp(prefix="bench-ray-")
    threads = os.cpu_count() or 1
    # nanoGPT's CPU configuration (ANCHORS.md): 4 layers, 4 heads, 128 dims, block 64, batch 12
    cfg = load_config(overrides=[
        f"workdir={workdir}", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64",
        f"train.max_steps={args.steps}", "train.batch_size=12", f"train.log_interval={args.log_interval}",
        f"train.eval_interval={args.steps}", f"train.checkpoint_interval={args.steps}", "train.eval_batches=1",
        "train.num_workers=1", f"train.cpus_per_worker={threads}",
    ])
    data = prepare_dataset(cfg)
    torch.set_num_threads(threads)

    import ray

    direct, in_ray, walls, starts = [], [], [], []
    for r in range(args.repeats):
        d = direct_loop(cfg, data, args.steps, args.log_interval)
        direct.append(statistics.median(d[1:]))  # skip the first interval (warm-up)
        t0 = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        starts.append(time.perf_counter() - t0)
        rates, wall = ray_loop(cfg, data, r)
        ray.shutdown()
        in_ray.append(statistics.median(rates[1:]))
        walls.append(wall)

    d, rr = statistics.median(direct), statistics.median(in_ray)
    print(f"config: 4 layers, 128 dims, block 64, batch 12, fp32, {threads} threads, {args.steps} steps")
    print(f"direct loop (attention_core primitives): {d:,.0f} tokens/s (median of {args.repeats} runs)")
    print(f"inside Ray Train, 1 worker:               {rr:,.0f} tokens/s (median of {args.repeats} runs)")
    print(f"ratio Ray / direct:                       {rr / d:.3f}x")
    print(f"ray.init (local) start-up:                {statistics.median(starts):.1f} s")
    print(f"TorchTrainer.fit wall time for {args.steps} steps: {statistics.median(walls):.1f} s "
          f"(direct loop: {args.steps * cfg.train.batch_size * 64 / d:.1f} s)")


if __name__ == "__main__":
    main()
