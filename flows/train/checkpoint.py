"""Checkpoints: one format, attention_core's `TrainState`, for DDP, FSDP2 and a single process alike.

torch.distributed.checkpoint's state_dict API gathers the full (unsharded) model and optimizer state
from whatever wraps the model (DDP replicas, FSDP2 shards) as plain tensors keyed by parameter name.
Rank 0 hands them to TrainState as a plain Transformer and a by-name optimizer state; TrainState owns
the file names and writes every file inside a temporary directory that is renamed into place whole.
A restore reads the TrainState back strictly (a missing or unexpected weight or parameter is an
error) and scatters it into the prepared model and optimizer on every rank. `report_checkpoint`
hands the directory to Ray Train; `local_checkpoint` gives the driver the final one as a local path.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from attention_core import TrainState, Transformer, unwrap_model
from flows.config import PipelineConfig
from flows.train.job import TrainResult

UNSENT_METRICS = "unsent_metrics"  # extra's key: rank 0's MLflow points (key, value, timestamp, step) not yet sent
UNSENT_METRICS_RUNS = "unsent_metrics_runs"  # extra's key: the MLflow run each of them is meant for


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike,
                    *, step: int, extra: dict) -> bool:
    """Gather the full state and write it as a TrainState on rank 0; returns whether this rank wrote.

    Every rank must call it: gathering FSDP2 shards is a collective.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    raw = unwrap_model(model)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # with cpu_offload only rank 0 gets it
    weights = get_model_state_dict(raw, options=opts)
    optimizer_state = get_optimizer_state_dict(raw, optimizer, options=opts)
    if _rank() != 0:
        return False
    holder = raw  # replicated (DDP, one process): the model holds the full weights itself
    if any(isinstance(p, DTensor) for p in raw.parameters()):  # sharded: a plain model for the gathered ones
        holder = Transformer(raw.config)
        holder.load_state_dict(weights)  # strict: every weight was gathered
    TrainState(model=holder, optimizer=optimizer_state, step=step, extra=extra).save(directory)
    return True


def checkpoint_extra(directory: str | os.PathLike) -> dict:
    """The run metadata saved with a checkpoint (TrainState's `extra`), without loading any tensor."""
    return json.loads((Path(directory) / TrainState.STATE).read_text())["extra"]


def restore_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       directory: str | os.PathLike) -> int:
    """Load a TrainState directory into the prepared model and optimizer (every rank, strictly);
    returns the step it was taken at. RNG states are not restored: the loop seeds every step."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = TrainState.read(directory)
    if state.optimizer is None:
        raise FileNotFoundError(f"{directory}: a checkpoint without optimizer state cannot resume training")
    raw = unwrap_model(model)
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(raw, state.model.state_dict(), options=opts)
    set_optimizer_state_dict(raw, optimizer, state.optimizer, options=opts)
    return state.step


def report_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                      cfg: PipelineConfig, metrics: dict[str, float],
                      unsent_metrics: tuple[list, list[str]] | None = None) -> None:
    """Save and report the checkpoint of `step` to Ray Train with the latest metrics. All ranks
    report (it is a barrier); rank 0 alone writes and hands over the files, with the MLflow metric
    points it has not sent yet and the run each is meant for (an attempt that resumes from it sends them)."""
    import ray.train

    points, runs = unsent_metrics or ([], [])
    extra = {"pipeline": cfg.model_dump(mode="json"), "strategy": cfg.train.strategy,
             UNSENT_METRICS: [list(p) for p in points], UNSENT_METRICS_RUNS: runs}
    report = {"step": step, **{k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}}
    # Ray Train copies the files to the storage path in a background thread and then deletes them, so
    # training goes on while they travel; it waits for the copies before the run ends, and a resume or
    # get_all_reported_checkpoints() sees only checkpoints whose copy completed.
    directory = Path(tempfile.gettempdir()) / "attention-pipeline" / "checkpoints" / f"{uuid.uuid4().hex}-{step:08d}"
    written = save_checkpoint(model, optimizer, directory, step=step, extra=extra)
    checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if written else None
    ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}",
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


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
