"""The pure parts of the MLflow edge, without a server: the search grammar (filters, order_by,
page tokens) and the step mapping of step-less histories, both directions."""

from __future__ import annotations

import pytest

from mlrun.server.errors import InvalidInput
from mlrun.server.ports.mlflow_state import Step0Origins
from mlrun.server.usecases.mlflow import search, steps


def lookup(**attributes: str | float | None) -> search.Lookup:
    return search.run_lookup(metrics={"acc": 0.9, "val loss": 0.1},
                             params={"lr": "0.01", "opt": "adam"},
                             tags={"mlflow.runName": "r1", "team": "Vision"},
                             attributes={"status": "FINISHED", "start_time": 100.0,
                                         **attributes})


@pytest.mark.parametrize(("text", "expected"), [
    ("metrics.acc > 0.5", True),
    ("metrics.acc>0.95", False),
    ('metrics."val loss" <= 0.1 AND params.lr = \'0.01\'', True),
    ("metrics.`val loss` != 0.1", False),
    ("tags.mlflow.runName = 'r1' and tags.team ILIKE 'vis%'", True),
    ("tags.team LIKE 'vis%'", False),
    ("params.opt IN ('sgd', 'adam') AND params.opt NOT IN ('x')", True),
    ("attributes.status = 'FINISHED' and attribute.start_time >= 100", True),
    ("status != 'FINISHED'", False),
    ("tags.missing IS NULL and params.lr IS NOT NULL", True),
    ("metrics.missing > 0", False),
    ("", True),
])
def test_filters_match_as_mlflow_does(text: str, expected: bool) -> None:
    assert search.matches(search.parse_filter(text), lookup()) is expected


@pytest.mark.parametrize("text", [
    "metrics.acc >>> 1", "metrics.acc > 'a'", "params.lr > '1'", "bogus.x = 'y'",
    "metrics.acc > 1 OR metrics.acc < 0", "params.lr IN (1, 2)", "metrics.acc >",
    "tags.x = 'unterminated",
])
def test_malformed_filters_are_400_naming_the_filter(text: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        search.parse_filter(text)
    assert refused.value.field == "filter"


def test_order_by_puts_missing_values_last_in_both_directions() -> None:
    items = {"a": 3.0, "b": None, "c": 1.0, "d": 2.0}
    for text, expected in (("metrics.m DESC", ["a", "d", "c", "b"]),
                           ("metrics.m", ["c", "d", "a", "b"])):
        clauses = search.parse_order_by([text])
        assert search.ordered(list(items), clauses, lambda k, _: items[k],
                              lambda k: (0.0, k)) == expected
    with pytest.raises(InvalidInput):
        search.parse_order_by(["metrics.m sideways"])


def test_page_tokens_belong_to_their_query() -> None:
    token = search.encode_page_token(40, "q1")
    assert search.decode_page_token(token, "q1") == 40
    for bad, query in ((token, "q2"), ("not-a-token", "q1")):
        with pytest.raises(InvalidInput):
            search.decode_page_token(bad, query)


def test_stepless_points_map_to_synthetic_steps_and_back() -> None:
    start, first = 1_000_000, 1_000_500
    keys = ["loss"] * 4 + ["epoch_acc"] * 2
    raw = [0, 0, 0, 0, 0, 1]
    stamps = [first, first + 10, first + 20, first + 20, 2_000_000, 2_000_100]
    assert steps.step0_claim(keys, raw, stamps) == {"loss": first, "epoch_acc": 2_000_000}
    origins = Step0Origins(run_start_ms=start, first_ms={"loss": first, "epoch_acc": 2_000_000})
    stored = steps.stored_steps(keys, raw, stamps, origins)
    # The first step-0 point stays at 0 (an epoch-0 point of a stepped series is untouched);
    # the others are milliseconds since the run started; a resend maps identically.
    assert stored == [0, 510, 520, 520, 0, 1]
    assert steps.stored_steps(keys, raw, stamps, origins) == stored
    back = [steps.mlflow_step(k, s, t, origins) for k, s, t in zip(keys, stored, stamps,
                                                                     strict=True)]
    assert back == raw
    assert steps.stored_steps(["x"], [5], [7], None) == [5]
    assert steps.synthetic_step(start - 50, start) == 1  # a clock behind the run's start
