"""The per-worker training loop that Ray Train runs on every rank (`train_loop_per_worker`).

It reads as a training loop: build the model and optimizer from attention_core, wrap them for data
parallelism (DDP or FSDP2), resume from the last checkpoint if there is one, then step: sample this
rank's share of the global batch, take one `train_step`, and now and then log, validate and
checkpoint. A step whose loss or gradient norm is not finite ends the loop on every rank at once,
returning the one-line verdict instead of raising: Ray Train would retry an exception as a worker
failure and diverge again from the last checkpoint, while a return value reaches the driver
(`Result.return_value`), which raises it as a UserError. Setup details sit in small helpers below the
loop; batches and seeds live in batches.py, checkpoints in checkpoint.py, throughput, MLflow and the
divergence watch in metrics.py. It never imports Prefect: workers have no flow-run context.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from attention_core import (StepResult, Transformer, configure_optimizer, lr_at, peak_flops, train_step,
                            unwrap_model)
from flows.config import PipelineConfig
from flows.timing import StageClock
from flows.train.batches import mix_seed, sample_batch
from flows.train.checkpoint import (UNSENT_METRICS, UNSENT_METRICS_RUNS, checkpoint_extra, report_checkpoint,
                                    restore_checkpoint)
from flows.train.job import FaultInjection, TrainJob, global_batch_tokens, model_config_for
from flows.train.metrics import DivergenceWatch, MetricsLogger, Throughput, all_reduce_mean, print_progress
from flows.train.staging import localize_data


DIVERGED = "diverged"  # the key of the return value that says training stopped on a non-finite step
STARTED_AT, FINISHED_AT = "started_at", "finished_at"  # rank 0's wall clock at the loop's ends (timing)


def train_loop_per_worker(config: dict) -> dict[str, str | float]:
    """Train this rank; returns {DIVERGED: message} if a step's loss or gradient norm was not finite,
    else when the loop began and ended ({STARTED_AT, FINISHED_AT}: the driver's stage times)."""
    started_at, clock = time.time(), StageClock()  # stages of rank 0, logged with its metrics
    job = TrainJob.model_validate(config)
    import ray.train
    import ray.train.torch

    cfg, tc = job.pipeline, job.pipeline.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    data = localize_data(job.data, cfg.storage_path())
    _use_assigned_cpus()

    model, optimizer = _build(cfg, data.vocab_size, device)
    start_step, unsent_metrics, metrics_runs = _resume(model, optimizer)
    if tc.compile:
        model = torch.compile(model)

    train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
    autocast = _autocast_dtype(tc.precision, device)
    meter = Throughput(global_batch_tokens(cfg) // tc.num_workers * world, unwrap_model(model).flops_per_token(),
                       peak_flops(device), world, start_step)
    logger = (MetricsLogger(job, world, device, carried=unsent_metrics, carried_from=metrics_runs,
                            resumed_from=start_step) if rank == 0 else None)
    last: dict[str, float] = {}
    watch = DivergenceWatch(tc.lr, tc.grad_clip, start_step)
    clock.lap("worker_setup")
    try:
        for step in range(start_step, tc.max_steps):
            torch.manual_seed(mix_seed(tc.seed, step, rank))  # dropout: a function of (seed, step, rank)
            batches = _micro_batches(train_tokens, cfg, step, rank, world, device)
            lr = lr_at(step, lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps,
                       schedule=tc.schedule, decay_fraction=tc.decay_fraction)
            result = train_step(model, optimizer, batches, lr=lr, grad_clip=tc.grad_clip,
                                autocast_dtype=autocast, device_type=device.type)
            done = step + 1
            meter.step()
            # train_step has already read loss and norm to the host: checking them costs no sync
            if diverged := watch.check(done, result.loss, result.grad_norm, global_loss=world == 1):
                return _stop_diverged(diverged, result, logger, done)
            checkpoint_now = done % tc.checkpoint_interval == 0 or done == tc.max_steps

            metrics: dict[str, float] = {}
            if done % tc.log_interval == 0 or done == tc.max_steps:
                loss = all_reduce_mean(torch.tensor(result.loss))  # the global batch's loss
                if diverged := watch.check(done, loss, result.grad_norm, global_loss=True):
                    return _stop_diverged(diverged, result, logger, done)
                metrics.update(train_loss=loss, lr=lr, grad_norm=result.grad_norm, **meter.measure())
                if rank == 0 and job.progress:
                    print_progress(done, tc.max_steps, loss, lr, metrics["tokens_per_sec"],
                                   meter.eta(done, tc.max_steps))
            step_stage = "first_step" if step == start_step else "training"
            if done % tc.eval_interval == 0 or checkpoint_now:
                clock.lap(step_stage)
                val = estimate_val_loss(model, val_tokens, cfg, rank, world, device, autocast)
                metrics["val_loss"] = all_reduce_mean(val)
                clock.lap("evaluations")
            if logger and metrics:
                logger.log(metrics, step=done)
            last.update(metrics)
            if job.report_evals and "val_loss" in metrics and not checkpoint_now:
                _report_eval(done, last)  # a sweep's scheduler reads it (a checkpoint reports the same)
            clock.lap(step_stage)

            if checkpoint_now:
                report_checkpoint(model, optimizer, done, cfg, last, logger.unsent() if logger else None)
                clock.lap("checkpoints")
                if logger:
                    logger.log(clock.metrics(), step=done)
                if job.fault and rank == 0 and done == job.fault.after_step:
                    _inject_fault(job.fault)
    finally:
        if logger:
            logger.close()
    return {STARTED_AT: started_at, FINISHED_AT: time.time()}


def _report_eval(step: int, metrics: dict[str, float]) -> None:
    """Report the latest metrics to Ray Train without a checkpoint (every rank: it is a barrier), so that
    a sweep's scheduler (Ray Tune, through TuneReportCallback) sees each evaluation."""
    import ray.train

    ray.train.report({"step": step, **{k: float(v) for k, v in metrics.items()}})


def _stop_diverged(message: str, result: StepResult, logger: MetricsLogger | None, step: int) -> dict[str, str]:
    """Record the non-finite step (rank 0: in MLflow) and hand the verdict back as the return value."""
    if logger:
        logger.log({"train_loss": result.loss, "grad_norm": result.grad_norm}, step=step)
    return {DIVERGED: message}


@torch.no_grad()
def estimate_val_loss(model, tokens: np.ndarray, cfg: PipelineConfig, rank: int, world_size: int,
                      device: torch.device, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean loss over eval_batches fixed validation batches (the same ones at every eval)."""
    model.eval()
    losses = []
    for i in range(cfg.train.eval_batches):
        x, y = sample_batch(tokens, batch_size=cfg.train.batch_size, block_size=cfg.model.block_size,
                            seed=cfg.train.seed + 1, step=i, rank=rank, world_size=world_size)
        with _autocast(device, autocast_dtype):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.float())
    model.train()
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------------------- setup
def _use_assigned_cpus() -> None:
    import ray

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    torch.set_num_threads(max(1, cpus))  # Ray's OMP_NUM_THREADS may not reach torch once it started


def _build(cfg: PipelineConfig, vocab_size: int, device: torch.device):
    """The Transformer, identically initialised on every rank and wrapped for data parallelism,
    and its optimizer (AdamW, or Muon with AdamW)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)  # identical init on every rank
    model = _parallelize(Transformer(model_config_for(cfg, vocab_size)), tc.strategy)
    optimizer = configure_optimizer(unwrap_model(model), lr=tc.lr, weight_decay=tc.weight_decay,
                                    betas=(tc.beta1, tc.beta2), device_type=device.type, optimizer=tc.optimizer,
                                    muon_lr=tc.muon_lr, muon_momentum=tc.muon_momentum,
                                    muon_weight_decay=tc.muon_weight_decay)
    return model, optimizer


def _parallelize(model: Transformer, strategy: str) -> torch.nn.Module:
    """DDP through Ray's prepare_model, or FSDP2 (`fully_shard` per block, then the root)."""
    import ray.train.torch

    if strategy == "ddp":
        return ray.train.torch.prepare_model(model)
    model = ray.train.torch.prepare_model(model, parallel_strategy=None)  # moves to the device
    from torch.distributed.fsdp import fully_shard

    for block in model.h:
        fully_shard(block)
    return fully_shard(model)


def _resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list, list]:
    """Restore Ray Train's latest checkpoint of this run, if any; returns the step to start from, the
    MLflow metric points the attempt that wrote it had not sent, and the MLflow run each was meant for."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, [], []
    with checkpoint.as_directory() as directory:
        extra = checkpoint_extra(directory)
        step = restore_checkpoint(model, optimizer, directory)
    return step, extra.get(UNSENT_METRICS, []), extra.get(UNSENT_METRICS_RUNS, [])


def _micro_batches(tokens: np.ndarray, cfg: PipelineConfig, step: int, rank: int, world: int,
                   device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's grad_accum micro-batches of step `step`, on the device."""
    tc = cfg.train
    batches = [sample_batch(tokens, batch_size=tc.batch_size, block_size=cfg.model.block_size, seed=tc.seed,
                            step=step, rank=rank, world_size=world, micro=m) for m in range(tc.grad_accum)]
    return [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batches]


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _inject_fault(fault: FaultInjection) -> None:
    import ray.train

    marker = Path(fault.marker)
    if not marker.exists():
        # Die like a crash some time after the checkpoint, not inside report(): wait until the
        # controller has registered it (a kill within its poll interval would lose the report).
        ray.train.get_all_reported_checkpoints()
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
