"""What a worker measures and reports while it trains: throughput, MFU, the progress line, MLflow.

`Throughput` turns step counts and the clock into tokens per second, model FLOPs utilisation (when
the device's peak is known) and an ETA. `print_progress` writes rank 0's one-line status.
`MetricsLogger` is rank 0's MLflow logging to the flow's run with an explicit tracking URI (workers
share no MLflow global state with the driver), kept off the loop's critical path by metric_buffer.py.
`all_reduce_mean` averages a value over ranks. `DivergenceWatch` notices the first step whose loss or
gradient norm is not finite and words the one line that stops the run.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from flows.train.job import TrainJob, global_batch_tokens
from flows.train.metric_buffer import MetricBuffer, Point
from flows.train.store_reach import require_store_here


def all_reduce_mean(value: torch.Tensor) -> float:
    """The mean of `value` over all ranks (the value itself outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return float(value)


class DivergenceWatch:
    """The last finite loss, and the one-line verdict for the first step that is not finite.

    Every rank must reach the same verdict at the same step, or the ranks that go on would wait for
    the others in the next collective. The gradient norm is taken after the data-parallel all-reduce
    (DDP) or gathered whole (FSDP2), so it is the same on every rank, and a non-finite loss on any one
    rank makes its gradients, hence everyone's norm, non-finite. A rank's own loss therefore decides
    only where it is the global one (`global_loss`: one worker, or the all-reduced logging loss).
    """

    def __init__(self, lr: float, grad_clip: float, start_step: int = 0):
        self.lr, self.grad_clip, self.start_step = lr, grad_clip, start_step
        self.last_loss: float | None = None
        self.last_step: int | None = None

    def check(self, step: int, loss: float, grad_norm: float, *, global_loss: bool) -> str | None:
        """None while training is finite (remembering `loss`), else the message naming `step`."""
        if math.isfinite(grad_norm) and (math.isfinite(loss) or not global_loss):
            if math.isfinite(loss):
                self.last_loss, self.last_step = loss, step
            return None
        return self.message(step, loss, grad_norm)

    def message(self, step: int, loss: float, grad_norm: float) -> str:
        if self.last_step is not None:
            before = f"last finite loss {self.last_loss:.4f} at step {self.last_step}"
        elif self.start_step:
            before = f"no finite loss since this attempt resumed at step {self.start_step}"
        else:
            before = "no finite loss before it"
        hint = f"lower train.lr (now {self.lr:g})"
        hint += " or set train.grad_clip (now 0: off)" if self.grad_clip == 0 else ""
        return f"training diverged at step {step}: loss {loss:.4g}, grad norm {grad_norm:.4g} ({before}); {hint}"


class Throughput:
    """Tokens per second over the steps since the last measurement, MFU, and the time left."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None,
                 world: int, start_step: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak, self.world, self.start_step = peak_flops, world, start_step
        self.t_start = self.t_last = time.perf_counter()
        self.steps_since = 0

    def step(self) -> None:
        self.steps_since += 1

    def measure(self) -> dict[str, float]:
        """tokens_per_sec (and mfu where the peak is known) since the previous call."""
        now = time.perf_counter()
        tps = self.tokens_per_step * self.steps_since / (now - self.t_last)
        self.t_last, self.steps_since = now, 0
        metrics = {"tokens_per_sec": tps}
        if self.peak:
            metrics["mfu"] = self.flops_per_token * tps / (self.peak * self.world)
        return metrics

    def eta(self, done: int, total: int) -> float:
        """Seconds left at the mean pace since this attempt started (a resume starts a new pace)."""
        return (time.perf_counter() - self.t_start) / (done - self.start_step) * (total - done)


def print_progress(done: int, total: int, loss: float, lr: float, tps: float, eta: float) -> None:
    # sys.stdout.write, not print: Ray Train tees print() to its logger, doubling every line.
    sys.stdout.write(f"step {done}/{total} loss {loss:.4f} lr {lr:.2e} {tps / 1e3:.1f}k tok/s "
                     f"ETA {eta:.0f}s\n")
    sys.stdout.flush()


class MetricsLogger:
    """Rank 0's MLflow logging to the flow's run, with an explicit tracking URI (workers share no MLflow
    global state with the driver), through a `MetricBuffer`: a tracking store that is down or locked
    holds no training step up, and no logging failure ends training."""

    def __init__(self, job: TrainJob, world: int, device: torch.device, *, carried: list | None = None,
                 carried_from: list | None = None, resumed_from: int = 0):
        """carried: the [key, value, timestamp, step] points the checkpoint resumed from holds unsent;
        carried_from: the MLflow run each was meant for; resumed_from: its step (0: a fresh start)."""
        self.buffer: MetricBuffer | None = None
        if not (job.tracking_uri and job.mlflow_run_id):
            return
        _short_http_tries()
        require_store_here(job.tracking_uri)  # never a store of its own on a node that cannot see the driver's
        cfg = job.pipeline
        params = {"global_batch_tokens": global_batch_tokens(cfg) // cfg.train.num_workers * world,
                  "world_size": world, "device": str(device)}
        points = [Point(str(k), float(v), int(ts), int(step)) for k, v, ts, step in carried or []]
        self.buffer = MetricBuffer(job.tracking_uri, job.mlflow_run_id, system_metrics=True, carried=points,
                                   carried_from=carried_from, resumed_from=resumed_from,
                                   params={k: str(v) for k, v in params.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.buffer is not None:
            self.buffer.add(metrics, step)

    def unsent(self) -> tuple[list[Point], list[str]]:
        """The points not yet in the store, and the MLflow run each is meant for, for the checkpoint to carry."""
        if self.buffer is None:
            return [], []
        points = self.buffer.unsent()
        return points, self.buffer.unsent_runs(points)

    def close(self) -> None:
        """Flush what is held (waiting a bounded time); says how many points were not logged, if any."""
        if self.buffer is not None:
            self.buffer.close()


def _short_http_tries() -> None:
    """One try per request, 20 s at most, unless this worker's environment says otherwise.

    MLflow's HTTP client retries a request for about 4 minutes by default; the buffer's thread retries
    itself, with a backlog to send, and the end of training waits for it a bounded time. MLflow reads
    these variables at each request and has no per-call setting; only this worker process sees them.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
