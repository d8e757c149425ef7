"""Where a run's time goes: each stage timed where it runs, logged as `stage_seconds.<stage>` metrics.

A stage is timed with `StageClock.stage(name)` (or `timed(name)` for one measurement) in the process
that runs it: the CLI (start-up, the temporary Prefect server), the flow's tasks (data prep, the
MLflow run, Ray, evaluation, figures, model logging, the gate) and rank 0 of the Ray Train workers
(set-up, first step, training, periodic evaluations, checkpoints). Stages measured before the flow's
MLflow run exists are held in the process (`hold`) until the first task that has the run logs them
(`take_held`). `STAGES` names every stage in pipeline order with what it covers; the pipeline
summary shows them as a table (`stage_table`). A retried task logs its stage again; the run shows
the last attempt's value.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

_now = time.perf_counter  # the clock every stage reads (a test replaces this, not the time module's)

PREFIX = "stage_seconds."

# Every stage, in the order a run goes through them, with what its seconds cover.
STAGES: dict[str, str] = {
    "startup": "the CLI: interpreter start, imports, config and input checks",
    "prefect_start": "waiting for the temporary Prefect server (none with PREFECT_API_URL)",
    "flow_start": "Prefect creating the flow run, until its first task",
    "prep": "data.source resolved and hashed, prepare_dataset (or its cache hit)",
    "mlflow_run": "finding or creating the MLflow run (the store's tables on first use)",
    "ray_start": "ray.init of a local Ray (joining a cluster: connecting to it)",
    "worker_startup": "TorchTrainer.fit until rank 0 enters the training loop (controller, worker group)",
    "worker_setup": "rank 0: data, model, optimizer, resume, MLflow client, until the first step",
    "first_step": "rank 0: the first training step of this attempt (warm-up included)",
    "training": "rank 0: every other step, with its logging",
    "evaluations": "rank 0: periodic validation-loss estimates",
    "checkpoints": "rank 0: saving and reporting checkpoints",
    "train_teardown": "from rank 0 leaving the loop until TorchTrainer.fit returns",
    "ray_stop": "ray.shutdown of the local Ray",
    "final_eval": "evaluate_model: scoring the validation split and sampling the prompts",
    "figures": "the attention and loss figures drawn, logged with the evaluation's metrics and samples",
    "model_logging": "the pyfunc model logged and registered",
    "gate": "the champion gate",
}


class StageClock:
    """Seconds per stage, summed over every time a stage is entered. `lap(name)` adds the time since
    the previous lap (or the clock's start) to `name`: a loop marks where each stage ends without
    wrapping its body in blocks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = _now()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def lap(self, name: str) -> None:
        now = _now()
        self.add(name, now - self._last)
        self._last = now

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = _now()
        try:
            yield
        finally:
            self.add(name, _now() - start)

    def metrics(self, names: list[str] | None = None) -> dict[str, float]:
        """`stage_seconds.<stage>` metrics of the stages in `names` (default: all) that were timed."""
        return {PREFIX + k: v for k, v in self.seconds.items() if names is None or k in names}


# Stages measured before the MLflow run exists, per flow run (None: before any flow run started,
# i.e. the CLI's own stages, which the first flow run of the process adopts).
_held: dict[str | None, dict[str, float]] = {}
_held_lock = threading.Lock()


def hold(name: str, seconds: float, flow_run_id: str | None = None) -> None:
    """Keep a stage's seconds in this process until `take_held` hands them to the run's logging."""
    with _held_lock:
        stages = _held.setdefault(flow_run_id, {})
        stages[name] = stages.get(name, 0.0) + seconds


@contextmanager
def holding(name: str, flow_run_id: str | None = None) -> Iterator[None]:
    """Time a block and `hold` its seconds."""
    start = _now()
    try:
        yield
    finally:
        hold(name, _now() - start, flow_run_id)


_opened: dict[str, float] = {}


def open_stage(name: str) -> None:
    """Start a held stage that ends in another function (`close_stage`), e.g. where the CLI hands
    over to Prefect and where the flow's first task begins."""
    _opened[name] = _now()


def close_stage(name: str, flow_run_id: str | None = None) -> None:
    """End a stage `open_stage` began (nothing if none is open: a flow run not started by the CLI)."""
    start = _opened.pop(name, None)
    if start is not None:
        hold(name, _now() - start, flow_run_id)


def take_held(flow_run_id: str | None) -> dict[str, float]:
    """The held stages of this flow run and the process's CLI stages, as metrics; each is taken once."""
    with _held_lock:
        stages = {**_held.pop(None, {}), **_held.pop(flow_run_id, {})}
    return {PREFIX + k: v for k, v in stages.items()}


def process_age() -> float:
    """Seconds since this process started (its interpreter start, before any import)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def stage_seconds(metrics: Mapping[str, float]) -> dict[str, float]:
    """The stages among an MLflow run's metrics, in pipeline order (unknown stages last)."""
    found = {k[len(PREFIX):]: v for k, v in metrics.items() if k.startswith(PREFIX)}
    order = [s for s in STAGES if s in found] + sorted(s for s in found if s not in STAGES)
    return {s: found[s] for s in order}


def stage_table(seconds: Mapping[str, float]) -> list[str]:
    """Markdown lines of a stage-time table, with the sum of the stages."""
    lines = ["| stage | seconds | what it covers |", "|---|---:|---|"]
    lines += [f"| {name} | {value:.2f} | {STAGES.get(name, '')} |" for name, value in seconds.items()]
    lines.append(f"| **sum** | **{sum(seconds.values()):.2f}** | |")
    return lines
