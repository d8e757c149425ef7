"""Benchmark prepare_dataset: MB/s and peak memory per tokenizer on a corpus made by repeating the stdlib.

    .venv/bin/python bench/prepare_data.py                      # 100 MB corpus, char byte bpe
    .venv/bin/python bench/prepare_data.py --size-mb 1000 --tokenizers char byte
    .venv/bin/python bench/prepare_data.py --size-mb 1000 --tokenizers byte --pipeline --evict --corpus /tmp/c
    .venv/bin/python bench/prepare_data.py --tokenizers bpe --script cyrillic   # non-ASCII text

The corpus is copies of the interpreter's top-level stdlib modules (each copy's files start with a line
naming the copy, so every document is distinct), written once to a temporary directory (or kept in
--corpus). `--script cyrillic` writes the same files with the lowercase Latin letters swapped for Cyrillic
ones (two UTF-8 bytes each, mostly letters, words as long): the cost of non-ASCII text. Each tokenizer then prepares it from scratch in a fresh process, timed around `prepare_dataset`
alone (interpreter start and imports excluded); with --pipeline, around all a cold `flows run` does with
the data: the CLI's check, the flow's resolution and hash of the source, the prepare task's cache key,
then the prep. --evict drops the corpus from the page cache before each run (fsync and
POSIX_FADV_DONTNEED on its files only), so its reads come from the disk. CPU seconds add up every process
of the prep, datasets' workers included, which shows how much of the wall time other load on the machine
took. Memory is sampled every 20 ms over the process tree: the peak of the summed PSS (shared pages
counted once), and the largest single RSS. "hashed" is the data the run hashed (every file's sha256).
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
import json, os, resource, sys, time
import datasets, pyarrow, tokenizers  # imported before the clock starts
from flows.config import validate_config
from flows.data import check_source, prepare_dataset, sources
from flows.data.cache import DataFingerprintCache, prepare_options, source_for_run

def cpu():
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))

def pipeline(cfg):
    # a cold `flows run`: the CLI's check, then the flow's prepare step (pipeline._prepare_dataset_cached:
    # the source resolved and pinned once, the cache-refresh check, the task's cache key, the task)
    check_source(cfg.data.source)
    source = source_for_run(cfg)
    prepare_options(cfg, source)
    DataFingerprintCache().compute_key(None, {"cfg": cfg, "source": source}, {})
    return prepare_dataset(cfg, source)

hashed = {"hashed_files": 0, "hashed_bytes": 0}
real_sha256 = sources._file_sha256

def counting_sha256(path):
    hashed["hashed_files"] += 1
    hashed["hashed_bytes"] += os.path.getsize(path)
    return real_sha256(path)

sources._file_sha256 = counting_sha256
cfg = validate_config(json.loads(sys.argv[1]))
run = pipeline if sys.argv[2] == "pipeline" else prepare_dataset
if run is pipeline:
    import flows.pipeline  # loaded in a real run's process (torch, Ray, MLflow) when the prep forks its workers
t, c = time.perf_counter(), cpu()
d = run(cfg)
print(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": cpu() - c, **hashed, **d.model_dump()}))
"""


CYRILLIC = str.maketrans("abcdefghijklmnopqrstuvwxyz", "абвгдежзийклмнопрстуфхцчшщ")


def build_corpus(root: Path, size_mb: float, script: str = "latin") -> int:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    blobs = [(f.name, f.read_bytes()) for f in files]
    if script == "cyrillic":
        blobs = [(name, data.decode("utf-8").translate(CYRILLIC).encode("utf-8")) for name, data in blobs]
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


def evict(corpus: Path) -> None:
    """Drop the corpus's pages from the page cache (written back first), so that the next run reads the disk."""
    os.sync()
    for f in corpus.rglob("*.py"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_one(corpus: Path, workdir: Path, tokenizer: str, num_proc: int | None, mode: str) -> dict:
    cfg = {"workdir": str(workdir), "data": {"source": str(corpus), "tokenizer": tokenizer, "num_proc": num_proc}}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg), mode], stdout=subprocess.PIPE, text=True)
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
    parser.add_argument("--corpus", type=Path, default=None,
                        help="keep the corpus here, and reuse the one a previous run left (default: a temp dir)")
    parser.add_argument("--pipeline", action="store_true",
                        help="time the CLI's check, the flow's source pinning and the cache key with the prep")
    parser.add_argument("--evict", action="store_true", help="drop the corpus from the page cache before each run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tokenizer (default: 1)")
    parser.add_argument("--script", choices=["latin", "cyrillic"], default="latin",
                        help="cyrillic: the corpus's lowercase letters in Cyrillic (non-ASCII text)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.dir))
    corpus = args.corpus or root / "corpus"
    try:
        if not corpus.is_dir() or not any(corpus.iterdir()):
            build_corpus(corpus, args.size_mb, args.script)
        files = sorted(corpus.rglob("*.py"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        timed = "the pipeline's data steps" if args.pipeline else "prepare_dataset"
        print(f"corpus: {mb:.1f} MB in {len(files)} files; {os.cpu_count()} cores; timing {timed}"
              f"{', page cache evicted' if args.evict else ''}; load average {os.getloadavg()[0]:.1f}")
        print("\n| tokenizer | seconds | MB/s | CPU seconds | hashed | peak memory (PSS), process tree "
              "| peak RSS, largest process | tokens | vocab |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for tok in args.tokenizers:
            for _ in range(args.repeat):
                if args.evict:
                    evict(corpus)
                r = run_one(corpus, root / f"work-{tok}", tok, args.num_proc,
                            "pipeline" if args.pipeline else "prep")
                tokens = r["train_tokens"] + r["val_tokens"]
                print(f"| {tok} | {r['seconds']:.1f} | {mb / r['seconds']:.1f} | {r['cpu_seconds']:.1f} "
                      f"| {r['hashed_bytes'] / 1e6:.0f} MB | {r['peak_rss_sum'] / 2**20:.0f} MiB "
                      f"| {r['peak_rss_one'] / 2**20:.0f} MiB | {tokens:,} | {r['vocab_size']:,} |", flush=True)
                shutil.rmtree(root / f"work-{tok}", ignore_errors=True)
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
