"""Ray Train driver (`train_model`) and the per-worker loop (`train_loop_per_worker`).

The driver builds a `TorchTrainer` whose run name is stable for a flow run, so a Prefect retry re-runs
the same Ray Train run and resumes from its last checkpoint. The worker loop uses attention_core's
primitives (model, optimizer, lr schedule, train_step, TrainState) and only adds what distribution
needs: DDP via `prepare_model`, per-rank batch sampling, averaged validation loss, rank-0 metrics to
MLflow, and checkpoints through `ray.train.report`. It never imports Prefect: workers have no flow-run
context.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from attention_core import (
    ModelConfig,
    TrainState,
    Transformer,
    configure_optimizer,
    lr_at,
    train_step,
    unwrap_model,
)
from flows.config import PipelineConfig
from flows.data import PreparedData

# bf16 dense peak FLOP/s by device name fragment, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class TrainJob(BaseModel):
    """Everything a worker needs, as one validated object (Ray passes it as a dict)."""

    pipeline: PipelineConfig
    data: PreparedData
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


class TrainResult(BaseModel):
    checkpoint_path: str
    run_name: str
    storage_path: str
    metrics: dict[str, float]


def model_config_for(cfg: PipelineConfig, vocab_size: int) -> ModelConfig:
    """Translate the pipeline's model section into attention_core's ModelConfig."""
    return ModelConfig(vocab_size=vocab_size, **cfg.model.model_dump())


# --------------------------------------------------------------------------------------- batches
def sample_batch(tokens: np.ndarray, *, batch_size: int, block_size: int, seed: int, step: int,
                 rank: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows drawn from a generator seeded by (seed, step, rank, micro): no shared state,
    so a resumed run sees exactly the batches an uninterrupted run would."""
    rng = np.random.default_rng([seed, step, rank, micro])
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    x = np.stack([tokens[s: s + block_size] for s in starts]).astype(np.int64)
    y = np.stack([tokens[s + 1: s + 1 + block_size] for s in starts]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def estimate_val_loss(model, tokens, cfg: PipelineConfig, rank: int, device) -> float:
    """Mean loss over eval_batches fixed validation batches (the same ones at every eval)."""
    model.eval()
    losses = []
    for i in range(cfg.train.eval_batches):
        x, y = sample_batch(tokens, batch_size=cfg.train.batch_size, block_size=cfg.model.block_size,
                            seed=cfg.train.seed + 1, step=i, rank=rank)
        _, loss = model(x.to(device), y.to(device))
        losses.append(loss.float())
    model.train()
    return torch.stack(losses).mean()


def _all_reduce_mean(value: torch.Tensor) -> float:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return float(value)


# --------------------------------------------------------------------------------------- worker
def train_loop_per_worker(config: dict) -> None:
    job = TrainJob.model_validate(config)
    import ray.train
    import ray.train.torch

    cfg = job.pipeline
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)  # identical init on every rank (DDP also broadcasts rank 0's)

    model = Transformer(model_config_for(cfg, job.data.vocab_size))
    model = ray.train.torch.prepare_model(model)
    raw = unwrap_model(model)
    optimizer = configure_optimizer(raw, lr=tc.lr, weight_decay=tc.weight_decay,
                                    betas=(tc.beta1, tc.beta2), device_type=device.type)
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            start_step = TrainState.load(ckpt_dir, raw, optimizer, map_location=device).step

    train_tokens = job.data.tokens("train")
    val_tokens = job.data.tokens("val")
    autocast = _autocast_dtype(tc.precision, device)
    logger = _MetricsLogger(job, rank) if rank == 0 else None
    tokens_per_step = tc.batch_size * cfg.model.block_size * tc.grad_accum * world
    flops_per_token = raw.flops_per_token()
    peak = _peak_flops(device)
    t_last, steps_since = time.perf_counter(), 0
    t_start = t_last
    last = {"train_loss": float("nan")}

    for step in range(start_step, tc.max_steps):
        torch.manual_seed(hash((tc.seed, step, rank)) & 0x7FFF_FFFF)  # dropout RNG, resumable
        micro = [tuple(t.to(device) for t in sample_batch(
            train_tokens, batch_size=tc.batch_size, block_size=cfg.model.block_size,
            seed=tc.seed, step=step, rank=rank, micro=m)) for m in range(tc.grad_accum)]
        lr = lr_at(step, lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps)
        result = train_step(model, optimizer, micro, lr=lr, grad_clip=tc.grad_clip,
                            autocast_dtype=autocast, device_type=device.type)
        done = step + 1
        steps_since += 1
        metrics: dict[str, float] = {}
        if done % tc.log_interval == 0 or done == tc.max_steps:
            now = time.perf_counter()
            tps = tokens_per_step * steps_since / (now - t_last)
            t_last, steps_since = now, 0
            metrics.update(train_loss=result.loss, lr=lr, grad_norm=result.grad_norm, tokens_per_sec=tps)
            if peak:
                metrics["mfu"] = flops_per_token * tps / (peak * world)
            if rank == 0:
                eta = (now - t_start) / (done - start_step) * (tc.max_steps - done)
                # sys.stdout.write, not print: Ray Train tees print() to its logger, doubling lines.
                sys.stdout.write(f"step {done}/{tc.max_steps} loss {result.loss:.4f} lr {lr:.2e} "
                                 f"{tps / 1e3:.1f}k tok/s ETA {eta:.0f}s\n")
                sys.stdout.flush()
        if done % tc.eval_interval == 0 or done == tc.max_steps:
            metrics["val_loss"] = _all_reduce_mean(estimate_val_loss(model, val_tokens, cfg, rank, device))
        if rank == 0 and metrics:
            logger.log(metrics, step=done)
        last.update(metrics)
        if done % tc.checkpoint_interval == 0 or done == tc.max_steps:
            _report_checkpoint(model, optimizer, done, cfg, rank, last)


def _report_checkpoint(model, optimizer, step: int, cfg: PipelineConfig, rank: int, metrics: dict) -> None:
    """All ranks report (it is a barrier); rank 0 alone writes and hands over the files."""
    import ray.train

    report = {"step": step, **{k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            ckpt_dir = Path(tmp) / "checkpoint"
            TrainState(model=unwrap_model(model), optimizer=optimizer, step=step,
                       extra={"pipeline": cfg.model_dump(mode="json")}).save(ckpt_dir)
            checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")


def _autocast_dtype(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class _MetricsLogger:
    """Rank 0's MLflow client: logs to the flow's run with an explicit tracking URI (no global state)."""

    def __init__(self, job: TrainJob, rank: int):
        self.client = None
        if job.tracking_uri and job.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=job.tracking_uri)
            self.run_id = job.mlflow_run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


# --------------------------------------------------------------------------------------- driver
def ensure_ray(cfg: PipelineConfig) -> bool:
    """Join cfg.train.ray_address / RAY_ADDRESS, else start a local Ray. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs = {"include_dashboard": False, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        return False
    ray.init(address="local", **kwargs)  # never silently join a cluster someone started with `ray start`
    return True


def train_model(cfg: PipelineConfig, data: PreparedData, *, run_name: str,
                tracking_uri: str | None = None, mlflow_run_id: str | None = None) -> TrainResult:
    """Run (or resume) Ray Train run `run_name` under the storage path; returns its final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    storage = cfg.storage_path()
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
    job = TrainJob(pipeline=cfg, data=data, tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {run_name} finished without a checkpoint")
    return TrainResult(checkpoint_path=result.checkpoint.path, run_name=run_name, storage_path=storage,
                       metrics={k: float(v) for k, v in (result.metrics or {}).items()
                                if isinstance(v, (int, float))})
