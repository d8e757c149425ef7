"""Which process drives a pipeline's MLflow run, and what happens to a run whose driver died.

A driver killed outright (SIGKILL, the OOM killer, a lost machine) runs no exit hook, so its MLflow
run stays RUNNING. Every MLflow run the pipeline creates therefore records its driver in the tag
`pipeline.driver` (`driver_record`): the host name, the kernel's boot id, the process-id namespace, the
pid and the process's start time; a retry of the same flow run in another process records itself there.
From a record, `driver_state` tells: *alive* when this machine can see that process (same boot id and
pid namespace) and a process with that pid and start time exists; *gone* when this machine could see it
and it does not; *unknown* otherwise (another machine or container).

The rule, applied by `close_stale_runs` whenever a flow run creates its MLflow run:
- a RUNNING run of the experiment whose driver is gone is closed as KILLED, whatever its Ray Train run;
- a RUNNING run with the same Ray Train run name (`ray.run_name`) whose driver is alive is refused
  (UserError): two drivers would train one run;
- a RUNNING run with the same Ray Train run name whose driver is unknown is closed as KILLED: reusing a
  run name says its earlier driver is gone, which this machine cannot check (the warning says so).
Each closed run gets the tag `pipeline.closed_by` (the MLflow run that closed it).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from functools import cache

from flows.errors import UserError

DRIVER_TAG = "pipeline.driver"
RAY_RUN_TAG = "ray.run_name"
CLOSED_BY_TAG = "pipeline.closed_by"
log = logging.getLogger(__name__)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _machine() -> tuple[str, str]:
    """(boot id, pid namespace): equal for processes that can see each other's pids."""
    import psutil

    boot = _read("/proc/sys/kernel/random/boot_id") or f"boot-time-{psutil.boot_time():.0f}"
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return boot, pidns


@cache
def driver_record() -> str:
    """This process as a driver record (JSON, the value of DRIVER_TAG)."""
    import psutil

    boot, pidns = _machine()
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
                       "boot_id": boot, "pid_ns": pidns})


def driver_state(record: str | None) -> str:
    """'alive', 'gone' or 'unknown' (see the module docstring) of a driver record."""
    import psutil

    try:
        d = json.loads(record or "")
        where, pid, started = (d["boot_id"], d["pid_ns"]), int(d["pid"]), float(d["started"])
    except (ValueError, KeyError, TypeError):
        return "unknown"
    if where != _machine():
        return "unknown"
    try:
        alive = abs(psutil.Process(pid).create_time() - started) < 0.05  # not a later process with its pid
    except psutil.NoSuchProcess:
        return "gone"
    return "alive" if alive else "gone"


def _describe(record: str | None) -> str:
    try:
        d = json.loads(record or "")
        return f"pid {d['pid']} on {d['host']}"
    except (ValueError, KeyError, TypeError):
        return "an unrecorded driver"


def close_stale_runs(client, experiment_id: str, ray_run_name: str | None, closed_by: str) -> list[str]:
    """Apply the module's rule to the RUNNING runs of the experiment before a new run is created;
    returns the ids of the runs closed as KILLED."""
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    closed = []
    for run in running:
        record = run.data.tags.get(DRIVER_TAG)
        same_name = ray_run_name is not None and run.data.tags.get(RAY_RUN_TAG) == ray_run_name
        if record is None and not same_name:
            continue  # not a pipeline's run (made by hand, or by a test)
        state = driver_state(record)
        if state == "alive" and same_name:
            raise UserError(f"train.run_name: run {ray_run_name!r} is being trained by a live driver ({_describe(record)}, "
                            f"MLflow run {run.info.run_id}): wait for it, stop it, or choose a new train.run_name")
        if state == "gone" or (state == "unknown" and same_name):
            why = ("its driver is gone" if state == "gone" else
                   "its driver could not be checked from here and its Ray Train run name is being reused")
            client.set_tag(run.info.run_id, CLOSED_BY_TAG, closed_by)
            client.set_terminated(run.info.run_id, status="KILLED")
            log.warning("MLflow run %s (%s) was left RUNNING by %s; closed as KILLED: %s", run.info.run_id,
                        run.data.tags.get(RAY_RUN_TAG, "no Ray Train run"), _describe(record), why)
            closed.append(run.info.run_id)
    return closed
