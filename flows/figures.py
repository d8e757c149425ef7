"""Figures the evaluation logs to MLflow: loss curves and attention heatmaps.

Each function returns a `matplotlib.figure.Figure` drawn on the Agg canvas, never through pyplot: no
global figure state, no display needed, nothing left open between runs. MLflow's `log_figure` saves
them as PNG artifacts under `figures/`, where the MLflow UI shows them beside each run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

# Whitespace drawn as visible marks, so a heatmap's axes show where spaces and newlines are.
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_pixels(fig: Figure, *, rendered: bool = False) -> np.ndarray:
    """The figure rendered as an RGB array (H, W, 3) of uint8, what MLflow's `log_image` takes.

    rendered: the canvas was just rendered at the figure's own size (a `savefig` at its dpi, which is
    what MLflow's `log_figure` does), so its buffer is read rather than drawn again: a layer x head
    heatmap is millions of pixels, and each rendering of it takes seconds."""
    canvas = fig.canvas
    width, height = canvas.get_width_height(physical=True)
    renderer = getattr(canvas, "renderer", None)
    if not (rendered and renderer is not None and (renderer.width, renderer.height) == (width, height)):
        canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def token_label(text: str, max_chars: int = 8) -> str:
    """A token's text as an axis label: whitespace made visible, long tokens cut with an ellipsis."""
    shown = "".join(_VISIBLE.get(ch, ch if ch.isprintable() else "·") for ch in text) or "∅"
    return shown if len(shown) <= max_chars else shown[: max_chars - 1] + "…"


def loss_curves_figure(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]],
                       title: str = "loss") -> Figure:
    """Training and validation loss against the optimizer step, as (step, value) pairs."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for points, label, style in ((train, "train_loss", "-"), (val, "val_loss", "o-")):
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if train or val:
        ax.legend()
    return fig


def attention_heatmaps_figure(maps: np.ndarray, tokens: Sequence[str], title: str = "attention") -> Figure:
    """A layer x head grid of attention maps (n_layer, n_head, T, T): queries down, keys across."""
    maps = np.asarray(maps)
    if maps.ndim != 4 or maps.shape[2] != maps.shape[3]:
        raise ValueError(f"maps: expected (n_layer, n_head, T, T), got {maps.shape}")
    n_layer, n_head, T, _ = maps.shape
    if len(tokens) != T:
        raise ValueError(f"tokens: expected {T} labels, got {len(tokens)}")
    cell = max(3.0, 0.3 * T)
    fig = _figure(cell * n_head + 1.2, cell * n_layer + 0.8)
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    labels = [token_label(t) for t in tokens]
    # Single characters read best upright; longer tokens are turned so they do not overlap.
    rotation = 0 if max((len(label) for label in labels), default=1) <= 2 else 90
    # A square-root scale: a causal head's first rows put all their weight on the few keys there are,
    # which on a linear scale leaves every other cell dark.
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    image = None
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(maps[layer, head], norm=norm, cmap="magma", interpolation="nearest")
            # Every map has the same tokens on both axes: labelled once, along the left column and the
            # bottom row (hundreds of tick labels on every map cost seconds to draw, and say nothing new).
            ax.set_xticks(range(T), labels if layer == n_layer - 1 else [], rotation=rotation, fontsize=10,
                          fontfamily="DejaVu Sans Mono")
            ax.set_yticks(range(T), labels if head == 0 else [], fontsize=10, fontfamily="DejaVu Sans Mono")
            ax.set_title(f"layer {layer} · head {head}", fontsize=11)
            if head == 0:
                ax.set_ylabel("query")
            if layer == n_layer - 1:
                ax.set_xlabel("key")
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (square-root scale)")
    fig.suptitle(title)
    return fig
