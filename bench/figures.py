"""The evaluation's figures: seconds to draw, save and log the attention heatmaps (issue 15's figures stage).

A 4-layer x 4-head grid of T x T maps (the recipe's model on a T-token prompt) is made, saved as PNG (what
MLflow's `log_figure` does) and turned into the pixels `log_image` takes, read from that rendering
(`figure_pixels(rendered=True)`, what the pipeline does) and, for comparison, drawn again (what it did).
Prints seconds; asserts nothing.

    PYTHONPATH=$PWD .venv/bin/python bench/figures.py
"""

from __future__ import annotations

import io
import os
import statistics
import time

import numpy as np

from flows.figures import attention_heatmaps_figure, figure_pixels


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    print(f"load {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    print("| T | pixels | make | savefig (log_figure) | pixels, reused | pixels, drawn again |")
    print("|---:|---|---:|---:|---:|---:|")
    for T in (16, 32):
        rows = []
        for _ in range(3):
            maps = np.random.default_rng(T).random((4, 4, T, T))
            maps /= maps.sum(-1, keepdims=True)
            box = {}
            make = seconds(lambda: box.setdefault("fig", attention_heatmaps_figure(maps, [chr(97 + i % 26) for i in range(T)])))
            fig = box["fig"]
            save = seconds(lambda: fig.savefig(io.BytesIO(), format="png"))
            reused = seconds(lambda: figure_pixels(fig, rendered=True))
            drawn = seconds(lambda: figure_pixels(fig))
            rows.append((make, save, reused, drawn))
        med = [statistics.median(col) for col in zip(*rows)]
        h, w, _ = figure_pixels(fig, rendered=True).shape
        print(f"| {T} | {w}x{h} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | {med[3]:.2f} |")


if __name__ == "__main__":
    main()
