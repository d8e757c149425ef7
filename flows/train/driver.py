"""The Ray Train driver: join or start Ray, build the `TorchTrainer`, run it, return its checkpoint.

The run name is stable for a flow run, so a Prefect retry re-runs the same Ray Train run and resumes
from its last checkpoint. The driver stages the prepared data under the storage path (for workers on
other nodes), sizes the workers, and hands each one a `TrainJob`; `train_loop_per_worker` (loop.py)
does the rest; a run the workers stopped because it diverged comes back as their return value and is
raised here as a UserError (never retried). Nothing here reads the environment: the Ray address and
any fault injection arrive in the config and the arguments.
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.config import PipelineConfig
from flows.data import PreparedData
from flows.errors import UserError
from flows.train.job import FaultInjection, TrainJob, TrainResult
from flows.train.loop import DIVERGED, train_loop_per_worker
from flows.train.staging import stage_data


def ensure_ray(cfg: PipelineConfig) -> bool:
    """Join cfg.train.ray_address, else start a local Ray. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": True}
    if cfg.train.ray_address:
        ray.init(address=cfg.train.ray_address, **kwargs)
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
    if isinstance(result.return_value, dict) and result.return_value.get(DIVERGED):
        raise UserError(result.return_value[DIVERGED])
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
