"""Time to quality, side by side: this project's whole pipeline against nanoGPT's bare `train.py`.

Alternating rounds on the same machine: nanoGPT's CPU command (4 layers, 128 dims, block 64, batch 12,
2000 iterations on tinyshakespeare, char tokenizer, its data already prepared) and
`python -m flows run --config configs/shakespeare-char-cpu.yaml` in a fresh workdir (prep, train,
evaluate, register, gate: the whole flow, cold). Prints each run's wall time and final validation loss
and the ratio of the medians; asserts nothing.

    .venv/bin/python bench/vs_nanogpt.py --nanogpt /tmp/nanogpt [--rounds 3] [--config configs/shakespeare-char-cpu.yaml]

The nanoGPT checkout needs data/shakespeare_char/{train,val}.bin and meta.pkl (its own prepare.py, with
input.txt copied from ../shared/data/tinyshakespeare.txt); nanoGPT's code is never part of this project.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
CORPUS = PROJECT.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def run_nanogpt(checkout: Path, out_dir: Path) -> tuple[float, float]:
    """(wall seconds, val loss at the last evaluation) of nanoGPT's CPU run."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *NANOGPT_CPU, f"--out_dir={out_dir}"], cwd=checkout,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"nanoGPT failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    losses = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", proc.stdout)
    return wall, float(losses[-1][1])


def run_pipeline(config: Path, workdir: Path) -> tuple[float, float]:
    """(wall seconds, eval_val_loss logged by the evaluation stage) of one cold pipeline run."""
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "DO_NOT_TRACK": "1", "PYTHONPATH": str(PROJECT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows", "run", "--config", str(config), "--set",
                           f"data.source={CORPUS}", "--set", f"workdir={workdir}"], cwd=PROJECT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = runs[0].data.metrics
    stages = {k.removeprefix("stage_seconds."): v for k, v in metrics.items() if k.startswith("stage_seconds.")}
    print("    stages: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])))
    return wall, float(metrics["eval_val_loss"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout with shakespeare_char prepared")
    p.add_argument("--config", type=Path, default=PROJECT / "configs" / "shakespeare-char-cpu.yaml")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load {os.getloadavg()}, {os.cpu_count()} CPUs")
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="vs-nanogpt-") as tmp:
        for r in range(args.rounds):
            wall, val = run_nanogpt(args.nanogpt, Path(tmp) / f"nanogpt-{r}")
            theirs.append(wall)
            print(f"round {r + 1}: nanoGPT train.py  {wall:7.1f} s  val {val:.4f}  (load {os.getloadavg()[0]:.2f})")
            wall, val = run_pipeline(args.config, Path(tmp) / f"pipeline-{r}")
            ours.append(wall)
            print(f"round {r + 1}: pipeline           {wall:7.1f} s  val {val:.4f}  (load {os.getloadavg()[0]:.2f})")
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"median: pipeline {a:.1f} s, nanoGPT {b:.1f} s; pipeline/nanoGPT = {a / b:.2f} (goal <= 0.50)")


if __name__ == "__main__":
    main()
