"""The quiet console of `run`: which lines a user sees, and that the rest reaches the log file."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from flows import console
from flows.console import _ConsoleHandler, _FilteredStream, _LogSink


def _stream(name="stdout", show_plain=True):
    real, sink = io.StringIO(), _LogSink()
    return _FilteredStream(real, sink, name, show_plain), real, sink


def test_a_train_worker_progress_line_is_shown_without_its_prefix():
    stream, real, sink = _stream()
    stream.write("(RayTrainWorker pid=12) step 1/4 loss 4.1\n\x1b[36m(RayTrainWorker pid=12, ip=10.0.0.2)")
    stream.write("\x1b[0m step 2/4 loss 3.9\n")
    assert real.getvalue() == "step 1/4 loss 4.1\nstep 2/4 loss 3.9\n"
    assert len(sink.pending) == 2  # and both are in the log


@pytest.mark.parametrize("line", [
    "(TrainController pid=9) PlacementGroupCleaner: Failed to query Ray Train Controller actor state",
    "(autoscaler +2s) Tip: use `ray status`",
    "(RayTrainWorker pid=12) step 1/4 [repeated 2x across cluster]",
])
def test_other_ray_lines_and_all_of_stderr_are_logged_only(line):
    out, out_real, out_sink = _stream()
    err, err_real, err_sink = _stream("stderr", show_plain=False)
    if "repeated" in line:  # a worker line on stderr
        err.write(line + "\n")
    else:
        out.write(line + "\n")
    err.write("INFO alembic.runtime.migration: Running upgrade  -> 451aebb31d03\n")
    assert out_real.getvalue() == "" and err_real.getvalue() == ""
    assert len(out_sink.pending) + len(err_sink.pending) == 2


def test_plain_stdout_is_shown_and_progress_bars_are_not():
    stream, real, _ = _stream()
    stream.write("Registered model: models:/m/1\n")
    stream.write("Downloading artifacts:  50%|#####     | 1/2\rDownloading artifacts: 100%\n")
    assert real.getvalue() == "Registered model: models:/m/1\n"


def _record(pathname: str, msg: str, name="prefect.task_runs", level=logging.INFO, **extra):
    record = logging.LogRecord(name, level, pathname, 1, msg, None, None)
    record.__dict__.update(extra)
    return record


def test_the_console_handler_shows_our_records_and_cached_stages_only():
    out, err = io.StringIO(), io.StringIO()
    handler = _ConsoleHandler(out, err)
    ours = console._FLOWS_DIR + "pipeline.py"
    handler.emit(_record(ours, "train_model: 1 steps on 1 Ray worker(s)", task_name="train_model"))
    handler.emit(_record(ours, "could not mark the MLflow run", level=logging.WARNING))
    handler.emit(_record("/x/prefect/task_engine.py", "Finished in state Completed()", task_name="train_model"))
    handler.emit(_record("/x/prefect/task_engine.py", "Finished in state Cached(type=COMPLETED)",
                         task_name="prepare_dataset"))
    handler.emit(_record("/x/prefect/flow_engine.py", "Beginning flow run 'x' for flow 'y'", "prefect.flow_runs"))
    handler.emit(_record("/x/prefect/server/api/server.py", "Starting temporary server on http://127.0.0.1:1",
                         "prefect"))
    assert out.getvalue() == "train_model: 1 steps on 1 Ray worker(s)\nprepare_dataset: reused (cached)\n"
    assert err.getvalue() == "could not mark the MLflow run\n"


@pytest.mark.slow  # imports Prefect
def test_quiet_console_logs_to_the_workdir_and_restores_everything(tmp_path, capsys):
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect's own once-per-process set-up replaces the root's handlers
    root = logging.getLogger()
    before = (sys.stdout, sys.stderr, list(root.handlers))
    with console.quiet_console() as quiet:
        print("shown")
        print("only logged", file=sys.stderr)
        logging.getLogger("prefect").info("Starting temporary server on http://127.0.0.1:1")
        path = console.log_to(tmp_path)
    assert (sys.stdout, sys.stderr, list(root.handlers)) == before
    out, err = capsys.readouterr()
    assert out == f"shown\nlogs: {path}\n" and err == ""
    assert path.parent == tmp_path / "logs" and quiet.log_path == path
    text = path.read_text()
    assert "only logged" in text and "Starting temporary server" in text and "shown" in text
    assert console.log_to(tmp_path) is None  # outside a quiet run
