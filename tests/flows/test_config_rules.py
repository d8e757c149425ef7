"""Cross-field rules and MLflow's name rules in PipelineConfig: refused at load, one line naming the key.

The MLflow rules are mirrored (flows/ must not import MLflow's private validators, nor MLflow at all
where a config is validated); these tests hold the mirror to MLflow 3.17's own validators.
"""

from __future__ import annotations

import pytest

from flows.config import MLFLOW_NAME_MAX, load_config, mlflow_experiment_name_problem, mlflow_model_name_problem
from flows.errors import UserError

MODEL_NAMES = ["attention-transformer", "team/lm", "a:b", "", "  ", ".", "..", "..x", "x..", "a.b", "with space",
               "it's", "50%", "ünïcode", "x" * MLFLOW_NAME_MAX]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_name_rules_mirror_mlflow(name):
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.file_store import _validate_model_name  # the strictest: the file store's

    try:
        _validate_model_name(name)
        mlflow_refuses = False
    except MlflowException:
        mlflow_refuses = True
    assert (mlflow_model_name_problem(name) is not None) == mlflow_refuses


@pytest.mark.parametrize("name", ["attention-pipeline", "", "x" * 500, "x" * 501, "a/b:c"])
def test_experiment_name_rules_mirror_mlflow(name):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_experiment_name

    try:
        _validate_experiment_name(name)
        mlflow_refuses = False
    except MlflowException:
        mlflow_refuses = True
    # stricter than MLflow's check only where its database column is: 256 characters
    assert (mlflow_experiment_name_problem(name) is not None) == (mlflow_refuses or len(name) > MLFLOW_NAME_MAX)


@pytest.mark.parametrize("override, expected", [
    ("registry.model_name=team/lm",
     "invalid config: registry.model_name: 'team/lm': MLflow forbids '/' and ':' in a registered model name"),
    ("registry.experiment=", "invalid config: registry.experiment: '': must not be empty"),
    ("registry.experiment=   ", "invalid config: registry.experiment: '   ': must not be empty"),
    ("eval.max_tokens=64",
     "invalid config: eval.max_tokens: 64 is less than one evaluation window of model.block_size=128"),
])
def test_bad_names_and_windows_are_one_line(override, expected):
    with pytest.raises(UserError) as err:
        load_config(overrides=[override])
    assert str(err.value) == expected


@pytest.mark.parametrize("overrides", [
    ["train.max_steps=5", "train.eval_interval=100", "train.checkpoint_interval=100", "train.log_interval=50"],
    ["train.max_steps=10", "train.warmup_steps=30"],  # stays in warmup: a smoke test, not a mistake
    ["eval.max_tokens=128"],  # exactly one window
])
def test_harmless_combinations_are_accepted(overrides):
    load_config(overrides=overrides)


def test_a_name_longer_than_mlflows_database_column_is_refused():
    with pytest.raises(UserError, match=r"registry\.model_name: .*257 characters, more than the 256"):
        load_config(overrides=["registry.model_name=" + "x" * 257])
