"""The saved view of the MLflow UI (flows/registry/ui_view.py): the envelope MLflow 3.17's UI reads, the
losses on one chart in the first section, and the tag on a real experiment, new or already there."""

from __future__ import annotations

import json

import pytest

from flows.config import load_config
from flows.registry.ui_view import LOSS_FIGURE, VIEW_ID, VIEW_TAG, view_tag


def parsed_view() -> tuple[dict, dict]:
    key, value = view_tag()
    assert key == VIEW_TAG == f"mlflow.sharedViewState.{VIEW_ID}"
    envelope = json.loads(value)
    return envelope, json.loads(envelope["state"])


def test_the_tag_is_the_saved_view_envelope_of_the_ui():
    # what the UI's savedViewEnvelope parse requires, else it skips the tag in "Views" and refuses the link
    envelope, _ = parsed_view()
    assert isinstance(envelope["name"], str) and envelope["name"]
    assert isinstance(envelope["createdAt"], int) and isinstance(envelope["state"], str)
    assert view_tag() == view_tag()  # the same value every time: an unchanged view is never rewritten


def test_the_first_section_charts_train_and_val_loss_together_and_then_the_ui_sections():
    _, state = parsed_view()
    sections = state["compareRunSections"]
    assert [s["name"] for s in sections] == ["Loss", "Model metrics", "System metrics"]
    assert state["isAccordionReordered"] is True  # else the UI re-sorts sections by name
    first, figure = state["compareRunCharts"]
    assert first["metricSectionId"] == figure["metricSectionId"] == sections[0]["uuid"]
    assert first["type"] == "LINE" and first["selectedMetricKeys"] == ["train_loss", "val_loss"]
    assert figure["type"] == "IMAGE" and figure["imageKeys"] == [LOSS_FIGURE]
    assert len({c["uuid"] for c in state["compareRunCharts"]} | {s["uuid"] for s in sections}) == 5


def test_the_figure_key_is_the_one_log_evaluation_logs():
    import inspect

    from flows.registry import tracking

    assert f'figures["{LOSS_FIGURE}.png"]' in inspect.getsource(tracking.log_evaluation)


@pytest.mark.parametrize("existing", [False, True])
def test_the_pipeline_run_puts_the_view_on_its_experiment(tmp_path, existing):
    from flows.registry import mlflow_client, start_pipeline_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config()
    client = mlflow_client(uri)
    if existing:  # an experiment from before the view existed
        client.create_experiment(cfg.registry.experiment)
    start_pipeline_run(cfg, uri, flow_run_id="f1", run_name="r1")
    start_pipeline_run(cfg, uri, flow_run_id="f2", run_name="r2")
    tags = client.get_experiment_by_name(cfg.registry.experiment).tags
    assert tags[VIEW_TAG] == view_tag()[1]
