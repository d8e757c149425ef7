"""Search filters built from names and ids: a value is either written so that MLflow's own filter
parser reads back exactly that value, or refused (the caller then searches by a safe key)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.registry.tracking import filter_literal, quoted


def read_back(literal: str) -> list[str]:
    """The value MLflow's parsers of model-version and run filters read from `... = literal`."""
    from mlflow.utils.search_utils import SearchModelVersionUtils, SearchUtils

    return [SearchModelVersionUtils.parse_search_filter(f"name = {literal}")[0]["value"],
            SearchUtils.parse_search_filter(f"tags.`prefect.flow_run_id` = {literal}")[0]["value"]]


def read_back_logged_model(literal: str) -> str:
    from mlflow.utils.search_logged_model_utils import parse_filter_string

    return parse_filter_string(f"name = {literal} AND source_run_id = 'abc'")[0].value


@given(st.text(max_size=40))
@settings(max_examples=100, deadline=None)
def test_a_written_value_reads_back_exactly(value):
    if (literal := filter_literal(value)) is not None:
        assert read_back(literal) == [value, value]
    if (literal := filter_literal(value, double_quotes=False)) is not None:
        assert read_back_logged_model(literal) == value


@pytest.mark.parametrize("value", ["attention-transformer", "o'brien", 'say "hi"', "a b.c_d-e%f", "ünï ✓", ""])
def test_names_with_one_kind_of_quote_are_written(value):
    assert read_back(filter_literal(value)) == [value, value]


@pytest.mark.parametrize("value", ["both ' and \"", "back\\slash", "new\nline"])
def test_values_that_cannot_be_written_are_refused(value):
    assert filter_literal(value) is None
    with pytest.raises(ValueError, match="cannot be written"):
        quoted(value)


def test_logged_model_filters_take_single_quotes_only():
    assert filter_literal("o'brien", double_quotes=False) is None
    assert read_back_logged_model(quoted("model", double_quotes=False)) == "model"
