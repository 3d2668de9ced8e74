"""The pure downsampling module against reference implementations on random series.

The references are written here independently of `mlrun.server.domain.downsampling`: textbook LTTB
(Steinarsson's algorithm, index buckets), brute-force LTTB over an arbitrary bucket partition,
and brute-force minmax per bucket. `bucket_stats` plays ClickHouse's part (what
`storage.metric_queries` computes in SQL), so these tests pin the selection, and
tests/test_queries_metrics.py pins the SQL against the same references.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from mlrun.server.domain.downsampling import (
    FIRST_BUCKET,
    LAST_BUCKET,
    MIN_BLOCKS_PER_BUCKET,
    BlockPlan,
    Bucket,
    BucketPlan,
    LttbColumns,
    Method,
    RunsCursor,
    Sample,
    SeriesCursor,
    decode_cursor,
    encode_cursor,
    interior_buckets,
    plan_block_buckets,
    plan_buckets,
    select_avg,
    select_lttb,
    select_lttb_columns,
    select_minmax,
)
from mlrun.server.errors import InvalidInput
from mlrun.server.ports.metric_reads import BLOCK_STEPS

# --------------------------------------------------------------------------- references


def textbook_lttb(data: list[tuple[float, float]], threshold: int) -> list[int]:
    """Steinarsson's LTTB (the reference JavaScript, transcribed); returns selected indexes."""
    if threshold >= len(data) or threshold < 3:
        return list(range(len(data)))
    every = (len(data) - 2) / (threshold - 2)
    a = 0
    selected = [0]
    for i in range(threshold - 2):
        avg_start = math.floor((i + 1) * every) + 1
        avg_end = min(math.floor((i + 2) * every) + 1, len(data))
        avg_x = sum(data[j][0] for j in range(avg_start, avg_end)) / (avg_end - avg_start)
        avg_y = sum(data[j][1] for j in range(avg_start, avg_end)) / (avg_end - avg_start)
        range_offs = math.floor(i * every) + 1
        range_to = math.floor((i + 1) * every) + 1
        ax, ay = data[a]
        max_area = -1.0
        next_a = range_offs
        for j in range(range_offs, range_to):
            area = abs((ax - avg_x) * (data[j][1] - ay) - (ax - data[j][0]) * (avg_y - ay)) * 0.5
            if area > max_area:
                max_area = area
                next_a = j
        selected.append(next_a)
        a = next_a
    selected.append(len(data) - 1)
    return selected


def partition(samples: list[Sample], plan: BucketPlan | BlockPlan,
              block_steps: int = BLOCK_STEPS) -> dict[int, list[Sample]]:
    groups: dict[int, list[Sample]] = {}
    for sample in samples:
        if isinstance(plan, BlockPlan):
            index = (sample.key // block_steps - plan.first_block) // plan.group
        else:
            index = plan.index_of(sample.key)
        groups.setdefault(index, []).append(sample)
    return groups


def bucket_stats(samples: list[Sample], plan: BucketPlan | BlockPlan, method: Method,
                 *, all_candidates: bool = False) -> tuple[Sample, Sample | None, list[Bucket]]:
    """What the ClickHouse bucket query returns, computed by brute force. Under a block plan
    the first and last point are inside the first and last bucket (blocks are not split)."""
    groups = partition(samples, plan)
    if isinstance(plan, BlockPlan):
        first = min(samples)
        last = max(samples) if len(samples) > 1 else None
    else:
        first = groups[FIRST_BUCKET][0]
        last = groups[LAST_BUCKET][0] if LAST_BUCKET in groups else None
    buckets = []
    for index, members in sorted(groups.items()):
        if index < 0:
            continue
        members.sort()
        low = min(members, key=lambda s: (s.value, s.key))
        high = max(members, key=lambda s: (s.value, -s.key))
        if all_candidates:
            candidates = tuple(members)
        elif method == "minmax":
            candidates = (members[0], low, high, members[-1])
        else:
            candidates = tuple(sorted({low, high}))
        n = len(members)
        buckets.append(Bucket(
            slot=index, size=n,
            mean_key=sum(s.key for s in members) / n,
            mean_value=sum(s.value for s in members) / n,
            mean_other=sum(s.other for s in members) / n,
            candidates=candidates,
        ))
    return first, last, buckets


def reference_lttb_over_partition(
    samples: list[Sample], groups: list[list[Sample]]
) -> list[Sample]:
    """LTTB where bucket i is groups[i] (every point a candidate), first/last kept apart."""
    first, last = samples[0], samples[-1]
    chosen = [first]
    a = first
    for i, group in enumerate(groups):
        if i + 1 < len(groups):
            nxt = groups[i + 1]
            cx = sum(s.key for s in nxt) / len(nxt)
            cy = sum(s.value for s in nxt) / len(nxt)
        else:
            cx, cy = float(last.key), last.value
        best = max(group, key=lambda p: (
            abs((a.key - cx) * (p.value - a.value) - (a.key - p.key) * (cy - a.value)) * 0.5,
            -p.key))
        chosen.append(best)
        a = best
    chosen.append(last)
    return chosen


def random_series(rng: random.Random, n: int, *, sparse: bool) -> list[Sample]:
    keys = sorted(rng.sample(range(n * 5), n)) if sparse else list(range(n))
    value = 0.0
    samples = []
    for key in keys:
        value += rng.gauss(0, 1)
        samples.append(Sample(key, value, 1_700_000_000_000 + key * 10))
    return samples


# --------------------------------------------------------------------------- plans


@pytest.mark.parametrize("method", ["lttb", "minmax", "avg"])
@pytest.mark.parametrize(("lo", "hi", "max_points"), [
    (0, 0, 10), (0, 1, 10), (0, 2, 10), (5, 9, 1000), (0, 999_999, 1000), (0, 10, 2),
    (0, 10, 3), (100, 100_000, 7), (-50, 50, 11), (0, 300_000, 1000),
])
def test_plans_never_divide_by_zero_and_cover_the_interior(
    method: Method, lo: int, hi: int, max_points: int
) -> None:
    plan = plan_buckets(method, lo, hi, max_points)
    assert plan.count <= interior_buckets(method, max_points)
    interior = range(lo + 1, hi)
    if plan.count == 0:
        assert len(interior) == 0 or interior_buckets(method, max_points) == 0
        return
    indexes = [plan.index_of(k) for k in interior]
    assert indexes == sorted(indexes)  # buckets are consecutive key ranges
    assert set(indexes) == set(range(plan.count))  # none empty on dense keys
    assert plan.index_of(lo) == FIRST_BUCKET
    assert plan.index_of(hi) == LAST_BUCKET


def test_a_range_smaller_than_the_budget_gets_one_key_per_bucket() -> None:
    plan = plan_buckets("avg", 0, 9, 1000)
    assert plan.count == 8
    assert [plan.index_of(k) for k in range(10)] == [-1, 0, 1, 2, 3, 4, 5, 6, 7, -2]


def test_buckets_fill_the_budget_and_huge_spans_fall_back_to_a_fixed_width() -> None:
    plan = plan_buckets("avg", 0, 2999, 300)
    assert plan.count == 298
    assert {plan.index_of(k) for k in range(1, 2999)} == set(range(298))
    huge = plan_buckets("lttb", 0, 2**62, 100_000)
    assert huge.width > 0 and huge.count <= interior_buckets("lttb", 100_000)
    assert huge.index_of(2**62 - 1) == huge.count - 1 and huge.index_of(1) == 0


@pytest.mark.parametrize("method", ["lttb", "minmax", "avg"])
@pytest.mark.parametrize(("lo", "hi", "max_points"), [
    (0, 999_999, 1000), (0, 999_999, 7), (5, 3_000_000, 10_000), (77, 90_000, 20),
    (0, 127, 2), (0, 400_000, 1000), (0, 10_000, 500),
])
def test_block_plans_stay_within_budget_with_whole_blocks_per_bucket(
    method: Method, lo: int, hi: int, max_points: int
) -> None:
    plan = plan_block_buckets(method, lo, hi, max_points, BLOCK_STEPS)
    wanted = interior_buckets(method, max_points)
    blocks = hi // BLOCK_STEPS - lo // BLOCK_STEPS + 1
    if wanted == 0 or blocks <= (MIN_BLOCKS_PER_BUCKET - 1) * wanted:
        # Too short for 4 whole blocks per bucket (or no interior bucket): points instead.
        assert plan is None
        return
    assert plan is not None
    assert plan.group >= MIN_BLOCKS_PER_BUCKET
    assert plan.count <= wanted
    assert plan.count * 4 >= wanted * 3  # at least 3/4 of the budget's buckets
    buckets = {(k // BLOCK_STEPS - plan.first_block) // plan.group
               for k in (lo, hi, (lo + hi) // 2)}
    assert min(buckets) == 0 and max(buckets) == plan.count - 1


def test_short_ranges_get_no_block_plan() -> None:
    assert plan_block_buckets("lttb", 0, 10_000, 500, BLOCK_STEPS) is None  # 20 steps a bucket
    assert plan_block_buckets("lttb", 0, 999_999, 2, BLOCK_STEPS) is None  # no interior bucket
    plan = plan_block_buckets("lttb", 0, 999_999, 1000, BLOCK_STEPS)
    assert plan == BlockPlan(first_block=0, last_block=7812, group=8)


# --------------------------------------------------------------------------- LTTB


def as_columns(buckets: list[Bucket]) -> LttbColumns:
    lows = [min(b.candidates, key=lambda c: c.value) for b in buckets]
    highs = [max(b.candidates, key=lambda c: c.value) for b in buckets]
    return LttbColumns(
        slots=[b.slot for b in buckets], sizes=[b.size for b in buckets],
        mean_keys=[b.mean_key for b in buckets], mean_values=[b.mean_value for b in buckets],
        low_keys=[c.key for c in lows], low_values=[c.value for c in lows],
        low_others=[c.other for c in lows], high_keys=[c.key for c in highs],
        high_values=[c.value for c in highs], high_others=[c.other for c in highs])


@pytest.mark.parametrize("seed", range(8))
def test_columnar_lttb_selects_exactly_what_lttb_over_buckets_does(seed: int) -> None:
    rng = random.Random(seed)
    samples = random_series(rng, rng.randint(50, 5000), sparse=bool(seed % 2))
    if seed % 4 == 3:
        # Plateaus: equal values make low and high tie, and areas tie.
        samples = [Sample(s.key, float(round(s.value)), s.other) for s in samples]
    max_points = rng.randint(3, 400)
    for plan in (plan_buckets("lttb", samples[0].key, samples[-1].key, max_points),
                 plan_block_buckets("lttb", samples[0].key, samples[-1].key, max_points, 16)):
        if plan is None:
            continue
        if isinstance(plan, BlockPlan):
            groups = partition(samples, plan, block_steps=16)
            first, last = samples[0], samples[-1]
            buckets = []
            for index, members in sorted(groups.items()):
                low = min(members, key=lambda s: (s.value, s.key))
                high = max(members, key=lambda s: (s.value, -s.key))
                n = len(members)
                buckets.append(Bucket(index, n, sum(m.key for m in members) / n,
                                      sum(m.value for m in members) / n, 0.0,
                                      tuple(sorted({low, high}))))
        else:
            first, last, buckets = bucket_stats(samples, plan, "lttb")
        expected = select_lttb(first, last, [b for b in buckets if b.slot < plan.count])
        assert select_lttb_columns(first, last, as_columns(buckets), plan.count) == expected




@pytest.mark.parametrize("seed", range(8))
def test_lttb_with_every_point_a_candidate_is_textbook_lttb(seed: int) -> None:
    rng = random.Random(seed)
    threshold = rng.randint(3, 60)
    per_bucket = rng.randint(1, 40)
    n = (threshold - 2) * per_bucket + 2  # index buckets and key buckets then coincide
    samples = random_series(rng, n, sparse=False)
    plan = plan_buckets("avg", samples[0].key, samples[-1].key, threshold)
    assert plan.count == threshold - 2
    first, last, buckets = bucket_stats(samples, plan, "avg", all_candidates=True)

    selected = select_lttb(first, last, buckets)

    expected = [samples[i] for i in textbook_lttb([(s.key, s.value) for s in samples], threshold)]
    assert selected == expected


@pytest.mark.parametrize("seed", range(8))
def test_lttb_on_sparse_keys_matches_brute_force_over_the_same_buckets(seed: int) -> None:
    rng = random.Random(100 + seed)
    samples = random_series(rng, rng.randint(50, 3000), sparse=True)
    max_points = rng.randint(3, 200)
    plan = plan_buckets("avg", samples[0].key, samples[-1].key, max_points)
    groups = partition(samples, plan)
    first, last, buckets = bucket_stats(samples, plan, "avg", all_candidates=True)

    selected = select_lttb(first, last, buckets)

    interior = [sorted(groups[i]) for i in sorted(groups) if i >= 0]
    assert selected == reference_lttb_over_partition(samples, interior)
    assert len(selected) <= max_points


@pytest.mark.parametrize("seed", range(6))
def test_minmax_lttb_keeps_first_last_and_stays_within_budget(seed: int) -> None:
    rng = random.Random(200 + seed)
    samples = random_series(rng, rng.randint(10, 20_000), sparse=bool(seed % 2))
    max_points = rng.randint(3, 500)
    plan = plan_buckets("lttb", samples[0].key, samples[-1].key, max_points)
    first, last, buckets = bucket_stats(samples, plan, "lttb")

    selected = select_lttb(first, last, buckets)

    stored = set(samples)
    assert selected[0] == samples[0] and selected[-1] == samples[-1]
    assert all(s in stored for s in selected)
    assert len(selected) <= max_points
    assert all(a.key < b.key for a, b in itertools.pairwise(selected))


def test_lttb_of_a_single_point_and_of_two_points() -> None:
    one = Sample(5, 1.0, 0)
    assert select_lttb(one, one, []) == [one]
    two = Sample(9, 2.0, 0)
    assert select_lttb(one, two, []) == [one, two]


# --------------------------------------------------------------------------- minmax and avg


@pytest.mark.parametrize("seed", range(8))
def test_minmax_matches_brute_force_first_min_max_last_per_bucket(seed: int) -> None:
    rng = random.Random(300 + seed)
    samples = random_series(rng, rng.randint(20, 5000), sparse=bool(seed % 2))
    max_points = rng.randint(6, 400)
    plan = plan_buckets("minmax", samples[0].key, samples[-1].key, max_points)
    first, last, buckets = bucket_stats(samples, plan, "minmax")

    selected = select_minmax(first, last, buckets)

    expected = {samples[0], samples[-1]}
    for index, members in partition(samples, plan).items():
        if index >= 0:
            expected |= {min(members), max(members),
                         min(members, key=lambda s: s.value), max(members, key=lambda s: s.value)}
    assert selected == sorted(expected)
    assert len(selected) <= max_points


def test_a_one_point_spike_survives_minmax_of_a_million_points() -> None:
    n = 1_000_000
    spike_at = 654_321
    samples = [Sample(k, math.sin(k / 1000) + (1e6 if k == spike_at else 0.0), k) for k in
               range(n)]
    plan = plan_buckets("minmax", 0, n - 1, 1000)
    first, last, buckets = bucket_stats(samples, plan, "minmax")

    selected = select_minmax(first, last, buckets)

    assert len(selected) <= 1000
    assert samples[spike_at] in selected


@pytest.mark.parametrize("seed", range(4))
def test_avg_is_the_mean_per_bucket(seed: int) -> None:
    rng = random.Random(400 + seed)
    samples = random_series(rng, rng.randint(20, 5000), sparse=bool(seed % 2))
    max_points = rng.randint(3, 300)
    plan = plan_buckets("avg", samples[0].key, samples[-1].key, max_points)
    first, last, buckets = bucket_stats(samples, plan, "avg")

    selected = select_avg(first, last, buckets)

    groups = partition(samples, plan)
    interior = [groups[i] for i in sorted(groups) if i >= 0]
    assert len(selected) == len(interior) + 2 <= max_points
    for point, members in zip(selected[1:-1], interior, strict=True):
        assert point.value == pytest.approx(sum(s.value for s in members) / len(members))
        assert members[0].key <= point.key <= members[-1].key


# --------------------------------------------------------------------------- cursors


def test_cursors_round_trip_and_reject_anything_else() -> None:
    position = RunsCursor(sort="-created_at", value="2024-01-01T00:00:00.000001+00:00",
                          run_id="r-1")
    assert decode_cursor(encode_cursor(position), RunsCursor) == position
    series = SeriesCursor(name="loss/ä,x", after_key=2**62)
    assert decode_cursor(encode_cursor(series), SeriesCursor) == series
    for bad in ["", "!!!", "e30", encode_cursor(series)[:-3], "é", "x" * 5000]:
        with pytest.raises(InvalidInput) as caught:
            decode_cursor(bad, RunsCursor)
        assert caught.value.field == "cursor"
    with pytest.raises(InvalidInput):
        decode_cursor(encode_cursor(series), RunsCursor)
