"""The training step inside the pipeline against attention_core's bare step, at nanoGPT's CPU settings.

Alternating rounds of two measurements on the same machine, same threads:

- bare: bench/train_step.py (attention_core's train_step on a random token stream, nothing else),
  the mean seconds per step over --steps timed steps after 10 untimed ones;
- pipeline: `python -m flows run` on tinyshakespeare for --steps steps with the defaults around the
  step (metrics every 10 steps, a 10-batch validation estimate and a checkpoint every 100, MLflow
  and Ray Train's reporting on); its seconds per step are (training + evaluations + checkpoints) /
  (steps - 1) from the run's stage_seconds metrics (flows/timing.py): every step but the first
  (warm-up), with everything the loop does between steps.

Prints both and their ratio; asserts nothing. nanoGPT's CPU model: 4 layers, 4 heads, 128 dims,
block 64, batch 12, char vocabulary (65 symbols on tinyshakespeare).

    PYTHONPATH=$PWD .venv/bin/python bench/step_overhead.py [--steps 500] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from pipeline_overhead import run_once  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "train.batch_size=12",
           "model.dropout=0.0", "train.num_workers=1"]


def bare_step(steps: int, threads: int) -> float:
    """Mean seconds per step of bench/train_step.py's loop (after its 10 untimed steps)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--preset", "nanogpt-cpu",
                          "--iters", str(steps), "--threads", str(threads)], capture_output=True, text=True,
                         check=True).stdout
    return float(re.search(r"mean ([0-9.]+)", out).group(1)) / 1000


def pipeline_step(steps: int, threads: int, corpus: Path, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Seconds per step inside the pipeline (see the module docstring) and the run's stage seconds."""
    extra = [f"data.source={corpus}", *NANOGPT, f"train.max_steps={steps}", f"train.cpus_per_worker={threads}",
             "eval.max_new_tokens=16"]
    _, _, _, stages, _ = run_once(extra, env, tiny=False)
    loop = stages["training"] + stages.get("evaluations", 0.0) + stages.get("checkpoints", 0.0)
    return loop / (steps - 1), stages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--corpus", type=Path, default=SHAKESPEARE)
    args = p.parse_args()
    env = {**os.environ, "DO_NOT_TRACK": "1", "PYTHONPATH": str(ROOT)}
    bare, inside = [], []
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        bare.append(bare_step(args.steps, args.threads))
        step, stages = pipeline_step(args.steps, args.threads, args.corpus, env)
        inside.append(step)
        print(f"round {r + 1} (load {load:.2f} at its start): bare {bare[-1] * 1000:.2f} ms/step, pipeline "
              f"{step * 1000:.2f} ms/step (training {stages['training']:.2f} s, evaluations "
              f"{stages.get('evaluations', 0):.2f} s, checkpoints {stages.get('checkpoints', 0):.2f} s), "
              f"ratio {step / bare[-1]:.3f}", flush=True)
    b, i = statistics.median(bare), statistics.median(inside)
    print(f"\n{args.steps} steps, {args.threads} threads, {args.rounds} alternating rounds (medians):")
    print(f"bare attention_core step:   {b * 1000:.2f} ms")
    print(f"pipeline step (everything): {i * 1000:.2f} ms")
    print(f"ratio pipeline / bare:      {i / b:.3f} (per round: {', '.join(f'{x / y:.3f}' for x, y in zip(inside, bare))})")


if __name__ == "__main__":
    main()
