"""A real sweep on the default corpus: the best value found, the wall time, and the compute ASHA saved.

Runs `python -m flows sweep` (a temporary Prefect server, a local Ray, MLflow on SQLite in a fresh
workdir) over the learning rate and the width, then reads the sweep's parent run: the best validation
loss, trials per outcome, optimizer steps trained against running every trial to train.max_steps, and
the wall time. "Saved" is counted in optimizer steps (the compute a trial spends grows with its steps);
the seconds it stands for are estimated from the completed trials' mean seconds per step.

    python bench/sweep.py                    # 8 trials, 2 at a time (1 CPU per worker)
    python bench/sweep.py --trials 12 --steps 400
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--workdir", help="default: a new temporary directory")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sweep-"))
    settings = [f"workdir={workdir}", "model.n_layer=2", f"train.max_steps={args.steps}", "train.batch_size=12",
                "model.block_size=64", f"train.eval_interval={max(1, args.steps // 6)}", "train.eval_batches=4",
                f"train.checkpoint_interval={args.steps}", "train.warmup_steps=20", "train.num_workers=1",
                "train.cpus_per_worker=1", "train.min_lr=1e-5", "eval.max_tokens=65536"]
    command = [sys.executable, "-m", "flows", "sweep", *[a for s in settings for a in ("--set", s)],
               "--search", "train.lr=loguniform:3e-4:3e-2", "--search", "model.n_embd=choice:64,128,192",
               "--trials", str(args.trials), "--max-concurrent", str(args.max_concurrent)]
    print("command:", " ".join(command[1:]))
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT, env={**os.environ, "DO_NOT_TRACK": "1"}, text=True,
                          capture_output=True)
    wall = time.perf_counter() - start
    print(done.stdout[-4000:])
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return done.returncode
    report(workdir, wall)
    return 0


def report(workdir: Path, wall: float) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("attention-pipeline")
    parent = [r for r in client.search_runs([exp.experiment_id], filter_string="tags.`sweep.name` != ''")
              if "mlflow.parentRunId" not in r.data.tags][0]
    m = parent.data.metrics
    trials = client.search_runs([exp.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    max_steps = m["sweep.steps_if_all_finished"] / m["sweep.trials"]
    per_step = [(r.info.end_time - r.info.start_time) / 1000 / max_steps
                for r in trials if r.data.tags.get("sweep.outcome") == "completed" and r.info.end_time]
    saved_steps = m["sweep.steps_if_all_finished"] - m["sweep.steps_trained"]
    best = client.get_run(parent.data.tags["sweep.best_run_id"])
    print(f"sweep {parent.info.run_name}: {int(m['sweep.trials'])} trials, {int(m['sweep.trials_completed'])} "
          f"completed, {int(m['sweep.trials_stopped_early'])} stopped early, {int(m['sweep.trials_failed'])} failed")
    print(f"best val_loss {m['sweep.best_val_loss']:.4f}: {best.info.run_name} "
          f"(lr {float(best.data.params['train.lr']):.2e}, n_embd {best.data.params['model.n_embd']})")
    print(f"wall time {wall:.0f} s (the whole command: Prefect, Ray, every trial, evaluation, registration)")
    print(f"steps trained {m['sweep.steps_trained']:.0f} of {m['sweep.steps_if_all_finished']:.0f} "
          f"(all trials to the end): early stopping saved {m['sweep.compute_saved']:.0%} of the steps")
    if per_step:
        mean = sum(per_step) / len(per_step)
        print(f"  about {saved_steps * mean:.0f} trial-seconds at the completed trials' {mean:.3f} s per step "
              "(start-up included)")
    for r in sorted(trials, key=lambda r: r.info.run_name):
        print(f"  {r.info.run_name:28s} {r.data.tags.get('sweep.outcome', '?'):14s} "
              f"val_loss {r.data.metrics.get('val_loss', float('nan')):.4f}")


if __name__ == "__main__":
    sys.exit(main())
