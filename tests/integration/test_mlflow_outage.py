"""MLflow is off training's critical path: a real `mlflow server` (SQLite store) hangs, then dies, in
the middle of Ray Train training, and comes back on the same port and store; during the outage the
rank-0 worker is SIGKILLed too.

The faults follow training's progress, not the clock: the server is stopped (SIGSTOP of its process
group: connections are accepted and never answered, as a hung server's are) once it holds step 5's
train_loss; training must then write 2 more checkpoints with no answer from the store (rank 0 blocked
in MLflow's client would write none); then the rank-0 worker is SIGKILLed with its unsent points in
memory, and the attempt Ray Train resumes from the last checkpoint (which carries them) must write 2
more checkpoints, still without the store; then the server is SIGKILLed (an in-flight request fails,
landed or not) and started again. Every metric point must arrive exactly once, in step order, and the
run's `tracking.dropped_points` tag must say 0. The SQLite lock past its busy timeout and the bounded
buffer's drops are tests/flows/test_metric_buffer.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from flows.config import load_config
from flows.data import prepare_dataset, stdlib_files
from flows.train import train_model
from flows.train.metric_buffer import DROPPED_TAG
from tests.integration.test_servers import BIN, base_env, start, stop, wait_until_healthy

pytestmark = pytest.mark.integration

MAX_STEPS = 80
CHECKPOINT_EVERY = 5
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=4",
        f"train.max_steps={MAX_STEPS}", "train.log_interval=1", f"train.checkpoint_interval={CHECKPOINT_EVERY}",
        f"train.eval_interval={MAX_STEPS}", "train.eval_batches=1", "train.warmup_steps=2", "train.num_to_keep=2",
        "train.num_workers=1", "train.max_failures=1"]
STEP_KEYS = ("train_loss", "lr", "grad_norm", "tokens_per_sec")  # logged at every step (log_interval 1)


class MlflowServer:
    """`mlflow server` on one port and one SQLite store, in its own process group, restartable."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.uri = root, port, f"http://127.0.0.1:{port}"
        self.cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
                    "--artifacts-destination", str(root / "artifacts")]
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.root / f"server-{self.starts}.log"
        self.proc = start(self.cmd, base_env(), log, cwd=self.root)
        wait_until_healthy(f"{self.uri}/health", self.proc, log)

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def wait_for(what: str, condition, timeout: float = 300) -> None:
    """Until condition() holds; a deadline only turns a hang into a failure naming what never happened."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.2)


def rank0_worker():
    """The one Ray Train worker process, a descendant of this test's own local Ray."""
    import psutil

    def cmdline(process) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.Error:  # ended meanwhile
            return ""

    found = [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in cmdline(p)]
    assert len(found) == 1, found
    return found[0]


def latest_checkpoint(run_dir: Path) -> int:
    steps = [int(p.name.removeprefix("checkpoint_")) for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    return max(steps, default=0)


def progressed(run_dir: Path, since: int, trainer: threading.Thread, outcome: dict, when: str) -> None:
    """Training writes 2 checkpoints after step `since` (a rank 0 waiting on MLflow would write none)."""
    wait_for(f"2 checkpoints {when}",
             lambda: latest_checkpoint(run_dir) >= since + 2 * CHECKPOINT_EVERY or not trainer.is_alive())
    assert "error" not in outcome, outcome.get("error")
    assert latest_checkpoint(run_dir) >= since + 2 * CHECKPOINT_EVERY, f"training stopped {when}"


def test_training_goes_on_through_a_tracking_server_outage_and_every_point_lands_once(tmp_path, ray_local,
                                                                                       free_port):
    from mlflow.tracking import MlflowClient

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[:3]))
    cfg = load_config(overrides=[f"workdir={tmp_path / 'wd'}", f"data.source={corpus}", *TINY])
    data = prepare_dataset(cfg)
    (tmp_path / "server" / "artifacts").mkdir(parents=True)
    server = MlflowServer(tmp_path / "server", free_port())
    server.start()
    try:
        client = MlflowClient(server.uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        outcome: dict = {}

        def train() -> None:
            try:
                outcome["result"] = train_model(cfg, data, run_name="outage", tracking_uri=server.uri,
                                                mlflow_run_id=run_id)
            except BaseException as err:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = err

        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        wait_for("the server holds step 5's train_loss",
                 lambda: any(m.step >= 5 for m in client.get_metric_history(run_id, "train_loss"))
                 or not trainer.is_alive())
        server.signal(signal.SIGSTOP)  # hung: connections are accepted, requests never answered
        run_dir = Path(cfg.storage_path()) / "outage"
        hung_at = latest_checkpoint(run_dir)
        progressed(run_dir, hung_at, trainer, outcome, "while the server hangs")
        rank0_worker().kill()  # SIGKILL, its unsent points in memory
        killed_at = latest_checkpoint(run_dir)
        progressed(run_dir, killed_at, trainer, outcome, "after the worker's restart, the server still hung")
        server.kill()  # the hung server dies; a request it held fails, landed or not
        server.start()  # same port, same store
        trainer.join(timeout=600)
        assert not trainer.is_alive(), "training did not end"
        assert "error" not in outcome, outcome.get("error")

        for key in STEP_KEYS:  # every step's point once, in step order (the history is sorted by timestamp)
            assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, MAX_STEPS + 1)), key
        checkpoints = list(range(CHECKPOINT_EVERY, MAX_STEPS + 1, CHECKPOINT_EVERY))
        assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == checkpoints
        run = client.get_run(run_id)
        assert run.data.tags[DROPPED_TAG] == "0"
        assert run.data.params["world_size"] == "1"
        assert Path(outcome["result"].checkpoint_path).name == f"checkpoint_{MAX_STEPS:08d}"
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.signal(signal.SIGCONT)  # a stopped group would not see the SIGTERM
            stop(server.proc)
