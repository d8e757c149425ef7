"""The run's watchdog (flows/reaper.py): when the process that started it is SIGKILLed, what that process
started, even in a session of its own, is ended; after a normal exit it does nothing and says nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for `flows run`: starts its watchdog, then a child that leaves its session (as Prefect's
# server and Ray's agents are not in the driver's process group either) and a plain one.
DRIVER = """
import subprocess, sys, time
from flows.reaper import start_reaper
reaper = start_reaper()
detached = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(reaper.pid, detached.pid, plain.pid, flush=True)
if sys.argv[1] == "exit":
    detached.kill(); plain.kill(); detached.wait(); plain.wait()
    sys.exit(0)
time.sleep(300)
"""


def _start(mode: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    return proc, [psutil.Process(p) for p in pids]


def _wait_gone(procs: list[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


@pytest.mark.slow
def test_a_sigkilled_driver_leaves_no_process_behind():
    proc, (reaper, *children) = _start("kill")
    try:
        time.sleep(2.5)  # the watchdog has seen the children (it looks every second)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = _wait_gone([reaper, *children])
        assert not left, f"still running: {left}"
        message = proc.stderr.read()  # the watchdog writes to the stderr it shared with the driver
        assert f"run process {proc.pid} is gone; ended 2 process(es)" in message, message
        assert all(f"({c.pid})" in message for c in children)
    finally:
        for p in [reaper, *children]:
            if p.is_running():
                p.kill()


@pytest.mark.slow
def test_after_a_normal_exit_the_watchdog_ends_quietly():
    proc, (reaper, *_children) = _start("exit")
    assert proc.wait(timeout=30) == 0
    assert not _wait_gone([reaper])
    assert proc.stderr.read() == ""
