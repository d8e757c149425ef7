"""The pipeline's fixed cost: a one-step run of a tiny model, end to end, as a user runs it.

Each round runs `python -m flows run` in a fresh temporary workdir (the CLI a user types: its own
process, its temporary Prefect server, a local Ray, MLflow on SQLite), times it from the command's
start to its exit, and prints the run's `stage_seconds.*` metrics (flows/timing.py) read back from
the MLflow run. "after the last line" is the time between the CLI's last console line and the
process's exit (what the user waits for after the result is shown), and "CPU seconds" what the run's
whole process tree (the CLI, its Prefect server, Ray's processes and workers) used, sampled every
0.2 s: on a shared machine the steadier figure. Prints numbers; asserts nothing.

    PYTHONPATH=$PWD .venv/bin/python bench/pipeline_overhead.py [--rounds 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.max_steps=1",
        "train.batch_size=8", "train.num_workers=1", "eval.max_tokens=4096", "eval.max_new_tokens=16"]


class TreeCPU(threading.Thread):
    """CPU seconds (user + system) of a process and all its descendants, sampled until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root, self.seen, self.done = pid, {}, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                procs = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    t = p.cpu_times()
                    self.seen[(p.pid, p.create_time())] = t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            self.done.wait(0.2)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return sum(self.seen.values())


def run_once(extra: list[str], env: dict[str, str], *, tiny: bool = True
             ) -> tuple[float, float, float, dict[str, float], str]:
    """(wall seconds, seconds after the last console line, CPU seconds, stage seconds, workdir) of one
    run of the tiny model (`tiny`) or of the model `extra` sets."""
    workdir = tempfile.mkdtemp(prefix="bench-overhead-")
    sets = [a for s in [f"workdir={workdir}", *(TINY if tiny else []), *extra] for a in ("--set", s)]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flows", "run", *sets], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cpu = TreeCPU(proc.pid)
    cpu.start()
    last_line, output = start, []
    for line in proc.stdout:
        last_line = time.perf_counter()
        output.append(line)
    code = proc.wait()
    wall = time.perf_counter() - start
    cpu_seconds = cpu.stop()
    if code != 0:
        sys.exit(f"the run failed (exit {code}):\n{''.join(output)}")
    return wall, time.perf_counter() - last_line, cpu_seconds, stage_seconds(workdir), workdir


def stage_seconds(workdir: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from flows.timing import stage_seconds as in_order

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1)
    return in_order(run.data.metrics)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides for the run")
    args = p.parse_args()
    env = {**os.environ, "DO_NOT_TRACK": "1", "PYTHONPATH": str(ROOT)}
    sys.path.insert(0, str(ROOT))

    walls, tails, cpus, tables = [], [], [], []
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        wall, tail, cpu, stages, workdir = run_once(args.extra, env)
        walls.append(wall)
        tails.append(tail)
        cpus.append(cpu)
        tables.append(stages)
        print(f"round {r + 1}: {wall:.1f} s end to end, {cpu:.1f} CPU seconds (load {load:.2f} at the start; "
              f"workdir {workdir})", flush=True)
    names = list(dict.fromkeys(n for t in tables for n in t))
    print("\n| stage | " + " | ".join(f"round {i + 1}" for i in range(len(tables))) + " | median |")
    print("|---|" + "---:|" * (len(tables) + 1))
    for n in names:
        values = [t.get(n) for t in tables]
        cells = " | ".join("–" if v is None else f"{v:.2f}" for v in values)
        print(f"| {n} | {cells} | {statistics.median(v for v in values if v is not None):.2f} |")
    sums = [sum(t.values()) for t in tables]
    print(f"| sum of stages | {' | '.join(f'{s:.2f}' for s in sums)} | {statistics.median(sums):.2f} |")
    print(f"| after the last line | {' | '.join(f'{t:.2f}' for t in tails)} | {statistics.median(tails):.2f} |")
    print(f"| CPU seconds, process tree | {' | '.join(f'{c:.1f}' for c in cpus)} | {statistics.median(cpus):.1f} |")
    print(f"| **end to end** | {' | '.join(f'{w:.2f}' for w in walls)} | **{statistics.median(walls):.2f}** |")


if __name__ == "__main__":
    main()
