"""Driver loss: the process running the flow is SIGKILLed mid-training, twice, and the run still ends as
an uninterrupted one would.

One `python -m flows run --set train.run_name=...` command, on a real local Ray (the one each process
starts), real SQLite MLflow and a real Prefect API (the session's harness server, shared by every process
so that the flow runs can be retried): (A) it is SIGKILLed right after its first checkpoint is registered;
(B) the same command resumes from that checkpoint and closes A's MLflow run as KILLED, and is SIGKILLed in
turn after a later checkpoint; (C) Prefect retries B's flow run in a new process (`python -m prefect.engine`,
what a worker runs), which resumes from B's last checkpoint and finishes; (D) the command with another
learning rate is refused in one line before anything starts. Each kill leaves no process of the driver's
behind; the registered weights equal, bit for bit, those of an uninterrupted run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.test_servers import PROJECT, base_env, sigkill_tree, start

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 30, 5
RUN = "driver-loss"
CORPUS = "".join(f"def f{i}(x):\n    return x * {i % 9} + {i % 7}\n\nclass Request:\n    import os\n" for i in range(1500))
SETTINGS = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=4",
            "train.warmup_steps=2", "train.num_workers=1", "train.cpus_per_worker=1", f"train.max_steps={STEPS}",
            f"train.checkpoint_interval={EVERY}", "train.log_interval=1", f"train.eval_interval={STEPS}",
            "train.eval_batches=1", "train.num_to_keep=2", f"train.run_name={RUN}", "eval.max_tokens=1024",
            "eval.max_new_tokens=4", "eval.batch_size=8", "registry.model_name=driver-loss-lm",
            "registry.experiment=driver-loss"]


def registered_steps(snapshot: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its checkpoint_manager_snapshot.json)."""
    try:
        state = json.loads(snapshot.read_text())
    except (OSError, ValueError):  # not there yet, or being rewritten
        return []
    return sorted(r["metrics"]["step"] for r in state["checkpoint_results"])


def kill_after_checkpoint(proc: subprocess.Popen, snapshot: Path, after: int, log: Path) -> int:
    """SIGKILL the driver once a checkpoint past `after` is registered; check that nothing it started
    survives it; returns the last registered checkpoint's step."""
    while not [s for s in registered_steps(snapshot) if s > after]:
        assert proc.poll() is None, f"the run ended before it was killed:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    sigkill_tree(proc)
    last = registered_steps(snapshot)[-1]  # nothing writes it any more
    assert after < last < STEPS, (after, last)
    return last


def test_driver_sigkill_then_rerun_and_flow_retry_resume_exactly(tmp_path: Path, prefect_harness, request):
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from attention_core import TrainState
    from flows.config import load_config

    corpus = tmp_path / "corpus.py"
    corpus.write_text(CORPUS)
    workdir = tmp_path / "wd"
    sets = [*SETTINGS, f"workdir={workdir}", f"data.source={corpus}"]
    command = [sys.executable, "-m", "flows", "run", *[a for s in sets for a in ("--set", s)]]
    env = base_env(PYTHONPATH=str(PROJECT), PREFECT_API_URL=PREFECT_API_URL.value())
    snapshot = workdir / "ray_results" / RUN / "checkpoint_manager_snapshot.json"
    logs = {name: tmp_path / f"{name}.log" for name in "ABCD"}

    # (A) killed after its first checkpoint
    first = kill_after_checkpoint(start(command, env, logs["A"], cwd=tmp_path), snapshot, 0, logs["A"])
    # (B) the same command: resumes from it, killed after a later one
    second = kill_after_checkpoint(start(command, env, logs["B"], cwd=tmp_path), snapshot, first, logs["B"])

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("driver-loss").experiment_id
    run_a, run_b = sorted(client.search_runs([experiment]), key=lambda r: r.info.start_time)
    flow_run_b = run_b.data.tags["prefect.flow_run_id"]

    # (C) Prefect retries flow run B in a new process, as a worker would
    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry

    with get_client(sync_client=True) as prefect:
        prefect.set_flow_run_state(flow_run_b, AwaitingRetry(message="retry after driver loss"), force=True)
    retry = start([sys.executable, "-m", "prefect.engine", flow_run_b],
                  {**env, "PREFECT__FLOW_ENTRYPOINT": "flows.pipeline:training_pipeline_flow"}, logs["C"], cwd=tmp_path)
    assert retry.wait(timeout=600) == 0, logs["C"].read_text()[-4000:]
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(flow_run_b).state.is_completed()
    resumed_at = re.search(r"step (\d+)/\d+ loss", logs["C"].read_text())
    assert resumed_at and int(resumed_at[1]) == second + 1  # resumed after B's last checkpoint

    # MLflow: A closed as KILLED by B; B's run (taken over by the retry) finished, each step logged once
    a, b = client.get_run(run_a.info.run_id), client.get_run(run_b.info.run_id)
    assert a.info.status == "KILLED" and a.data.tags["pipeline.closed_by"] == f"prefect flow run {flow_run_b}"
    assert b.info.status == "FINISHED"
    history = {r: client.get_metric_history(r.info.run_id, "train_loss") for r in (a, b)}
    steps = {r: [m.step for m in points] for r, points in history.items()}
    assert all(len(set(steps[r])) == len(steps[r]) for r in (a, b))  # no step twice in a run
    # Up to A's checkpoint: A's points that its logging thread had not sent when it died travelled in the
    # checkpoint and were sent by B (metric_buffer.py), so every step is in one of the two runs, once.
    assert sorted(s for s in steps[a] + steps[b] if s <= first) == list(range(1, first + 1)), (steps, first)
    # After it, B holds every step. A may have sent a step or two that it trained between its checkpoint
    # and its death (the kill comes when Ray Train has registered the checkpoint, not at the report): B,
    # resuming exactly, trained them again to the same losses.
    assert set(range(first + 1, STEPS + 1)) <= set(steps[b])
    loss = {r: {m.step: m.value for m in points} for r, points in history.items()}
    assert all(loss[a][s] == loss[b][s] for s in steps[a] if s > first)
    [version] = client.search_model_versions("name='driver-loss-lm'")
    assert version.run_id == b.info.run_id

    # (D) the command with another learning rate: refused in one line, before anything starts
    refused = subprocess.run([*command, "--set", "train.lr=1e-3"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"error: train.run_name: run '{RUN}' was started with other training settings, so it cannot resume "
        "with these (train.lr 0.002 -> 0.001;")
    assert len(client.search_runs([experiment])) == 2

    # the registered weights equal an uninterrupted run's, bit for bit
    request.getfixturevalue("ray_local")
    from flows.data import prepare_dataset
    from flows.train import train_model

    cfg = load_config(overrides=[*sets, "train.run_name=uninterrupted"])
    reference = train_model(cfg, prepare_dataset(cfg), run_name="uninterrupted")
    final = Path(b.data.tags["ray.checkpoint_path"])
    assert TrainState.read(final).step == STEPS
    got, want = load_file(str(final / TrainState.WEIGHTS)), load_file(str(Path(reference.checkpoint_path) / TrainState.WEIGHTS))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
