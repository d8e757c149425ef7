"""Ray Train driver (`train_model`) and the per-worker loop (`train_loop_per_worker`).

The driver builds a `TorchTrainer` whose run name is stable for a flow run, so a Prefect retry re-runs
the same Ray Train run and resumes from its last checkpoint. The worker loop uses attention_core's
primitives (model, optimizer, lr schedule, train_step, TrainState) and only adds what distribution
needs: DDP or FSDP2, the rank's share of each global batch, averaged validation loss, rank-0 metrics
to MLflow, and checkpoints through `ray.train.report`. It never imports Prefect: workers have no
flow-run context.

Determinism: the global batch of a step is drawn from a generator seeded by (seed, step, micro-step)
and each rank takes its slice, and dropout is seeded by (seed, step, rank). Nothing depends on state
carried between steps except the weights and the optimizer, which checkpoints hold, so a run resumed
from a checkpoint ends bitwise equal to an uninterrupted one, and N workers see the same data as one
worker with N times the batch.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
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
    peak_flops,
    train_step,
    unwrap_model,
)
from flows.config import PipelineConfig
from flows.data import PreparedData


class FaultInjection(BaseModel):
    """Kill the rank-0 worker process with SIGKILL once, right after the checkpoint of `after_step`
    is reported (the marker file records that it happened). Recovery tests use it; runs never do."""

    after_step: int
    marker: str


def fault_from_env() -> FaultInjection | None:
    """Chaos testing of whole flow runs: ATTENTION_PIPELINE_FAULT_AFTER_STEP=N and
    ATTENTION_PIPELINE_FAULT_MARKER=/path kill the rank-0 worker once after checkpoint N."""
    step = os.environ.get("ATTENTION_PIPELINE_FAULT_AFTER_STEP")
    marker = os.environ.get("ATTENTION_PIPELINE_FAULT_MARKER")
    return FaultInjection(after_step=int(step), marker=marker) if step and marker else None


class TrainJob(BaseModel):
    """Everything a worker needs, as one validated object (Ray passes it as a dict)."""

    pipeline: PipelineConfig
    data: PreparedData
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    fault: FaultInjection | None = None


class TrainResult(BaseModel):
    checkpoint_path: str
    run_name: str
    storage_path: str
    metrics: dict[str, float]


def model_config_for(cfg: PipelineConfig, vocab_size: int) -> ModelConfig:
    """The pipeline's model section (attention_core's ModelConfig) with the tokenizer's vocabulary size."""
    return cfg.model.with_vocab(vocab_size)


def global_batch_tokens(cfg: PipelineConfig) -> int:
    tc = cfg.train
    return tc.batch_size * cfg.model.block_size * tc.grad_accum * tc.num_workers


# --------------------------------------------------------------------------------------- batches
def sample_batch(tokens: np.ndarray, *, batch_size: int, block_size: int, seed: int, step: int,
                 rank: int = 0, world_size: int = 1, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's `batch_size` windows of the global batch of (seed, step, micro).

    The global batch (world_size * batch_size windows) depends only on (seed, step, micro); rank r
    takes the r-th slice. No state is shared or carried, so resumes replay batches exactly.
    """
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - block_size - 1, size=world_size * batch_size)
    starts = starts[rank * batch_size: (rank + 1) * batch_size]
    x = np.stack([tokens[s: s + block_size] for s in starts]).astype(np.int64)
    y = np.stack([tokens[s + 1: s + 1 + block_size] for s in starts]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def estimate_val_loss(model, tokens, cfg: PipelineConfig, rank: int, world_size: int, device,
                      autocast_dtype=None) -> torch.Tensor:
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


def _all_reduce_mean(value: torch.Tensor) -> float:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return float(value)


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------------------- worker
def train_loop_per_worker(config: dict) -> None:
    job = TrainJob.model_validate(config)
    import ray
    import ray.train
    import ray.train.torch

    cfg, tc = job.pipeline, job.pipeline.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    data = localize_data(job.data, cfg.storage_path())
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    torch.set_num_threads(max(1, cpus))  # Ray's OMP_NUM_THREADS may not reach torch once it started
    torch.manual_seed(tc.seed)  # identical init on every rank

    model = _parallelize(Transformer(model_config_for(cfg, data.vocab_size)), tc.strategy)
    raw = unwrap_model(model)
    optimizer = configure_optimizer(raw, lr=tc.lr, weight_decay=tc.weight_decay,
                                    betas=(tc.beta1, tc.beta2), device_type=device.type)
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            start_step = _restore(model, optimizer, ckpt_dir, tc.strategy, device)
    if tc.compile:
        model = torch.compile(model)

    train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
    autocast = _autocast_dtype(tc.precision, device)
    logger = _MetricsLogger(job, cfg, world, device) if rank == 0 else None
    tokens_per_step = global_batch_tokens(cfg) // tc.num_workers * world
    flops_per_token, peak = raw.flops_per_token(), peak_flops(device)
    t_start = t_last = time.perf_counter()
    steps_since = 0
    last: dict[str, float] = {}
    try:
        for step in range(start_step, tc.max_steps):
            torch.manual_seed(_mix(tc.seed, step, rank))  # dropout: a function of (seed, step, rank)
            micro = [tuple(t.to(device, non_blocking=True) for t in sample_batch(
                train_tokens, batch_size=tc.batch_size, block_size=cfg.model.block_size, seed=tc.seed,
                step=step, rank=rank, world_size=world, micro=m)) for m in range(tc.grad_accum)]
            lr = lr_at(step, lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps)
            result = train_step(model, optimizer, micro, lr=lr, grad_clip=tc.grad_clip,
                                autocast_dtype=autocast, device_type=device.type)
            done, steps_since = step + 1, steps_since + 1
            is_checkpoint = done % tc.checkpoint_interval == 0 or done == tc.max_steps
            metrics: dict[str, float] = {}
            if done % tc.log_interval == 0 or done == tc.max_steps:
                now = time.perf_counter()
                tps = tokens_per_step * steps_since / (now - t_last)
                t_last, steps_since = now, 0
                loss = _all_reduce_mean(torch.tensor(result.loss))  # the global batch's loss
                metrics.update(train_loss=loss, lr=lr, grad_norm=result.grad_norm, tokens_per_sec=tps)
                if peak:
                    metrics["mfu"] = flops_per_token * tps / (peak * world)
                if rank == 0:
                    _progress(done, tc.max_steps, loss, lr, tps, (now - t_start) / (done - start_step))
            if done % tc.eval_interval == 0 or is_checkpoint:
                val = estimate_val_loss(model, val_tokens, cfg, rank, world, device, autocast)
                metrics["val_loss"] = _all_reduce_mean(val)
            if logger and metrics:
                logger.log(metrics, step=done)
            last.update(metrics)
            if is_checkpoint:
                _report_checkpoint(model, optimizer, done, cfg, rank, last)
                if job.fault and rank == 0 and done == job.fault.after_step:
                    _inject_fault(job.fault)
    finally:
        if logger:
            logger.close()


def _mix(*values: int) -> int:
    """A deterministic 31-bit seed from integers (Python's hash of str is salted; this is not)."""
    h = 0x345678
    for v in values:
        h = (h * 1_000_003) ^ (v & 0xFFFF_FFFF)
    return h & 0x7FFF_FFFF


def _progress(done: int, total: int, loss: float, lr: float, tps: float, sec_per_step: float) -> None:
    eta = sec_per_step * (total - done)
    # sys.stdout.write, not print: Ray Train tees print() to its logger, doubling every line.
    sys.stdout.write(f"step {done}/{total} loss {loss:.4f} lr {lr:.2e} {tps / 1e3:.1f}k tok/s "
                     f"ETA {eta:.0f}s\n")
    sys.stdout.flush()


def _inject_fault(fault: FaultInjection) -> None:
    import ray.train

    marker = Path(fault.marker)
    if not marker.exists():
        # Die like a crash some time after the checkpoint, not inside report(): wait until the
        # controller has registered it (a kill within its poll interval would lose the report).
        ray.train.get_all_reported_checkpoints()
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


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


def _full_state_dicts(model, optimizer):
    """Full (unsharded) model and optimizer state dicts, gathered on every rank (FSDP2)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def _restore(model, optimizer, ckpt_dir: str, strategy: str, device) -> int:
    """Load a checkpoint into the prepared model and optimizer; returns the step it was taken at."""
    raw = unwrap_model(model)
    if strategy == "ddp":
        return TrainState.load(ckpt_dir, raw, optimizer, map_location=device, restore_rng=False).step
    import json

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    weights = load_file(str(Path(ckpt_dir) / "model.safetensors"))
    set_model_state_dict(raw, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    optim = torch.load(Path(ckpt_dir) / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(raw, optimizer, optim, options=opts)
    return json.loads((Path(ckpt_dir) / "state.json").read_text())["step"]


def _report_checkpoint(model, optimizer, step: int, cfg: PipelineConfig, rank: int, metrics: dict) -> None:
    """All ranks report (it is a barrier); rank 0 alone writes and hands over the files."""
    import ray.train

    extra = {"pipeline": cfg.model_dump(mode="json"), "strategy": cfg.train.strategy}
    report = {"step": step, **{k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}}
    raw = unwrap_model(model)
    if cfg.train.strategy == "fsdp":
        weights, optim = _full_state_dicts(raw, optimizer)  # collective: every rank takes part
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            ckpt_dir = Path(tmp) / "checkpoint"
            if cfg.train.strategy == "fsdp":
                plain = Transformer(raw.config)
                plain.load_state_dict(weights, strict=False)
                TrainState(model=plain, optimizer=None, step=step, extra=extra).save(ckpt_dir)
                torch.save(optim, ckpt_dir / "optimizer.pt")
            else:
                TrainState(model=raw, optimizer=optimizer, step=step, extra=extra).save(ckpt_dir)
            checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")


def _autocast_dtype(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class _MetricsLogger:
    """Rank 0's MLflow client: metrics over steps and system metrics, logged to the flow's run with
    an explicit tracking URI (workers share no MLflow global state with the driver)."""

    def __init__(self, job: TrainJob, cfg: PipelineConfig, world: int, device: torch.device):
        self.client = self.monitor = None
        if not (job.tracking_uri and job.mlflow_run_id):
            return
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri=job.tracking_uri), job.mlflow_run_id
        params = {"global_batch_tokens": global_batch_tokens(cfg) // cfg.train.num_workers * world,
                  "world_size": world, "device": str(device)}
        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        if fresh:  # a resumed attempt must not re-log (MLflow params are immutable)
            self.client.log_batch(self.run_id, params=fresh)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, resume_logging=True,
                                                tracking_uri=job.tracking_uri)
            self.monitor.start()
        except Exception as exc:  # noqa: BLE001 - system metrics are a nicety, never a failure
            sys.stderr.write(f"system metrics disabled: {exc}\n")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()


# --------------------------------------------------------------------------------------- data staging
def staged_data_uri(storage_path: str, fingerprint: str) -> str:
    return f"{storage_path.rstrip('/')}/datasets/{fingerprint}"


def stage_data(data: PreparedData, storage_path: str) -> None:
    """Copy the prepared data under the storage path, where workers on other nodes can reach it."""
    import pyarrow.fs as pafs

    dest = staged_data_uri(storage_path, data.fingerprint)
    fs, dest_path = pafs.FileSystem.from_uri(dest if "://" in dest else os.path.abspath(dest))
    if fs.get_file_info(f"{dest_path}/meta.json").type != pafs.FileType.NotFound:
        return
    if os.path.abspath(data.path) == os.path.abspath(dest_path):
        return
    tmp = f"{dest_path}.tmp-{os.getpid()}"
    fs.create_dir(tmp, recursive=True)
    pafs.copy_files(data.path, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    try:
        fs.move(tmp, dest_path)
    except OSError:
        fs.delete_dir(tmp)  # another driver staged it first


def localize_data(data: PreparedData, storage_path: str) -> PreparedData:
    """The prepared data as a local directory on this node: as prepared when that path exists here
    (same machine or a shared filesystem), else copied from its staged copy under the storage path."""
    if (Path(data.path) / "meta.json").is_file():
        return data
    import pyarrow.fs as pafs

    source = staged_data_uri(storage_path, data.fingerprint)
    local = Path(tempfile.gettempdir()) / "attention-pipeline" / "data" / data.fingerprint
    if not (local / "meta.json").is_file():
        fs, src_path = pafs.FileSystem.from_uri(source if "://" in source else os.path.abspath(source))
        tmp = Path(f"{local}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(src_path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(tmp, local)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another worker on this node won
    return data.model_copy(update={"path": str(local)})


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


def train_model(cfg: PipelineConfig, data: PreparedData, *, run_name: str, tracking_uri: str | None = None,
                mlflow_run_id: str | None = None, fault: FaultInjection | None = None) -> TrainResult:
    """Run (or resume) Ray Train run `run_name` under the storage path; returns its final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    storage = cfg.storage_path()
    if "://" not in storage:
        storage = os.path.abspath(storage)
        Path(storage).mkdir(parents=True, exist_ok=True)
    stage_data(data, storage)
    cpus = tc.cpus_per_worker or worker_cpus(tc.num_workers, tc.use_gpu)
    job = TrainJob(pipeline=cfg, data=data, tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id, fault=fault)
    score = tc.checkpoint_score
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": cpus},
                                     placement_strategy=tc.placement_strategy),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep, checkpoint_score_attribute=score,
                                               checkpoint_score_order="max" if score == "step" else "min"),
        ),
    )
    result = trainer.fit()
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"Ray Train run {run_name} under {storage} finished without a checkpoint")
    return TrainResult(checkpoint_path=checkpoint.path, run_name=run_name, storage_path=storage,
                       metrics={k: float(v) for k, v in (result.metrics or {}).items()
                                if isinstance(v, (int, float))})


def worker_cpus(num_workers: int, use_gpu: bool) -> int:
    """CPUs per worker when not configured: the cluster's share per worker (1 on GPU clusters, where
    the GPU does the work and CPUs stay free for data loading)."""
    import ray

    if use_gpu:
        return 1
    return max(1, int(ray.cluster_resources().get("CPU", 1) // num_workers))


@contextmanager
def local_checkpoint(trained: TrainResult):
    """The final checkpoint as a local directory (downloaded when the storage path is remote)."""
    if "://" not in trained.storage_path and Path(trained.checkpoint_path).is_dir():
        yield trained.checkpoint_path
        return
    import pyarrow.fs as pafs
    import ray.train

    fs, _ = pafs.FileSystem.from_uri(trained.storage_path)
    with ray.train.Checkpoint(trained.checkpoint_path, filesystem=fs).as_directory() as d:
        yield d
