"""The experiment's saved view in the MLflow UI: the chart layout that puts the losses first.

The UI sorts charts by metric name, so bookkeeping metrics (`eval_bytes`, `eval_tokens`,
`stage_seconds.*`) come before `train_loss` and `val_loss`, each on a chart of its own. MLflow 3.17
keeps a saved view as an experiment tag `mlflow.sharedViewState.<id>`: an envelope (name, createdAt,
and `state`, the experiment page's UI state as JSON) that the runs page lists under "Views" and opens
from the URL parameter `viewStateShareKey=<id>` (server/js: useSharedExperimentViewState, and
savedViewEnvelope's parse). Ours holds one section, "Loss", above the UI's own "Model metrics" and
"System metrics", with train_loss and val_loss on one chart and the loss_curves figure beside it;
the UI adds every other metric to "Model metrics" as usual, so nothing is hidden and no key changes.
"""

from __future__ import annotations

import json

VIEW_ID = "losses-first"  # fixed, so writing it again replaces it rather than adding a copy
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
VIEW_NAME = "Training: losses first"
LOSS_KEYS = ("train_loss", "val_loss")  # the keys flows/train/metrics.py logs per step
LOSS_FIGURE = "loss_curves"  # the image key log_evaluation logs
CREATED_AT_MS = 1  # a constant: the same tag value every run, so an unchanged view is never rewritten


def _section(uuid: str, name: str, **layout) -> dict:
    return {"uuid": uuid, "name": name, "display": True, "isReordered": False, "deleted": False,
            "isGenerated": False, **layout}


def _card(uuid: str, kind: str, **fields) -> dict:
    return {"uuid": uuid, "type": kind, "runsCountToCompare": 10, "metricSectionId": "loss", "deleted": False,
            "isGenerated": False, **fields}


def view_state() -> dict:
    """The experiment page's chart state: the "Loss" section first, then MLflow's own two sections."""
    losses = _card("loss-chart", "LINE", displayName=" and ".join(LOSS_KEYS), metricKey=LOSS_KEYS[0],
                   selectedMetricKeys=list(LOSS_KEYS), lineSmoothness=0, xAxisKey="step", xAxisScaleType="linear",
                   scaleType="linear", selectedXAxisMetricKey="", yAxisKey="metric", yAxisExpressions=[],
                   range={}, ignoreOutliers=False, useGlobalXaxisKey=True, useGlobalLineSmoothing=True)
    figure = _card("loss-figure", "IMAGE", imageKeys=[LOSS_FIGURE], step=0, showRunParams=False)
    return {
        # two cards a row, taller than the UI's 3 x 360 px, so the curves and their legend can be read
        "compareRunSections": [_section("loss", "Loss", columns=2, cardHeight=480), _section("model", "Model metrics"),
                               _section("system", "System metrics")],
        "compareRunCharts": [losses, figure],
        # "reordered": the UI keeps this section order instead of sorting by name (custom names first,
        # then "Model metrics"), and appends sections for new prefixes at the end
        "isAccordionReordered": True,
    }


def view_tag() -> tuple[str, str]:
    """The experiment tag (key, value) holding the view, in the envelope MLflow's UI writes."""
    envelope = {"name": VIEW_NAME, "createdAt": CREATED_AT_MS, "updatedAt": CREATED_AT_MS,
                "state": json.dumps(view_state(), separators=(",", ":"))}
    return VIEW_TAG, json.dumps(envelope, separators=(",", ":"))


def install_view(client, experiment_id: str, tags: dict[str, str]) -> None:
    """Set the view on the experiment unless `tags` (the experiment's) already hold this very value."""
    key, value = view_tag()
    if tags.get(key) != value:
        client.set_experiment_tag(experiment_id, key, value)
