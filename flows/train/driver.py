"""The Ray Train driver: join or start Ray, build the `TorchTrainer`, run it, return its checkpoint.

The run name is stable for a flow run, so a Prefect retry re-runs the same Ray Train run and resumes
from its last checkpoint; a run name that was started before resumes only with the training settings it
was started with (runs.py). The driver sizes the workers and refuses any the cluster can never place,
makes sure every node reaches a local MLflow store (store_reach.py), stages the prepared data under the
storage path (for workers on other nodes), and hands each worker a `TrainJob`; `train_loop_per_worker`
(loop.py) does the rest; a run the workers stopped because it diverged comes back as their return value
and is raised here as a UserError (never retried). `fit` runs supervised (supervise.py): its start-up is
bounded, and the driver can stop it. Nothing here reads the environment: the Ray address and
any fault injection arrive in the config and the arguments.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flows.config import PipelineConfig
from flows.data import PreparedData
from flows.errors import UserError
from flows.masking import mask_uri
from flows.placement import describe, describe_need
from flows.train.cluster import alive_nodes, placed_cpus, worker_resources
from flows.train.job import FaultInjection, TrainJob, TrainResult
from flows.train.loop import DIVERGED, FINISHED_AT, STARTED_AT, train_loop_per_worker
from flows.train.runs import claim_run_settings
from flows.train.staging import stage_data
from flows.train.store_reach import absolute_store_uri, check_workers_reach_store


# Ray Train's knobs for a Ray that this process starts alone on its machine (a job-level runtime env,
# so a cluster that a run joins keeps its own): no node there is ever preempted, so no preemption
# watcher (one more actor process to start beside the workers), and the controller polls the
# workers every 0.5 s rather than every 2 s, so the end of training is noticed sooner.
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}

_stopping: threading.Thread | None = None  # a local Ray shutting down in the background (stop_ray)
from flows.train.supervise import as_clear_error, controller_callback, startup_bound, supervised_fit


def ensure_ray(cfg: PipelineConfig, *, dashboard: bool = False) -> bool:
    """Join cfg.train.ray_address, else start a local Ray (`dashboard`: with its dashboard, whose state
    API a sweep needs, see flows/sweep/tuner.py). Returns True if we started it."""
    import ray

    if _stopping is not None:
        _stopping.join()  # a Ray this process started before is gone before another starts
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": dashboard, "log_to_driver": True}
    if cfg.train.ray_address:
        try:
            ray.init(address=cfg.train.ray_address, **kwargs)
        except ConnectionError as err:  # after Ray's own retries
            if _token_refused(cfg.train.ray_address, err):  # never transient: not retried, one line
                raise UserError(f"train.ray_address: the Ray cluster at {cfg.train.ray_address} refused this "
                                "client's Ray token: run with RAY_AUTH_MODE=token and the cluster's token in "
                                "RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token") from None
            raise  # unreachable, maybe for now: the task's retries try again
        return False
    # never silently join a cluster someone started with `ray start`
    ray.init(address="local", runtime_env={"env_vars": LOCAL_RAY_TRAIN_ENV}, **kwargs)
    from flows.reaper import start_reaper

    start_reaper()  # if this process is killed, Ray's agents and workers go too (however the flow was started)
    return True


def _token_refused(address: str, err: BaseException) -> bool:
    """Whether joining the Ray cluster at `address` failed because it refused this client's token (Ray's
    token auth). Ray keeps only its last attempt's error, as text, which under load may be a timeout; so
    when that does not say, ask the cluster once more (it refuses a token at once)."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    cause: BaseException | None = err
    while cause is not None:  # ConnectionError <- RuntimeError("... Last connection error: <traceback>")
        if isinstance(cause, AuthenticationError) or "InvalidAuthToken" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError):  # nobody listens there (or not host:port): not a token
        return False
    try:
        GcsClient(address=address)
    except AuthenticationError:
        return True
    except Exception:  # noqa: BLE001 - anything else is for ray.init's own error to say
        return False
    return False


def stop_ray(*, in_background: bool = False, on_stopped: Callable[[float], None] | None = None) -> None:
    """ray.shutdown() of the Ray ensure_ray started; `in_background`: in a thread, while the caller goes
    on (the next ensure_ray, and the interpreter's exit, wait for it). on_stopped(seconds) once done."""
    import ray

    def stop() -> None:
        start = time.perf_counter()
        ray.shutdown()
        if on_stopped is not None:
            try:
                on_stopped(time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - a report on the stop, never a failure of it
                print(mask_uri(f"after ray.shutdown: {exc}"), file=sys.stderr)

    global _stopping
    if not in_background:
        stop()
        return
    _stopping = threading.Thread(target=stop, name="ray-shutdown")  # not a daemon: exit waits for it
    _stopping.start()


def check_cluster(cfg: PipelineConfig) -> None:
    """With train.ray_address, join that cluster and refuse workers it can never place (UserError), before
    the data stage: the preflight checks a local Ray before it starts (flows/preflight.py)."""
    if cfg.train.ray_address is not None:
        ensure_ray(cfg)
        placed_cpus(cfg.train)


def train_model(cfg: PipelineConfig, data: PreparedData, *, run_name: str, tracking_uri: str | None = None,
                mlflow_run_id: str | None = None, fault: FaultInjection | None = None,
                callbacks: list | None = None, progress: bool = True) -> TrainResult:
    """Run (or resume) Ray Train run `run_name` under the storage path; returns its final checkpoint.
    Workers the joined cluster can never place are refused before anything starts (flows/train/cluster.py);
    the worker group's start-up is bounded by train.startup_timeout_s, and an exception in this thread
    while it waits (the stage's time limit) stops the run and its workers first (flows/train/supervise.py).
    `callbacks`: more Ray Train callbacks; a sweep's trial passes Ray Tune's, and the workers then report
    every evaluation, not only the checkpoints. `progress`: rank 0's progress lines on the console."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    if tracking_uri and mlflow_run_id:  # before staging: a store the workers cannot reach is a user error
        tracking_uri = absolute_store_uri(tracking_uri)
        check_workers_reach_store(tracking_uri, mlflow_run_id)
    cpus = placed_cpus(tc)
    storage = cfg.storage_path()
    if "://" not in storage:
        storage = os.path.abspath(storage)
        Path(storage).mkdir(parents=True, exist_ok=True)
    claim_run_settings(cfg, storage, run_name, data.fingerprint)  # a reused name: the same training, or refused
    stage_data(data, storage)
    job = TrainJob(pipeline=cfg, data=data, tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id, fault=fault,
                   report_evals=bool(callbacks), progress=progress)
    score = tc.checkpoint_score
    callback, slot = controller_callback()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": cpus},
                                     placement_strategy=tc.placement_strategy),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            # a worker group that cannot start within train.startup_timeout_s ends the run (never retried here)
            failure_config=FailureConfig(max_failures=tc.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep, checkpoint_score_attribute=score,
                                               checkpoint_score_order="max" if score == "step" else "min"),
            callbacks=[callback, *(callbacks or [])],
        ),
    )
    called = time.time()
    try:
        with startup_bound(tc.startup_timeout_s):
            result = supervised_fit(trainer, slot)
    except Exception as err:
        asked = f"{tc.num_workers} x {describe_need(worker_resources(tc, cpus))}, {tc.placement_strategy}"
        clear = as_clear_error(err, startup_timeout_s=tc.startup_timeout_s, asked=asked,
                               nodes=lambda: describe(alive_nodes()))
        if clear is err:
            raise
        raise clear from None
    returned = time.time()
    if isinstance(result.return_value, dict) and result.return_value.get(DIVERGED):
        raise UserError(result.return_value[DIVERGED])
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"Ray Train run {run_name} under {storage} finished without a checkpoint")
    return TrainResult(checkpoint_path=checkpoint.path, run_name=run_name, storage_path=storage,
                       metrics={k: float(v) for k, v in (result.metrics or {}).items()
                                if isinstance(v, (int, float))},
                       stage_seconds=_fit_stages(result.return_value, called, returned))


def _fit_stages(value, called: float, returned: float) -> dict[str, float]:
    """worker_startup and train_teardown from the wall-clock times rank 0 returns (flows/timing.py)."""
    if not (isinstance(value, dict) and STARTED_AT in value and FINISHED_AT in value):
        return {}
    return {"worker_startup": max(0.0, value[STARTED_AT] - called),
            "train_teardown": max(0.0, returned - value[FINISHED_AT])}

