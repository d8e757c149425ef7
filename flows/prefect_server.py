"""The temporary Prefect server of a `flows run` without a Prefect API: started early, waited for late.

Without PREFECT_API_URL (or a profile that sets it) a run needs a Prefect API of its own. Prefect
would start one on the flow's first API call: a uvicorn subprocess serving Prefect's server app, but
only after importing that whole server package into this process too (seconds of CPU) and only once
everything before the flow is done. `start_temporary_server` starts the same subprocess (Prefect's
command and environment) right after the CLI's input checks, so the server boots (imports, database
migrations) on another core while this process imports torch, MLflow and Ray; a thread waits for its
health check, and the CLI waits for that thread just before the flow. The process then talks to it as
to any configured server (PREFECT_API_URL is set, and Prefect's settings refreshed), and stops it at
exit, as Prefect stops its own. Starts are serialised per PREFECT_HOME by a file lock held until the
server answers: each migrates the one database there as it starts, and servers starting together on a
new database race (and time out). This process's gates still treat the server as private
(`is_temporary`: flows/registry/lock.py).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

LOCK_NAME = "attention-pipeline-server-start.lock"
PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind its port (Prefect retries on another)
_temporary_urls: set[str] = set()


def is_temporary(api_url: str) -> bool:
    """Whether api_url is a temporary server this process started (private to it)."""
    return api_url.rstrip("/") in _temporary_urls


class TemporaryServer:
    """One temporary Prefect server: `start()` returns at once, `wait()` returns its API URL once it
    answers (or raises why it did not), `stop()` ends it (also at exit)."""

    def __init__(self, home: Path, env: dict[str, str], timeout: float):
        self.home, self.env, self.timeout = home, env, timeout
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="prefect-server-start", daemon=True)

    def start(self) -> TemporaryServer:
        atexit.register(self.stop)
        self._thread.start()
        return self

    def wait(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self.url is not None
        return self.url

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _start(self) -> None:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            with open(self.home / LOCK_NAME, "a+b") as lock:  # one start at a time per PREFECT_HOME
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                self.url = self._spawn_until_healthy()
        except BaseException as exc:  # noqa: BLE001 - handed to wait(), in the thread that runs the flow
            self._error = exc

    def _spawn_until_healthy(self) -> str:
        deadline = time.monotonic() + self.timeout
        while True:
            port = _free_port()
            self.process = subprocess.Popen(_server_command(port), env=self.env)
            url = f"http://127.0.0.1:{port}/api"
            while (code := self.process.poll()) is None:
                if _healthy(url):
                    return url
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the temporary Prefect server did not answer within {self.timeout:g} s "
                                       "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
                time.sleep(0.1)
            if code != PORT_IN_USE:
                raise RuntimeError(f"the temporary Prefect server exited with code {code} as it started")


def start_temporary_server() -> TemporaryServer | None:
    """Start this process's temporary Prefect server unless a Prefect API is configured (None then)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return None
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **settings.to_environment_variables(exclude_unset=True)}  # as Prefect starts its own
    timeout = settings.server.ephemeral.startup_timeout_seconds
    return TemporaryServer(Path(settings.home).expanduser(), env, timeout).start()


def use_temporary_server(server: TemporaryServer) -> str:
    """Wait for the server, then point this process's Prefect (and what it starts) at it."""
    import prefect.context

    url = server.wait()
    _temporary_urls.add(url)
    os.environ["PREFECT_API_URL"] = url
    prefect.context.refresh_global_settings_context()
    return url


def _server_command(port: int) -> list[str]:
    """Prefect's own command for its temporary server (prefect.server.api.server.SubprocessASGIServer)."""
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(api_url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a loopback address: no proxy
    try:
        with opener.open(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
