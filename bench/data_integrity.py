"""Benchmark what durability and the reuse check cost on prepared data (flows/data/integrity.py).

    .venv/bin/python bench/data_integrity.py                      # a 100 MB corpus, char tokenizer
    .venv/bin/python bench/data_integrity.py --size-mb 1000 --tokenizer byte

Builds the corpus bench/prepare_data.py builds (copies of the stdlib), prepares it once, then times on
the prepared directory: the checksums a prep records (`record_files`, the files hot in the page cache as
a prep leaves them), the fsyncs before publishing (`fsync_files`, on files rewritten first so they hold
dirty pages as a prep's do), and the check a reuse runs (`verify_prepared`) with sizes only and with
checksums, hot and with the files evicted from the page cache (POSIX_FADV_DONTNEED), so that they are
read from the disk. Each is the median of --repeat runs. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_data import build_corpus  # noqa: E402

from flows.config import validate_config  # noqa: E402
from flows.data import prepare_dataset  # noqa: E402
from flows.data.integrity import FILES, fsync_files, record_files, verify_prepared  # noqa: E402


def evict(directory: Path) -> None:
    os.sync()
    for name in FILES:
        fd = os.open(directory / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dirty(directory: Path, copy: Path) -> None:
    """Rewrite the files so their pages are dirty again, as a prep leaves them before its fsync."""
    for name in FILES:
        shutil.copyfile(directory / name, copy / name)


def timed(fn, repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100)
    parser.add_argument("--tokenizer", default="char")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        root = Path(tmp)
        corpus_bytes = build_corpus(root / "corpus", args.size_mb)
        cfg = validate_config({"workdir": str(root / "wd"), "data": {"source": str(root / "corpus"),
                               "tokenizer": args.tokenizer}})
        t = time.perf_counter()
        data = prepare_dataset(cfg)
        prep_s = time.perf_counter() - t
        out = Path(data.path)
        size = sum((out / n).stat().st_size for n in FILES)
        copy = root / "copy"
        copy.mkdir()
        rows = [
            ("prep (all of prepare_dataset, for scale)", prep_s),
            ("record_files: checksums at prep (hot)", timed(lambda: record_files(out), args.repeat)),
            ("fsync_files: fsync before publishing (dirty pages)",
             timed(lambda: fsync_files(copy), args.repeat, before=lambda: dirty(out, copy))),
            ("verify_prepared, sizes only", timed(lambda: verify_prepared(out, checksums=False), args.repeat)),
            ("verify_prepared, sizes and checksums (hot)", timed(lambda: verify_prepared(out), args.repeat)),
            ("verify_prepared, sizes and checksums (evicted)",
             timed(lambda: verify_prepared(out), args.repeat, before=lambda: evict(out))),
        ]
        print(f"corpus {corpus_bytes / 1e6:.1f} MB, {args.tokenizer} tokenizer: train.bin + val.bin + "
              f"tokenizer.json = {size / 1e6:.1f} MB\n")
        print("| step | seconds | MB/s |\n|---|---:|---:|")
        for name, seconds in rows:
            rate = "" if name.startswith("prep") or "sizes only" in name else f"{size / 1e6 / seconds:.0f}"
            print(f"| {name} | {seconds:.4f} | {rate} |")


if __name__ == "__main__":
    main()
