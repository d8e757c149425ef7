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


@pytest.mark.integration
def test_corpus_too_small_for_block_size(tmp_path: Path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("to be or not to be\n")
    proc = run_cli("run", "--set", f"workdir={tmp_path / 'wd'}", "--set", f"data.source={corpus}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "model.block_size" in lines[0]
    assert "Traceback" not in proc.stderr
    data_dir = tmp_path / "wd" / "data"
    assert not data_dir.exists() or not [p for p in data_dir.iterdir() if not p.name.startswith(".")]


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path: Path):
    proc = run_cli("--debug", "run", "--set", "train.nope=1", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
