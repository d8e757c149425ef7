"""Training on Ray Train: the driver, the per-worker loop, checkpoints, data staging, metrics.

`train_model` (driver.py) builds a `TorchTrainer` and runs `train_loop_per_worker` (loop.py) on every
worker: attention_core's model, optimizer, lr schedule and `train_step`, plus what distribution needs
(DDP or FSDP2, the rank's share of each global batch, averaged validation loss, rank-0 metrics to
MLflow). job.py holds what the driver hands the workers and returns; batches.py the deterministic
batches and seeds that make a resumed run bitwise equal to an uninterrupted one; checkpoint.py the
one checkpoint format (attention_core's TrainState) for DDP and FSDP2; staging.py the copy of the
prepared data that workers on other nodes read; store_reach.py whether every node sees a local MLflow
store (rank 0 never logs to one of its own); metrics.py throughput, MFU and MLflow logging;
cluster.py what the joined cluster can place; supervise.py a `fit` the driver can stop.
"""

from flows.train.batches import mix_seed, sample_batch
from flows.train.checkpoint import local_checkpoint, restore_checkpoint, save_checkpoint
from flows.train.driver import check_cluster, ensure_ray, stop_ray, train_model
from flows.train.job import FaultInjection, TrainJob, TrainResult, global_batch_tokens, model_config_for
from flows.train.loop import estimate_val_loss, train_loop_per_worker
from flows.train.staging import localize_data, stage_data, staged_data_uri

__all__ = ["FaultInjection", "TrainJob", "TrainResult", "check_cluster", "ensure_ray", "estimate_val_loss",
           "global_batch_tokens", "local_checkpoint", "localize_data", "mix_seed", "model_config_for",
           "restore_checkpoint", "sample_batch", "save_checkpoint", "stage_data", "staged_data_uri", "stop_ray",
           "train_loop_per_worker", "train_model"]
