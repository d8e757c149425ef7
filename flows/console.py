"""What `run` shows on the console, and the log file that keeps the rest.

A run's console shows the pipeline's stages, the training progress lines and the result; a user
error is the CLI's one `error:` line. Everything the libraries underneath say (Prefect's temporary
server and run states, Ray's driver, controller and worker logs, MLflow's migrations) goes to a log
file under the workdir, named on the console when the run starts (`logs: <workdir>/logs/run-*.log`).
`quiet_console()` sets this up at the edge and undoes it on exit: it sets the libraries' own knobs
(environment variables they read), takes Prefect's console handler off the root logger, and puts a
line filter on sys.stdout and sys.stderr, the streams the libraries write to. "Ours" is a log record
emitted from the flows package (a task's print() arrives as one, through Prefect's log_prints), a
stage skipped because its result is cached, a line a Ray Train worker writes to its stdout (the
progress lines), or a plain line on stdout (the CLI's result); the rest is logged only. `--debug`
does not use it: every library keeps its console.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import traceback
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

_FLOWS_DIR = str(Path(__file__).resolve().parent) + os.sep

# Environment the CLI sets for the libraries it starts (read by them in this process, and in the
# Ray workers and Prefect server it starts, which inherit it).
QUIET_ENV = {
    "RAY_COLOR_PREFIX": "0",  # plain "(RayTrainWorker pid=...) " prefixes on worker lines, to parse them
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # download bars are terminal art, not log lines
    # Ray Tune replaces builtins.print with its own once it starts, so a task's later prints would come
    # from Ray's file and stop counting as ours (a sweep's summary lines)
    "RAY_TQDM_PATCH_PRINT": "0",
}

# "(RayTrainWorker pid=123) text", "(TrainController pid=9, ip=10.0.0.2) text", "(raylet) text",
# "(autoscaler +2s) text": how Ray's driver prints its workers' and services' lines, maybe coloured.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_LINE = re.compile(r"^\((?P<who>[^()]*?pid=[^()]*|raylet[^()]*|autoscaler[^()]*)\)\s?(?P<text>.*)$")
_TRAIN_WORKER = "RayTrainWorker"


class _LogSink:
    """Lines for the log file: kept in memory until the file is known (the workdir comes with the
    config), then appended to it. Shared by the stream filters and the logging handler."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending: list[str] = []
        self.file = None
        self.path: Path | None = None

    def write(self, text: str) -> None:
        with self.lock:
            if self.file is not None:
                self.file.write(text)
                self.file.flush()
            else:
                self.pending.append(text)

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            self.file = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by close()
            self.file.writelines(self.pending)
            self.file.flush()
            self.pending.clear()
            self.path = path

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None


class _FilteredStream(io.TextIOBase):
    """sys.stdout or sys.stderr while a run is quiet: every line goes to the log; a Ray Train
    worker's stdout line (the progress) is shown without its prefix; other lines on stdout are
    shown as they are (a library printing to stdout is rare, and may be an answer); stderr is
    logged only."""

    def __init__(self, real, sink: _LogSink, name: str, show_plain: bool):
        self.real, self.sink, self.name, self.show_plain = real, sink, name, show_plain
        self.buffer_text = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.buffer_text += text
            *lines, self.buffer_text = self.buffer_text.split("\n")
        for line in lines:
            self._route(line)
        return len(text)

    def _route(self, line: str) -> None:
        plain = _ANSI.sub("", line)
        self.sink.write(f"[{self.name}] {plain}\n")
        ray = _RAY_LINE.match(plain)
        if ray:
            if self.name == "stdout" and ray["who"].startswith(_TRAIN_WORKER):
                self.real.write(ray["text"] + "\n")
                self.real.flush()
        elif self.show_plain and "\r" not in plain:
            self.real.write(line + "\n")

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return False  # no colours or progress bars meant for a terminal

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self):
        return getattr(self.real, "encoding", "utf-8")

    def writable(self) -> bool:
        return True

    def drain(self) -> None:
        if self.buffer_text:
            self._route(self.buffer_text)
            self.buffer_text = ""


class _SinkHandler(logging.Handler):
    """Every log record that reaches the root logger, one line (and its traceback) in the log file."""

    def __init__(self, sink: _LogSink):
        super().__init__(logging.NOTSET)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging never raises into the caller
            self.handleError(record)


_STAGE_CACHED = re.compile(r"^Finished in state Cached\(")


class _ConsoleHandler(logging.Handler):
    """The records a user reads: our own (the flows package's prints and logs, which say when a
    stage starts), and a stage skipped because its result is cached; our warnings go to stderr."""

    def __init__(self, out, err):
        super().__init__(logging.INFO)
        self.out, self.err = out, err

    def line_for(self, record: logging.LogRecord) -> str | None:
        if record.pathname.startswith(_FLOWS_DIR):
            return record.getMessage()
        task = getattr(record, "task_name", None)
        if task and record.name.startswith("prefect.task_runs") and _STAGE_CACHED.match(record.getMessage()):
            return f"{task}: reused (cached)"
        return None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.line_for(record)
            if line is not None:
                stream = self.err if record.levelno >= logging.WARNING else self.out
                stream.write(line + "\n")
                stream.flush()
        except Exception:  # noqa: BLE001
            self.handleError(record)


class QuietConsole:
    """The state of a quiet run; `log_to(workdir)` opens its log file and says where it is."""

    def __init__(self, out, err):
        self.out, self.err = out, err
        self.sink = _LogSink()

    @property
    def log_path(self) -> Path | None:
        return self.sink.path

    def log_to(self, workdir: Path) -> Path:
        path = Path(workdir) / "logs" / f"run-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
        self.sink.open(path)
        self.out.write(f"logs: {path}\n")
        self.out.flush()
        return path

    def dump_pending(self) -> None:
        """Lines never written to a file (the run ended before it was known): show them."""
        with self.sink.lock:
            pending, self.sink.pending = self.sink.pending, []
        self.err.writelines(pending)


_active: QuietConsole | None = None


def log_to(workdir: Path) -> Path | None:
    """Open the current quiet run's log file under `workdir/logs` (nothing outside a quiet run)."""
    return _active.log_to(workdir) if _active is not None else None


@contextmanager
def quiet_console():
    """Within it, the console shows only the pipeline's own lines (see the module's docstring)."""
    global _active
    previous_env = {k: os.environ.get(k) for k in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    real_out, real_err = sys.stdout, sys.stderr
    console = QuietConsole(real_out, real_err)
    out = _FilteredStream(real_out, console.sink, "stdout", show_plain=True)
    err = _FilteredStream(real_err, console.sink, "stderr", show_plain=False)
    sys.stdout, sys.stderr = out, err
    # Prefect's logging set-up (done once per process, when a flow is first imported) comes first:
    # its handlers then write to the filtered streams, and its console handler, which we take off
    # the root logger, stays off; the root logger feeds the log file and our console.
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    root = logging.getLogger()
    saved_handlers = list(root.handlers)  # restored as they were, in their order
    removed = [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
    added = [_SinkHandler(console.sink), _ConsoleHandler(real_out, real_err)]
    for handler in removed:
        root.removeHandler(handler)
    for handler in added:
        root.addHandler(handler)
    _active = console
    try:
        yield console
    except BaseException as exc:
        from flows.errors import is_user_error

        console.sink.write("".join(traceback.format_exception(exc)))
        if console.log_path is None and not is_user_error(exc):
            console.dump_pending()  # a bug before the log file existed: show what led to it
        raise
    finally:
        _active = None
        out.drain()
        err.drain()
        sys.stdout, sys.stderr = real_out, real_err
        root.handlers[:] = [h for h in saved_handlers if h in root.handlers or h in removed] + [
            h for h in root.handlers if h not in saved_handlers and h not in added]
        console.sink.close()
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
