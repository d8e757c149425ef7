"""What the driver hands to every Ray Train worker, and what it returns.

`TrainJob` is the one validated object a worker starts from (Ray passes it as a dict: the worker's
first line turns it back), `TrainResult` is the driver's answer (the final checkpoint and metrics),
and `FaultInjection` lets recovery tests kill a worker at a chosen checkpoint. `model_config_for`
and `global_batch_tokens` derive the model and batch sizes from the pipeline config, so driver,
workers and benchmarks compute them one way.
"""

from __future__ import annotations

from pydantic import BaseModel

from attention_core import ModelConfig
from flows.config import PipelineConfig
from flows.data import PreparedData


class FaultInjection(BaseModel):
    """Kill the rank-0 worker process with SIGKILL once, right after the checkpoint of `after_step`
    is reported (the marker file records that it happened). Recovery tests use it; runs never do."""

    after_step: int
    marker: str


class TrainJob(BaseModel):
    """Everything a worker needs, as one validated object (Ray passes it as a dict)."""

    pipeline: PipelineConfig
    data: PreparedData
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    fault: FaultInjection | None = None
    report_evals: bool = False  # report every evaluation to Ray Train, not only checkpoints (sweeps)
    progress: bool = True  # rank 0 prints a progress line at each log step (a sweep prints per trial instead)


class TrainResult(BaseModel):
    checkpoint_path: str
    run_name: str
    storage_path: str
    metrics: dict[str, float]
    stage_seconds: dict[str, float] = {}  # the driver's stages (flows/timing.py): worker start-up, tear-down


def model_config_for(cfg: PipelineConfig, vocab_size: int) -> ModelConfig:
    """The pipeline's model section (attention_core's ModelConfig) with the tokenizer's vocabulary size."""
    return cfg.model.with_vocab(vocab_size)


def global_batch_tokens(cfg: PipelineConfig) -> int:
    """Tokens in one optimizer step over all configured workers."""
    tc = cfg.train
    return tc.batch_size * cfg.model.block_size * tc.grad_accum * tc.num_workers
