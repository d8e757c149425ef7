"""Figures: loss curves and the layer x head attention grid, drawn off-screen and saved as PNG."""

from __future__ import annotations

import numpy as np
import pytest

from flows.figures import attention_heatmaps_figure, loss_curves_figure, token_label

PNG = b"\x89PNG\r\n\x1a\n"


def test_loss_curves_plot_train_and_val_against_step(tmp_path):
    fig = loss_curves_figure([(3, 4.0), (1, 5.0), (2, 4.5)], [(2, 4.7)])
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["train_loss"].get_xdata()) == [1, 2, 3]  # sorted by step
    assert list(lines["val_loss"].get_ydata()) == [4.7]
    assert ax.get_xlabel() == "step"
    fig.savefig(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG)


def test_loss_curves_without_points_still_draw():
    fig = loss_curves_figure([], [])
    assert fig.axes[0].get_lines() == []


@pytest.mark.parametrize("n_layer, n_head", [(1, 1), (2, 3)])
def test_attention_grid_has_one_heatmap_per_layer_and_head(tmp_path, n_layer, n_head):
    T = 5
    maps = np.random.default_rng(0).random((n_layer, n_head, T, T))
    tokens = ["d", "e", "f", " ", "\n"]
    fig = attention_heatmaps_figure(maps, tokens)
    heatmaps = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("layer")]
    assert len(heatmaps) == n_layer * n_head
    assert heatmaps[-1].get_title() == f"layer {n_layer - 1} · head {n_head - 1}"
    shown = ["d", "e", "f", "␣", "↵"]
    for i, ax in enumerate(heatmaps):  # the tokens along the bottom row and the left column, once
        layer, head = divmod(i, n_head)
        assert [t.get_text() for t in ax.get_xticklabels()] == (shown if layer == n_layer - 1 else [""] * T)
        assert [t.get_text() for t in ax.get_yticklabels()] == (shown if head == 0 else [""] * T)
    fig.savefig(tmp_path / "attention.png")
    assert (tmp_path / "attention.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("maps, tokens", [(np.zeros((2, 3, 3)), "abc"), (np.zeros((1, 1, 3, 3)), "ab")])
def test_attention_grid_rejects_bad_shapes(maps, tokens):
    with pytest.raises(ValueError):
        attention_heatmaps_figure(maps, list(tokens))


@pytest.mark.parametrize("text, label", [("a", "a"), (" ", "␣"), ("\t\n", "⇥↵"), ("", "∅"),
                                         ("abcdefghijk", "abcdefg…"), ("\x00", "·")])
def test_token_label(text, label):
    assert token_label(text) == label


def test_figures_draw_on_the_agg_canvas_without_pyplot():
    fig = loss_curves_figure([(1, 1.0)], [])
    assert fig.canvas.__class__.__name__ == "FigureCanvasAgg"
    assert not hasattr(fig, "number")  # pyplot gives its figures a number; ours are never registered there


def test_heatmaps_are_readable_upright_labels_a_square_root_scale_and_large_ticks():
    """Single characters stay upright (a rotated '␣' reads as 'u'), ticks are at least 10 points, and the
    colour scale is not linear, so a map dominated by its first cell still shows the rest."""
    maps = np.tril(np.full((1, 1, 4, 4), 0.1))
    maps[0, 0, 0, 0] = 1.0
    fig = attention_heatmaps_figure(maps, ["a", " ", "b", "\n"], title="run-1: attention")
    (ax,) = [ax for ax in fig.axes if ax.images]
    assert all(t.get_rotation() == 0 for t in ax.get_xticklabels())
    assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 10
    norm = ax.images[0].norm
    assert norm(0.1) > 0.25  # linear would be 0.1: nearly black
    assert fig.get_suptitle() == "run-1: attention"
    long = attention_heatmaps_figure(maps, ["def", "main", "(", ")"])
    (ax,) = [ax for ax in long.axes if ax.images]
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {90}


def test_figure_pixels_are_an_rgb_image():
    from flows.figures import figure_pixels

    pixels = figure_pixels(loss_curves_figure([(1, 1.0), (2, 0.5)], []))
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[:2] == (400, 700) and pixels.std() > 0


def test_pixels_read_after_savefig_are_the_saved_png(tmp_path):
    """What log_evaluation logs as an image by key is read from the rendering that log_figure's savefig
    left (not drawn again: seconds for a large heatmap), and is exactly the PNG figure it saved."""
    import numpy as np
    from PIL import Image

    from flows.figures import attention_heatmaps_figure, figure_pixels

    maps = np.random.default_rng(0).random((2, 2, 5, 5))
    maps /= maps.sum(-1, keepdims=True)
    fig = attention_heatmaps_figure(maps, list("abcde"), title="run x")
    fig.savefig(tmp_path / "f.png")  # what MLflow's log_figure does
    saved = np.asarray(Image.open(tmp_path / "f.png").convert("RGB"))
    assert np.array_equal(figure_pixels(fig, rendered=True), saved)
    never_drawn = attention_heatmaps_figure(maps, list("abcde"), title="run x")
    pixels = figure_pixels(never_drawn, rendered=True)  # nothing to reuse: drawn
    assert pixels.shape == saved.shape and pixels.std() > 0
