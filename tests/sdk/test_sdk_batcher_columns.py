"""The batch builder's columnar path (blocks of calls with the same names, transposed at cut
time) forms exactly the batch the per-point definition gives: the last value and time of each
(metric, step), steps in first-logged order, invalid points dropped and counted, and the same
size estimate (so batches are cut at the same places). Checked on random call sequences that mix
repeated and changing name sets, re-logged and unordered steps, bool, float, negative, huge and
unhashable steps, NaN, inf, text and numpy-like values, and bad names."""

from __future__ import annotations

import math
import operator
import random
from typing import Any

import pytest

from mlrun.sdk.batcher import _POINT_BYTES, _SERIES_BYTES, METRICS, BatchBuilder
from mlrun.sdk.statistics import Counters
from mlrun.wire.schemas import MAX_NAME_CHARS, MAX_STEP

Call = tuple[Any, float, dict[Any, Any]]


class _Numberish:
    """A value float() accepts that is not a float (a numpy or torch scalar, say)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __float__(self) -> float:
        return self.value


def _reference(calls: list[Call]) -> tuple[list[tuple[Any, list[int], list[float], list[int]]],
                                           int, int, int]:
    """The definition: (series, distinct points, invalid points, estimated bytes)."""
    points: dict[Any, dict[Any, tuple[Any, float]]] = {}
    invalid = 0
    estimate = 0
    for step, at_s, payload in calls:
        try:
            hash(step)
        except TypeError:
            invalid += len(payload)
            continue
        for name, value in payload.items():
            if name not in points:
                points[name] = {}
                estimate += _SERIES_BYTES + len(str(name))
            points[name][step] = (value, at_s)
        estimate += _POINT_BYTES * len(payload)
    series = []
    for name, by_step in points.items():
        if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS):
            invalid += len(by_step)
            continue
        steps, values, stamps = [], [], []
        for step, (value, at_s) in by_step.items():
            try:
                number, index = float(value), operator.index(step)
            except (TypeError, ValueError):
                invalid += 1
                continue
            if not math.isfinite(number) or not 0 <= index <= MAX_STEP:
                invalid += 1
                continue
            steps.append(index)
            values.append(number)
            stamps.append(int(at_s * 1000))
        if steps:
            series.append((name, steps, values, stamps))
    distinct = sum(len(by_step) for by_step in points.values())
    return series, distinct, invalid, estimate


def _random_calls(rng: random.Random) -> list[Call]:
    pool = [f"m{i}" for i in range(6)] + ["x" * (MAX_NAME_CHARS + 1), 7]
    names = rng.sample(pool[:6], rng.randint(1, 5))
    calls: list[Call] = []
    step = rng.randint(0, 3)
    at_s = 1_700_000_000.0
    for _ in range(rng.randint(1, 60)):
        if rng.random() < 0.15:  # the name set changes (eval metrics, a late metric, ...)
            names = rng.sample(pool, rng.randint(0, 4)) if rng.random() < 0.2 else rng.sample(
                pool[:6], rng.randint(1, 5))
        kind = rng.random()
        if kind < 0.75:
            step += 1
        elif kind < 0.85:
            step = max(0, step - rng.randint(0, 3))  # re-logged or going back
        logged: Any = step
        odd = rng.random()
        if odd < 0.03:
            logged = True
        elif odd < 0.06:
            logged = float(step)
        elif odd < 0.08:
            logged = -step - 1
        elif odd < 0.09:
            logged = MAX_STEP + 1
        elif odd < 0.10:
            logged = [step]
        at_s += rng.random() / 100
        payload = {}
        for name in names:
            value: Any = rng.random()
            bad = rng.random()
            if bad < 0.02:
                value = math.nan
            elif bad < 0.03:
                value = math.inf
            elif bad < 0.04:
                value = "abc"
            elif bad < 0.06:
                value = _Numberish(value)
            elif bad < 0.07:
                value = 3  # an int value
            payload[name] = value
        calls.append((logged, at_s, payload))
    return calls


@pytest.mark.parametrize("seed", range(8))
def test_columnar_batches_equal_the_per_point_definition(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(150):
        calls = _random_calls(rng)
        counters = Counters()
        builder = BatchBuilder("run-1", max_points=100_000, max_bytes=1 << 30, max_age_s=60.0,
                               counters=counters)
        for step, at_s, payload in calls:
            builder.add(METRICS, step, at_s, dict(payload))
        estimate = builder.estimated_bytes
        op = builder.cut(batch_id="b", seq=0)
        series, distinct, invalid, expected_estimate = _reference(calls)
        got = [] if op is None else [(s.name, list(s.steps), list(s.values), s.timestamps)
                                     for s in op.request.series]
        assert got == series, calls
        assert estimate == expected_estimate
        raw = sum(len(payload) for _, _, payload in calls)
        hashable_raw = raw - sum(len(p) for s, _, p in calls if isinstance(s, list))
        assert counters.logged_points == hashable_raw
        assert counters.coalesced_points == hashable_raw - distinct
        assert counters.invalid_points == invalid
        assert (op is None) == (not series)
        if op is not None:
            assert op.points == sum(len(s[1]) for s in series)
