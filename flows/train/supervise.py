"""Run a Ray Train `fit` so that the driver can stop it, and bound its worker-group start-up.

`TorchTrainer.fit` blocks in `ray.get` on the Train controller, an actor the driver never sees; an
exception in the driver (a stage's time limit, flows/deadline.py, or Ctrl-C) would leave the controller
and its workers running. So `supervised_fit` runs `fit` in a thread and keeps a handle to the
controller, which a small controller callback sends to a slot actor as the controller starts. When the
driver's wait is interrupted, the controller is asked to abort (it shuts its worker group down and
removes the placement group), killed if it does not within `STOP_GRACE_S` (its workers, which it owns,
die with it; Ray Train's placement-group cleaner removes the group), and the interruption is raised
again, saying what was done.

Ray Train V2 retries a worker group that cannot start without limit (FailureConfig's
controller_failure_limit defaults to -1), each try waiting RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for
its placement group. `startup_bound` sets that wait to train.startup_timeout_s, read by the controller
when it starts (Ray propagates the variable from the driver), and the driver allows no retry of it: a
request the cluster cannot place within the bound, at the start or after a lost node, ends the run with
`WorkerStartTimeout` (a Prefect retry of the stage may find the nodes back and resumes from the last
checkpoint). The controller callback and the controller's `abort` are Ray Train's DeveloperAPI (Ray is
pinned in pyproject.toml).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from flows.errors import UserError

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # ray.train.v2._internal.constants
STOP_GRACE_S = 30.0


class WorkerStartTimeout(RuntimeError):
    """The worker group could not be placed within train.startup_timeout_s (a Prefect retry may find it)."""


@contextmanager
def startup_bound(seconds: float) -> Iterator[None]:
    """RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=seconds for the Train controllers started inside."""
    previous = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = f"{seconds:g}"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = previous


def controller_callback():
    """(callback for RunConfig.callbacks, slot actor holding the controller's handle once it starts)."""
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback

    @ray.remote(num_cpus=0)
    class ControllerSlot:
        def __init__(self) -> None:
            self.handle = None

        def put(self, handles: list) -> None:  # in a list: Ray passes a bare handle through as it is, too
            self.handle = handles[0]

        def get(self):
            return self.handle

    class ReportController(ControllerCallback):
        def __init__(self, slot) -> None:
            self.slot = slot

        def after_controller_start(self, train_run_context) -> None:
            # no ray.get: the controller's event loop must not block; the driver polls the slot
            self.slot.put.remote([ray.get_runtime_context().current_actor])

    slot = ControllerSlot.remote()
    return ReportController(slot), slot


def supervised_fit(trainer: Any, slot: Any) -> Any:
    """trainer.fit() in a thread; on any interruption of the wait, stop the run, then re-raise."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
            outcome["error"] = exc

    fit = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    try:
        fit.start()
        while fit.is_alive():
            fit.join(0.5)  # short waits: an asynchronous exception lands between them
    except BaseException as exc:
        try:
            stopped = stop_run(slot, fit)
        except Exception as failed:  # noqa: BLE001 - the interruption is what must surface
            stopped = f"stopping the Ray Train run failed ({type(failed).__name__}: {failed})"
        if hasattr(exc, "with_detail"):
            raise exc.with_detail(f": {stopped}") from None
        raise
    finally:
        _kill_quietly(slot)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def stop_run(slot: Any, fit: threading.Thread, grace_s: float = STOP_GRACE_S) -> str:
    """Abort the Train controller of `fit` (kill it past grace_s) and wait for `fit` to end; says what it did."""
    import ray

    handle = _controller(slot, fit, grace_s)
    if handle is None:
        return "the Ray Train run had not started a controller"
    how = "aborted"
    try:
        ray.get(handle.abort.remote(), timeout=grace_s)
    except ray.exceptions.GetTimeoutError:
        ray.kill(handle, no_restart=True)
        how = "killed"
    except ray.exceptions.RayActorError:
        pass  # abort ends the controller's process: its reply is the actor's death
    fit.join(grace_s)
    return f"the Ray Train run was {how} with its workers (its checkpoints are kept)"


def _controller(slot: Any, fit: threading.Thread, grace_s: float):
    """The controller's handle, waiting up to grace_s for one that is still starting."""
    import time

    import ray

    deadline = time.monotonic() + grace_s
    while True:
        try:
            handle = ray.get(slot.get.remote(), timeout=grace_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return None
        if handle is not None or not fit.is_alive() or time.monotonic() > deadline:
            return handle
        time.sleep(0.2)


def _kill_quietly(slot: Any) -> None:
    import ray

    try:
        ray.kill(slot)
    except Exception:  # noqa: BLE001 - gone with a shut-down Ray already
        pass


def as_clear_error(err: BaseException, *, startup_timeout_s: float, asked: str,
                   nodes: Callable[[], str]) -> BaseException:
    """Ray Train's start-up failures as one-line errors naming the key; anything else as it is."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import (InsufficientClusterResourcesError,
                                                   WorkerGroupStartupTimeoutError)

    cause = err.controller_failure if isinstance(err, ControllerError) else None
    if isinstance(cause, WorkerGroupStartupTimeoutError):
        return WorkerStartTimeout(
            f"train_model: the Ray Train workers ({asked}) could not be placed within train.startup_timeout_s="
            f"{startup_timeout_s:g} s; the cluster now has {nodes()} (nodes lost, busy, or still being added): "
            "raise train.startup_timeout_s, or lower train.num_workers")
    if isinstance(cause, InsufficientClusterResourcesError):
        first = str(cause).splitlines()[1] if len(str(cause).splitlines()) > 1 else str(cause)
        return UserError(f"train.num_workers: {asked} exceed what the autoscaler may ever add: {first}")
    return err
