"""Rank 0's MLflow logging off the training loop's critical path: a bounded buffer and the thread that drains it.

The loop hands each logging step's metrics to `MetricBuffer.add`, which never waits on the tracking
store and never raises. A background thread logs the run's params, then sends the points with
`MlflowClient.log_batch` in the order they were added, up to 1000 a batch. While the tracking server
is down or its SQLite store is locked the points wait and the thread retries with backoff; when the
buffer is full, the oldest point not yet being sent is dropped and counted. `close` flushes what is
left for a bounded time, then the thread adds this attempt's drops to the run's tag
`tracking.dropped_points` (so it is 0 when nothing was lost) and `close` prints one line if anything
was.

Exactly once: a point keeps the timestamp of its `add`, so sending it again sends the same (key,
value, timestamp, step) row. A batch whose request failed may still have landed (committed by the
server, its response lost), so before sending such a batch again the thread reads back the history
of its keys and leaves out the points already there. The SQL stores would also ignore an identical
row (it is their primary key); MLflow's file store would not. What this cannot see: a request that the
server still holds unprocessed when the readback runs (a hung server that wakes up later) lands after
it, so a file store would then hold that batch twice.

Across a worker restart: each checkpoint carries the points not yet sent (`unsent`), and the attempt
that resumes from it sends them (`carried`), checking the store first; a point of a step after that
checkpoint that the store already holds was logged by the attempt that died, and training resumes
exactly, so the resumed attempt does not log that (key, step) again (`resumed_from`). Across a driver
loss the resuming attempt logs to a new MLflow run: each carried point names the run it was meant for
(`carried_from`, `unsent_runs`), a dead driver's run whose thread may have sent it after the checkpoint
was taken; the points that run holds are left out, so each point is in one of the runs, once, however
many driver losses it travelled through.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from typing import Callable, NamedTuple

from flows.masking import mask_uri

DROPPED_TAG = "tracking.dropped_points"
CAPACITY = 100_000  # points held while the store is away (about 20 MB)
BATCH = 1000  # MLflow's limit on the metrics of one log_batch
FLUSH_TIMEOUT_S = 120.0  # how long the end of training waits for the store (a server restart fits in it)
RETRY_S = (0.5, 15.0)  # backoff between tries: from the first, doubling up to the second
# What sending again cannot fix: the batch (or the params) is dropped and counted, not retried for ever.
# BAD_REQUEST is not here: MLflow's SQL store reports a lost database connection with it.
PERMANENT = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
                       "PERMISSION_DENIED", "UNAUTHENTICATED"})


class Point(NamedTuple):
    """One metric point as MLflow stores it; `timestamp` (ms) is fixed when it is added."""

    key: str
    value: float
    timestamp: int
    step: int


class _Abandoned(Exception):
    """close() stopped waiting: the thread leaves without touching the counts."""


class MetricBuffer:
    """Metric points for one MLflow run, sent in order by a background thread (see the module doc)."""

    def __init__(self, tracking_uri: str, run_id: str, *, params: dict[str, str] | None = None,
                 system_metrics: bool = False, carried: list[Point] | None = None,
                 carried_from: list[str | None] | None = None, resumed_from: int = 0, capacity: int = CAPACITY,
                 retry_s: tuple[float, float] = RETRY_S):
        self.tracking_uri, self.run_id, self.capacity = tracking_uri, run_id, capacity
        self.overflow = 0  # dropped from a full buffer
        self.rejected = 0  # refused by the store for good (PERMANENT)
        self.left_at_close = 0  # still held when close() stopped waiting
        self.sent = 0
        self.failed_tries = 0  # tries the store did not answer (down, locked)
        self._params, self._system_metrics, self._retry_s = dict(params or {}), system_metrics, retry_s
        self._queue: deque[Point] = deque()
        self._batch: list[Point] = []  # taken from the queue, not yet known to have landed
        self._uncertain = False  # a try at self._batch failed: some of it may have landed
        carried = list(carried or [])
        # the run each carried point was meant for, when not this one (a driver's that died)
        elsewhere = {p: run for p, run in zip(carried, carried_from or []) if run and run != run_id}
        kept = carried[len(carried) - capacity:] if len(carried) > capacity else carried
        self.overflow += len(carried) - len(kept)
        self._queue.extend(kept)
        self._maybe_landed = set(kept)  # from the checkpoint: an attempt that died may have sent them
        self._elsewhere = {p: elsewhere[p] for p in kept if p in elsewhere}  # until checked against that run
        self._resumed_from = resumed_from
        self._earlier: dict[str, set[int]] = {}  # key -> its steps after resumed_from the store held first
        self._failing = False  # the last try failed (an outage is being reported)
        self._closing = self._abandoned = False
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._prior_dropped = 0
        self._tag_written = False
        self._client = self._monitor = None
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the training loop's side
    def add(self, metrics: dict[str, float], step: int) -> None:
        """Hold `metrics` of `step` for sending; drops (and counts) the oldest unsent point when full."""
        timestamp = int(time.time() * 1000)
        with self._cond:
            for key, value in metrics.items():
                if len(self._queue) + len(self._batch) >= self.capacity:
                    self.overflow += 1
                    if not self._queue:
                        continue  # all that is held is being sent: the new point is the one dropped
                    self._queue.popleft()
                self._queue.append(Point(key, float(value), timestamp, step))
            self._cond.notify()

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Send what is held, waiting at most timeout_s; returns the points that were not logged."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._wake.set()  # cut a backoff short: the flush starts now
        self._thread.join(timeout_s)
        with self._cond:
            self._abandoned = True  # a thread still trying leaves at its next step, counting nothing more
            self.left_at_close = len(self._queue) + len(self._batch)
            self._cond.notify_all()
        self._wake.set()
        dropped = self.dropped
        if dropped:
            self._say(self._drop_line(timeout_s))
        return dropped

    def unsent(self) -> list[Point]:
        """The points not yet known to be in the store, oldest first (a checkpoint carries them)."""
        with self._cond:
            return [*self._batch, *self._queue]

    def unsent_runs(self, points: list[Point]) -> list[str]:
        """The run each of `points` (from unsent) is meant for: this one, or a dead driver's not yet checked."""
        with self._cond:
            return [self._elsewhere.get(p, self.run_id) for p in points]

    @property
    def dropped(self) -> int:
        return self.overflow + self.rejected + self.left_at_close

    def _drop_line(self, timeout_s: float) -> str:
        waited = f"not sent: the tracking store did not answer in the {timeout_s:g}s the end of training waits"
        parts = [(self.overflow, f"dropped from the full buffer ({self.capacity} points)"),
                 (self.rejected, "refused by the tracking store"),
                 (self.left_at_close, waited)]
        why = "; ".join(f"{n} {text}" for n, text in parts if n)
        tag = (f"the run's tag {DROPPED_TAG} says so" if self._tag_written
               else f"the run's tag {DROPPED_TAG} could not be written")
        return f"{self.dropped} metric point(s) of MLflow run {self.run_id} were not logged ({why}); {tag}"

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            self._retry(self._setup, on_refused=self._params_refused)
            self._start_monitor()
            while self._next_batch():
                self._retry(self._send, on_refused=self._batch_refused)
                with self._cond:
                    self._check_abandoned()
                    self.sent += len(self._batch)
                    self._batch = []
            self._stop_monitor()
            self._retry(self._write_tag, on_refused=self._tag_refused)
        except _Abandoned:
            pass
        except Exception as err:  # noqa: BLE001 - a bug here must not reach training; close() counts what is left
            self._say(f"metric logging stopped: {_one_line(err)}")
            with self._cond:
                self._abandoned = True

    def _next_batch(self) -> bool:
        """Take the next batch from the queue, waiting for one; False once closing and all is sent."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            self._check_abandoned()
            self._batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            return bool(self._batch)

    def _retry(self, attempt: Callable[[], None], on_refused: Callable[[Exception], None]) -> None:
        """attempt() until it works or the store refuses it for good; backs off while it cannot answer."""
        delay = self._retry_s[0]
        while True:
            self._check_abandoned()
            try:
                attempt()
            except Exception as err:  # noqa: BLE001 - the store is down, locked, or refuses
                if getattr(err, "error_code", None) in PERMANENT:
                    on_refused(err)
                    return
                self.failed_tries += 1
                if not self._failing:
                    self._failing = True
                    self._say(f"cannot log to {mask_uri(self.tracking_uri)} ({_one_line(err)}); training goes "
                              f"on, metric points are held (up to {self.capacity}) and sent when it answers")
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(delay * 2, self._retry_s[1])
                continue
            if self._failing:
                self._failing = False
                with self._cond:
                    held = len(self._queue) + len(self._batch)
                self._say(f"the tracking store answers again; sending the {held} held metric point(s)")
                self._restart_monitor()
            return

    def _check_abandoned(self) -> None:
        if self._abandoned:
            raise _Abandoned

    # ------------------------------------------------------------------ one try each
    def _setup(self) -> None:
        """The client, the run's params (a resumed attempt logs only new ones) and the earlier drop count."""
        from mlflow.entities import Param

        if self._client is None:
            self._client = self._connect()
        run = self._client.get_run(self.run_id)
        self._prior_dropped = _as_int(run.data.tags.get(DROPPED_TAG))
        fresh = [Param(k, v) for k, v in self._params.items() if k not in run.data.params]
        if fresh:  # MLflow params are immutable: a resumed attempt must not log them again
            self._client.log_batch(self.run_id, params=fresh)
        for run in dict.fromkeys(self._elsewhere.values()):
            self._leave_out_landed_in(run)

    def _leave_out_landed_in(self, run: str) -> None:
        """Leave out the carried points meant for `run` (not this one) that it holds (see the module doc)."""
        points = {p for p, meant in self._elsewhere.items() if meant == run}
        try:
            landed = {(m.key, m.step, m.timestamp) for key in dict.fromkeys(p.key for p in points)
                      for m in self._client.get_metric_history(run, key)}
        except Exception as err:  # noqa: BLE001 - that run is gone for good: send them all here
            if getattr(err, "error_code", None) not in PERMANENT:
                raise  # the store is away: _setup is tried again
            landed = set()
        with self._cond:
            there = {p for p in points if (p.key, p.step, p.timestamp) in landed}
            self._queue = deque(p for p in self._queue if p not in there)
            self._maybe_landed -= there
            for p in points:
                del self._elsewhere[p]

    def _connect(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _send(self) -> None:
        from mlflow.entities import Metric

        batch = self._batch
        if self._uncertain or not self._maybe_landed.isdisjoint(batch):
            batch = self._not_landed(batch)
        if self._resumed_from:
            batch = self._not_logged_before(batch)
        if batch:
            self._uncertain = True  # until the store says it has them
            self._client.log_batch(self.run_id, metrics=[Metric(*p) for p in batch])
        self._uncertain = False
        self._maybe_landed.difference_update(self._batch)

    def _not_landed(self, batch: list[Point]) -> list[Point]:
        """The points of batch that the store does not hold (an earlier try may have landed)."""
        landed = {(m.key, m.step, m.timestamp) for key in dict.fromkeys(p.key for p in batch)
                  for m in self._client.get_metric_history(self.run_id, key)}
        return [p for p in batch if (p.key, p.step, p.timestamp) not in landed]

    def _not_logged_before(self, batch: list[Point]) -> list[Point]:
        """batch less the (key, step) points past resumed_from that an attempt which died logged first."""
        for key in dict.fromkeys(p.key for p in batch if p.key not in self._earlier):  # before we send any
            self._earlier[key] = {m.step for m in self._client.get_metric_history(self.run_id, key)
                                  if m.step > self._resumed_from}
        return [p for p in batch if p.step not in self._earlier[p.key]]

    def _write_tag(self) -> None:
        from mlflow.entities import RunTag

        total = self._prior_dropped + self.overflow + self.rejected
        self._client.log_batch(self.run_id, tags=[RunTag(DROPPED_TAG, str(total))])
        self._tag_written = True

    def _params_refused(self, err: Exception) -> None:
        self._say(f"the run's params were not logged: {_one_line(err)}")

    def _batch_refused(self, err: Exception) -> None:
        with self._cond:
            self.rejected += len(self._batch)
            self._batch = []
        self._uncertain = False
        self._say(f"the tracking store refused metric points: {_one_line(err)}")

    def _tag_refused(self, err: Exception) -> None:
        self._say(f"the run's tag {DROPPED_TAG} was not written: {_one_line(err)}")

    # ------------------------------------------------------------------ MLflow's system metrics
    def _start_monitor(self) -> None:
        if not self._system_metrics or self._monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, resume_logging=True,
                                                 tracking_uri=self.tracking_uri)
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001 - system metrics are a nicety, never a failure
            self._say(f"system metrics disabled: {_one_line(exc)}")
            self._system_metrics = False

    def _restart_monitor(self) -> None:
        """MLflow's monitor ends at its first failed request: a running one is replaced after an outage."""
        if self._monitor is not None:
            self._stop_monitor()
            self._start_monitor()

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    @staticmethod
    def _say(line: str) -> None:
        # sys.stderr.write, not print: Ray Train tees print() to its logger, doubling every line.
        sys.stderr.write(f"MLflow: {mask_uri(line)}\n")
        sys.stderr.flush()


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _as_int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0
