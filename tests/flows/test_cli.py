"""The CLI's contract for bad input: one line on stderr naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "flows", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


BAD_INPUTS = [
    (["--set", "data.source=/definitely/missing/corpus.txt"], "/definitely/missing/corpus.txt"),
    (["--set", "train.learning_rate=0.1"], "train.learning_rate"),
    (["--set", "model.n_embd=30", "--set", "model.n_head=4"], "model.n_embd"),
    (["--config", "no-such-file.yaml"], "no-such-file.yaml"),
]


@pytest.mark.parametrize("args, needle", BAD_INPUTS)
def test_bad_input_in_process_is_one_line_and_exit_2(tmp_path: Path, args, needle, capsys, monkeypatch):
    from flows.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--set", f"workdir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err
    assert not (tmp_path / "data").exists()


@pytest.mark.slow  # a fresh interpreter each: what a user's shell sees
@pytest.mark.parametrize("args, needle", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args, needle):
    proc = run_cli("run", "--set", f"workdir={tmp_path}", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines(proc)) == 1 and needle in error_lines(proc)[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()


# What the libraries underneath say: on the console only under --debug (the log file keeps it).
LIBRARY_CHATTER = ["temporary server", "Beginning flow run", "Finished in state", "Task run", "Flow run",
                   "PlacementGroupCleaner", "PreemptionWatcher", "Running upgrade", "alembic",
                   "Downloading artifacts", "Started a local Ray instance", "pid="]


def chatter(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(c in line for c in LIBRARY_CHATTER)]


@pytest.mark.integration
def test_corpus_too_small_for_block_size(tmp_path: Path):
    """A user error found inside the flow: the error line and at most two others, as up front."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("to be or not to be\n")
    proc = run_cli("run", "--set", f"workdir={tmp_path / 'wd'}", "--set", f"data.source={corpus}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "model.block_size" in lines[0]
    assert proc.stderr.splitlines() == lines, proc.stderr
    assert len(proc.stdout.splitlines()) <= 2, proc.stdout  # "logs: ..." and the stage that failed
    assert "Traceback" not in proc.stdout + proc.stderr and not chatter(proc.stdout + proc.stderr)
    data_dir = tmp_path / "wd" / "data"
    assert not data_dir.exists() or not [p for p in data_dir.iterdir() if not p.name.startswith(".")]
    (log,) = (tmp_path / "wd" / "logs").glob("run-*.log")  # what the console left out is kept
    assert "temporary server" in log.read_text() and "model.block_size" in log.read_text()


@pytest.mark.integration
def test_debug_shows_what_the_libraries_say(tmp_path: Path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("to be or not to be\n")
    proc = run_cli("--debug", "run", "--set", f"workdir={tmp_path / 'wd'}", "--set", f"data.source={corpus}",
                   cwd=tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Traceback" in out and "model.block_size" in out
    assert "temporary server" in out and "Finished in state Failed" in out


@pytest.mark.integration
def test_a_run_shows_its_stages_progress_and_result_only(tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    # Python-like text: the default evaluation prompts ("def ", "class Request:", "import ") in its alphabet
    corpus.write_text("".join(f"def f{i}(x):\n    import os\n    return x\n\nclass Request:\n    pass\n"
                              for i in range(100)))
    tiny = [f"--set={kv}" for kv in ("train.max_steps=1", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                                      "model.block_size=16", "eval.max_new_tokens=4")]
    proc = run_cli("run", "--set", f"workdir={tmp_path / 'wd'}", "--set", f"data.source={corpus}", *tiny,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("prepare_dataset:", "train_model:", "evaluate_model:", "register_model:"):
        assert any(line.startswith(stage) for line in out.splitlines()), out
    assert any(line.startswith("step 1/1 loss ") for line in out.splitlines()), out
    assert "Registered model: models:/" in out and out.startswith("logs: ")
    assert not chatter(out + proc.stderr), chatter(out + proc.stderr)
    assert "Traceback" not in proc.stderr
    (log,) = (tmp_path / "wd" / "logs").glob("run-*.log")
    assert "temporary server" in log.read_text() and "RayTrainWorker" in log.read_text()
    # the flow started its own Ray and stopped it in the background while it evaluated: the process waited
    # for that stop before it exited, and its time is on the run with every other stage's
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {"stage_seconds.ray_start", "stage_seconds.ray_stop", "stage_seconds.gate"} <= set(run.data.metrics)


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path: Path):
    proc = run_cli("--debug", "run", "--set", "train.nope=1", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
