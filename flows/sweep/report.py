"""What a sweep leaves in its parent MLflow run: the results table, the figures and the compute saved.

The table has one row per trial (its values, how it ended, its steps and metric, its MLflow run); the
figures are the metric against each searched key (trials stopped early drawn hollow, at the value they
had when stopped) and the learning curves of all trials on one chart, read back from the trials' own
runs. Everything is logged so that a retry replaces rather than adds (the figures by path and image
key, the table as CSV). `sweep.compute_saved` is the share of optimizer steps that early stopping did
not spend, against running every trial to train.max_steps.
"""

from __future__ import annotations

import csv
import io
import math
import time

from flows.config import PipelineConfig
from flows.sweep.spec import Dimension, SweepConfig
from flows.sweep.trials import COMPLETED, FAILED, STOPPED_EARLY
from flows.sweep.tuner import TrialOutcome

RESULTS_CSV = "sweep_results.csv"


def sweep_metrics(trials: list[TrialOutcome], max_steps: int, metric: str) -> dict[str, float]:
    """The parent run's summary: trials per outcome, steps trained, the compute early stopping saved."""
    trained = sum(t.steps for t in trials)
    full = max_steps * len(trials)
    done = [t.metric for t in trials if t.outcome == COMPLETED and t.metric is not None]
    out = {"sweep.trials": float(len(trials)),
           "sweep.trials_completed": float(sum(t.outcome == COMPLETED for t in trials)),
           "sweep.trials_stopped_early": float(sum(t.outcome == STOPPED_EARLY for t in trials)),
           "sweep.trials_failed": float(sum(t.outcome == FAILED for t in trials)),
           "sweep.steps_trained": float(trained), "sweep.steps_if_all_finished": float(full),
           "sweep.compute_saved": 1.0 - trained / full if full else 0.0}
    if done:
        out[f"sweep.best_{metric}"] = min(done)
    return out


def results_csv(trials: list[TrialOutcome], dims: list[Dimension], metric: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial_id", *[d.key for d in dims], "outcome", "steps", metric, "mlflow_run_id", "error"])
    for t in trials:
        writer.writerow([t.trial_id, *[t.params.get(d.key, "") for d in dims], t.outcome, t.steps,
                         "" if t.metric is None else f"{t.metric:.6g}", t.run_id or "", (t.error or "")[:200]])
    return out.getvalue()


def metric_vs_key_figure(trials: list[TrialOutcome], dim: Dimension, metric: str, title: str):
    """The metric of every trial against one searched key; hollow: stopped early."""
    from flows.figures import _figure

    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for outcome, style in ((COMPLETED, dict(marker="o", color="C0")),
                           (STOPPED_EARLY, dict(marker="o", facecolors="none", edgecolors="C1"))):
        points = [(t.params[dim.key], t.metric) for t in trials
                  if t.outcome == outcome and t.metric is not None and dim.key in t.params]
        if points:
            xs, ys = zip(*points)
            if dim.kind == "choice" and not all(isinstance(x, (int, float)) for x in xs):
                xs = [str(x) for x in xs]
            ax.scatter(xs, ys, label=outcome.replace("_", " "), s=40, **style)
    if dim.kind == "loguniform":
        ax.set_xscale("log")
    ax.set_xlabel(dim.key)
    ax.set_ylabel(f"{metric} (at the trial's last report)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def learning_curves_figure(curves: dict[str, list[tuple[int, float]]], stopped: set[str], metric: str, title: str):
    """Every trial's metric over steps on one chart; dashed: stopped early."""
    from flows.figures import _figure

    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    for label, points in sorted(curves.items()):
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, "--" if label in stopped else "-", marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="upper right")
    return fig


def log_sweep_results(cfg: PipelineConfig, sweep: SweepConfig, dims: list[Dimension], trials: list[TrialOutcome],
                      *, tracking_uri: str, parent_run_id: str, best: TrialOutcome | None, name: str) -> None:
    """The parent run's table, figures, summary metrics and tags; the best trial's run tagged as such."""
    from mlflow.entities import Metric, RunTag

    from flows.figures import figure_pixels
    from flows.registry import mlflow_client
    from flows.registry.tracking import metric_points

    client = mlflow_client(tracking_uri)
    client.log_text(parent_run_id, results_csv(trials, dims, sweep.metric), RESULTS_CSV)
    figures = {f"sweep_{sweep.metric}_vs_{d.key.replace('.', '_')}":
               metric_vs_key_figure(trials, d, sweep.metric, f"{name}: {sweep.metric} against {d.key}") for d in dims}
    labels = {t.trial_id: client.get_run(t.run_id).info.run_name for t in trials if t.run_id}
    curves = {labels[t.trial_id]: metric_points(client, t.run_id, sweep.metric) for t in trials if t.run_id}
    stopped = {labels[t.trial_id] for t in trials if t.run_id and t.outcome == STOPPED_EARLY}
    figures["sweep_learning_curves"] = learning_curves_figure(
        curves, stopped, sweep.metric, f"{name}: {sweep.metric} of every trial (dashed: stopped early)")
    images = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(parent_run_id, "images")}
    for key, fig in figures.items():
        client.log_figure(parent_run_id, fig, f"figures/{key}.png")
        if not any(image.startswith(f"{key}%step%") or image.startswith(f"{key}+step+") for image in images):
            client.log_image(parent_run_id, figure_pixels(fig, rendered=True), key=key, step=0)
    ts = int(time.time() * 1000)
    metrics = sweep_metrics(trials, cfg.train.max_steps, sweep.metric)
    tags = {"sweep.best_trial_id": best.trial_id, "sweep.best_run_id": best.run_id or ""} if best else {}
    client.log_batch(parent_run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items() if math.isfinite(v)],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    if best and best.run_id:
        client.set_tag(best.run_id, "sweep.best", "true")
