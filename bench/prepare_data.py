"""Benchmark prepare_dataset: MB/s and peak memory per tokenizer on a corpus made by repeating the stdlib.

    .venv/bin/python bench/prepare_data.py                      # 100 MB corpus, char byte bpe
    .venv/bin/python bench/prepare_data.py --size-mb 1000 --tokenizers char byte

The corpus is copies of the interpreter's top-level stdlib modules (each copy's files start with a line
naming the copy, so every document is distinct), written once to a temporary directory. Each tokenizer
then prepares it from scratch in a fresh process, timed around `prepare_dataset` alone (interpreter start
and imports excluded); CPU seconds add up every process of the prep, datasets' workers included, which
shows how much of the wall time other load on the machine took. Memory is sampled every 20 ms over the
process tree: the peak of the summed PSS (shared pages counted once), and the largest single RSS.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

CHILD = """
import json, resource, sys, time
import datasets, pyarrow, tokenizers  # imported before the clock starts
from flows.config import validate_config
from flows.data import prepare_dataset

def cpu():
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))

cfg = validate_config(json.loads(sys.argv[1]))
t, c = time.perf_counter(), cpu()
d = prepare_dataset(cfg)
print(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": cpu() - c, **d.model_dump()}))
"""


def build_corpus(root: Path, size_mb: float) -> int:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    blobs = [(f.name, f.read_bytes()) for f in files]
    total, copy = 0, 0
    while total < size_mb * 1e6:
        d = root / f"copy{copy:04d}"
        d.mkdir(parents=True)
        for name, data in blobs:
            body = f"# copy {copy}\n".encode() + data
            (d / name).write_bytes(body)
            total += len(body)
        copy += 1
    return total


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(summed PSS, largest RSS) over a process and its descendants, in bytes. PSS splits pages shared
    between processes (forked workers share their parent's) among them, so the sum counts each page once."""
    pss, rss = [], []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        pss.append(getattr(info, "pss", info.rss))
        rss.append(info.rss)
    return sum(pss), max(rss, default=0)


def run_one(corpus: Path, workdir: Path, tokenizer: str, num_proc: int | None) -> dict:
    cfg = {"workdir": str(workdir), "data": {"source": str(corpus), "tokenizer": tokenizer, "num_proc": num_proc}}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)], stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_sum = peak_one = 0
    while proc.poll() is None:
        total, largest = tree_memory(ps)
        peak_sum, peak_one = max(peak_sum, total), max(peak_one, largest)
        time.sleep(0.02)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{tokenizer}: prep failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss_sum": peak_sum, "peak_rss_one": peak_one}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--tokenizers", nargs="+", default=["char", "byte", "bpe"])
    parser.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: all cores)")
    parser.add_argument("--dir", type=Path, default=None, help="where corpus and workdirs go (default: a temp dir)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.dir))
    try:
        corpus_bytes = build_corpus(root / "corpus", args.size_mb)
        mb = corpus_bytes / 1e6
        print(f"corpus: {mb:.1f} MB in {len(list((root / 'corpus').rglob('*.py')))} files; "
              f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
        print("\n| tokenizer | seconds | MB/s | CPU seconds | peak memory (PSS), process tree | peak RSS, largest process | tokens | vocab |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for tok in args.tokenizers:
            r = run_one(root / "corpus", root / f"work-{tok}", tok, args.num_proc)
            tokens = r["train_tokens"] + r["val_tokens"]
            print(f"| {tok} | {r['seconds']:.1f} | {mb / r['seconds']:.1f} | {r['cpu_seconds']:.1f} "
                  f"| {r['peak_rss_sum'] / 2**20:.0f} MiB | {r['peak_rss_one'] / 2**20:.0f} MiB | {tokens:,} "
                  f"| {r['vocab_size']:,} |", flush=True)
            shutil.rmtree(root / f"work-{tok}", ignore_errors=True)
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
