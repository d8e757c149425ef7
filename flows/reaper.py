"""When `flows run` dies, what it started goes with it: a watchdog process that ends the run's leftovers.

A driver killed outright (SIGKILL, the OOM killer) runs no exit code, and some of what it started outlives
it: Prefect's temporary API server (a uvicorn process) and Ray's dashboard and runtime-env agents stay,
orphaned (measured: still running minutes later), and Ray's workers and actors for a while; Ray's GCS and
raylet die with the driver. `start_reaper()` (called by `flows run` before Prefect starts, and by the
process that starts a local Ray: `ensure_ray`) runs this module as a small process in a session of its own
(a signal to the driver's process group spares it), tied to the driver by a pipe only the driver holds.
Every second it notes the driver's descendants (pid and start time, so a reused pid is never mistaken for
one); when the pipe closes or the driver is gone, it ends those still running (SIGTERM, then SIGKILL after
a grace period) and says so in one line on stderr. After a normal exit nothing is left and it says
nothing. It never touches a process that was not the driver's descendant (one started in the driver's
last second may escape it), and imports only psutil and the standard library.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys

POLL_S = 1.0
GRACE_S = 3.0
READY_TIMEOUT_S = 20.0
_started: list[subprocess.Popen] = []  # the pipe's write end lives as long as this process


def start_reaper() -> subprocess.Popen | None:
    """Start the watchdog of this process (once) and wait until it watches; None where it cannot start
    (the run goes on without)."""
    if _started:
        return _started[0]
    try:
        proc = subprocess.Popen([sys.executable, "-m", "flows.reaper", str(os.getpid())], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, start_new_session=True)
    except OSError:
        return None
    _started.append(proc)
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
    if ready:
        proc.stdout.readline()  # "watching": its first look comes within POLL_S of anything started now
    return proc


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch(pid: int, pipe_fd: int | None) -> list[str]:
    """Note pid's descendants until pipe_fd reaches end of file or pid is gone, then end those still
    running; returns 'name (pid)' of each process ended."""
    import psutil

    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    sys.stdout.write("watching\n")
    sys.stdout.flush()
    seen: dict[int, psutil.Process] = {}
    while True:
        if pipe_fd is not None:
            ready, _, _ = select.select([pipe_fd], [], [], POLL_S)
            if ready and not os.read(pipe_fd, 4096):
                break
        else:
            select.select([], [], [], POLL_S)
        if not _running(driver):
            break
        try:
            children = driver.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        seen = {p.pid: p for p in seen.values() if _running(p)}
        for child in children:
            if child.pid not in seen and child.pid != os.getpid():  # the driver started this watchdog too
                seen[child.pid] = child  # psutil.Process keeps the start time: is_running() checks it
    return end_processes([p for p in seen.values() if _running(p)])


def end_processes(procs: list) -> list[str]:
    """SIGTERM, then SIGKILL after GRACE_S; returns 'name (pid)' of each."""
    import psutil

    names = []
    for proc in procs:
        try:
            names.append(f"{proc.name()} ({proc.pid})")
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return names


def main(argv: list[str]) -> int:
    pid = int(argv[0])
    ended = watch(pid, sys.stdin.fileno())
    if ended:
        sys.stderr.write(f"attention-pipeline: run process {pid} is gone; ended {len(ended)} process(es) it left "
                         f"running: {', '.join(ended)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
