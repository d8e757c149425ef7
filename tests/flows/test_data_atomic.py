"""A prep killed at any moment leaves nothing half-written; concurrent preps of the same inputs agree."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flows.data import prepare as prepare_mod
from flows.data import prepare_dataset
from tests.flows.test_data import config, decoded_documents, make_docs, write_text_files

ROOT = Path(__file__).resolve().parents[2]

# Runs one prep; waits for a "go" file first when given one, so that several start together.
SCRIPT = """
import os, sys, time
from pathlib import Path
from flows.config import validate_config
from flows.data import prepare, prepare_dataset
workdir, source, tokenizer, go = sys.argv[1:5]
prepare.MAP_BATCH_BYTES = 20_000  # many small batches: the kill lands mid-tokenization
if go != "-":
    Path(f"{go}.ready.{os.getpid()}").touch()
    while not Path(go).exists():
        time.sleep(0.01)
cfg = validate_config({"workdir": workdir, "data": {"source": source, "tokenizer": tokenizer, "num_proc": 1},
                       "model": {"block_size": 8}})
d = prepare_dataset(cfg)
print(d.fingerprint, d.path, d.reused)
"""


def spawn(tmp_path: Path, tokenizer: str, go: str = "-") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "work"), str(tmp_path / "corpus"),
                             tokenizer, go], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the prep ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["documents", "tokens"])
def test_killed_prep_leaves_nothing_and_a_rerun_succeeds(tmp_path: Path, stage):
    docs = make_docs(4000)  # about 0.4 MB: a bpe prep takes a few seconds here
    write_text_files(tmp_path / "corpus", docs)
    data_dir = tmp_path / "work" / "data"
    proc = spawn(tmp_path, "bpe")
    try:
        if stage == "documents":
            wait_for(lambda: any(data_dir.glob(".tmp-*/lock")), proc)
        else:
            wait_for(lambda: len(list(data_dir.glob(".tmp-*/parts/*.bin"))) >= 2, proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = list(data_dir.iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)  # no <fingerprint> directory

    data = prepare_dataset(config(tmp_path, tmp_path / "corpus", tokenizer="bpe"))
    assert not data.reused
    assert [p.name for p in data_dir.iterdir()] == [data.fingerprint]  # the dead prep's directory is gone
    got = decoded_documents(data)
    assert sorted(got["train"] + got["val"]) == sorted(docs)


@pytest.mark.slow
def test_concurrent_preps_both_succeed_with_one_result(tmp_path: Path):
    write_text_files(tmp_path / "corpus", make_docs(3000))
    go = tmp_path / "go"
    procs = [spawn(tmp_path, "char", str(go)) for _ in range(2)]
    try:
        wait_for(lambda: len(list(tmp_path.glob("go.ready.*"))) == 2, procs[0])
        go.touch()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], results
    lines = [out.split() for out, _ in results]
    assert lines[0][:2] == lines[1][:2]  # same fingerprint and path
    assert [p.name for p in (tmp_path / "work" / "data").iterdir()] == [lines[0][0]]


def test_losing_the_publish_race_returns_the_winner(tmp_path: Path, monkeypatch):
    write_text_files(tmp_path / "corpus", make_docs(40))
    cfg = config(tmp_path, tmp_path / "corpus")
    real_publish = prepare_mod._Workspace.publish
    winner = {}

    def publish_after_someone_else(self, out):
        monkeypatch.setattr(prepare_mod._Workspace, "publish", real_publish)
        winner["data"] = prepare_dataset(cfg)  # a concurrent prep finishes first
        return real_publish(self, out)

    monkeypatch.setattr(prepare_mod._Workspace, "publish", publish_after_someone_else)
    data = prepare_dataset(cfg)
    assert data.reused and data.path == winner["data"].path and not winner["data"].reused
    assert np.array_equal(data.tokens("val"), winner["data"].tokens("val"))
    assert [p.name for p in (tmp_path / "work" / "data").iterdir()] == [data.fingerprint]


def test_only_dead_workspaces_are_removed(tmp_path: Path):
    dead, alive, young = tmp_path / ".tmp-dead", tmp_path / ".tmp-alive", tmp_path / ".tmp-young"
    for d in (dead, alive, young):
        d.mkdir()
    (dead / "lock").touch()
    (alive / "lock").touch()
    fd = os.open(alive / "lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file: conflicts even within this process
    try:
        assert prepare_mod.remove_stale_workspaces(tmp_path) == [dead]
    finally:
        os.close(fd)
    assert not dead.exists() and alive.exists() and young.exists()  # young: no lock yet, being created
