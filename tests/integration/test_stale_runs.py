"""MLflow runs left RUNNING by dead drivers (flows/registry/drivers.py), on a real SQLite store: the next
pipeline run closes each one as KILLED when its driver is gone, or when its Ray Train run name is reused
and its driver cannot be checked; it refuses a Ray Train run that a live driver is training; and a retry
of a flow run in another process takes its MLflow run over."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from flows.config import load_config
from flows.errors import UserError
from flows.registry import mlflow_client, start_pipeline_run
from flows.registry.drivers import CLOSED_BY_TAG, DRIVER_TAG, driver_record, driver_state

pytestmark = pytest.mark.integration


def record_of_a_finished_process() -> str:
    """The driver record a process on this machine had, once it has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return json.dumps({**json.loads(driver_record()), "pid": proc.pid, "started": started})


def record_elsewhere() -> str:
    return json.dumps({**json.loads(driver_record()), "host": "elsewhere", "boot_id": "another-machine"})


def test_driver_states():
    assert driver_state(driver_record()) == "alive"
    assert driver_state(record_of_a_finished_process()) == "gone"
    assert driver_state(record_elsewhere()) == "unknown"
    assert driver_state(json.dumps({**json.loads(driver_record()), "started": 1.0})) == "gone"  # a reused pid
    assert driver_state(None) == driver_state("not json") == "unknown"


def test_the_next_run_closes_what_dead_drivers_left_running(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(overrides=[f"workdir={tmp_path}"])
    client = mlflow_client(uri)

    drivers = {"f-gone": ("another-run", record_of_a_finished_process()), "f-reused": ("resume-me", record_elsewhere()),
               "f-elsewhere": ("unrelated", record_elsewhere()), "f-alive": ("busy", driver_record()),
               "f-by-hand": ("resume-me-too", None)}
    runs = {f: start_pipeline_run(cfg, uri, flow_run_id=f, run_name=f, ray_run_name=ray_run)
            for f, (ray_run, _) in drivers.items()}  # all driven by this live process so far
    for f, (_, driver) in drivers.items():  # then, as if their drivers were these
        if driver is None:
            client.delete_tag(runs[f], DRIVER_TAG)  # as if made by hand
        else:
            client.set_tag(runs[f], DRIVER_TAG, driver)
    gone, reused, elsewhere, alive, by_hand = runs.values()

    new = start_pipeline_run(cfg, uri, flow_run_id="f-new", run_name="new", ray_run_name="resume-me")

    status = {r: client.get_run(r).info.status for r in (gone, reused, elsewhere, alive, by_hand, new)}
    assert status == {gone: "KILLED", reused: "KILLED", elsewhere: "RUNNING", alive: "RUNNING",
                      by_hand: "RUNNING", new: "RUNNING"}
    for run_id in (gone, reused):
        assert client.get_run(run_id).data.tags[CLOSED_BY_TAG] == "prefect flow run f-new"
    assert driver_state(client.get_run(new).data.tags[DRIVER_TAG]) == "alive"

    # a live driver is training "busy": refused in one line, and no run is created for the second one
    with pytest.raises(UserError, match=r"^train.run_name: run 'busy' is being trained by a live driver \(pid \d+"):
        start_pipeline_run(cfg, uri, flow_run_id="f-second", run_name="second", ray_run_name="busy")
    runs = client.search_runs([client.get_run(new).info.experiment_id])
    assert "f-second" not in {r.data.tags.get("prefect.flow_run_id") for r in runs}

    # flow run f-reused retried in this process: its MLflow run again, RUNNING, driven from here
    assert start_pipeline_run(cfg, uri, flow_run_id="f-reused", run_name="x", ray_run_name="resume-me") == reused
    run = client.get_run(reused)
    assert run.info.status == "RUNNING" and run.data.tags[DRIVER_TAG] == driver_record()
