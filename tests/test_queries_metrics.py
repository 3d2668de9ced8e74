"""Series reads against real ClickHouse, both engines (the 18.16 server over HTTP and chdb 26),
with the runs in real PostgreSQL: the SQL bucketing plus the Python selection must equal the
reference implementations of tests/test_downsampling.py computed on the raw points, on the
fast path (no duplicates) and on the deduplicating path (retried, replayed and rewritten
points), and a one-point spike must survive minmax downsampling of a million points.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from test_downsampling import bucket_stats, random_series

from mlrun.server.domain.downsampling import (
    Method,
    Sample,
    plan_block_buckets,
    plan_buckets,
    select_avg,
    select_lttb,
    select_minmax,
)
from mlrun.server.errors import InvalidInput, NotFound
from mlrun.server.ports.keys import Principal
from mlrun.server.ports.metric_reads import BLOCK_STEPS, METRICS, BucketRequest, KeyRange, SeriesRef
from mlrun.server.protocols.clickhouse import METRIC_COLUMNS, MetricRow, encode_metric_rows
from mlrun.server.storage.clickhouse.client import ClickHouse
from mlrun.server.storage.clickhouse.embedded import open_embedded_clickhouse
from mlrun.server.storage.clickhouse.http_client import open_http_clickhouse
from mlrun.server.storage.clickhouse.metric_reads import MetricQueries
from mlrun.server.storage.clickhouse.migrations import apply_clickhouse_migrations
from mlrun.server.storage.postgres.client import Postgres
from mlrun.server.storage.postgres.run_reads import RunQueries
from mlrun.server.usecases.queries import Queries, SeriesRequest
from mlrun.wire.query_schemas import CompareRuns, SeriesPoint

from backends.clickhouse import ClickHouseServer

pytestmark = pytest.mark.timeout(300)

DEADLINE_S = 120
READER = Principal(key_id="reader", scopes=frozenset({"read"}))
T0_MS = 1_700_000_000_000


@pytest.fixture(params=["http", "embedded"])
async def ch(request: pytest.FixtureRequest, clickhouse_server: ClickHouseServer,
             embedded_clickhouse_dir: Path, clickhouse_database: str) -> AsyncIterator[ClickHouse]:
    client: Any
    if request.param == "http":
        client = open_http_clickhouse(
            host=clickhouse_server.host, port=clickhouse_server.port,
            user=clickhouse_server.user, password=clickhouse_server.password,
            database=clickhouse_database)
    else:
        client = open_embedded_clickhouse(data_dir=embedded_clickhouse_dir,
                                          database=clickhouse_database)
    async with client as opened:
        with anyio.fail_after(DEADLINE_S):
            await apply_clickhouse_migrations(opened)
        yield opened


@pytest.fixture
def queries(pg: Postgres, ch: ClickHouse) -> Queries:
    return Queries(RunQueries(pg), MetricQueries(ch, timeout_s=60))


def add_runs(dsn: str, run_ids: list[str], project: str = "proj") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO projects (name) VALUES (%s) ON CONFLICT DO NOTHING", (project,))
        for run_id in run_ids:
            conn.execute(
                "INSERT INTO runs (run_id, project_id, name, created_at) SELECT %s, id, %s, %s"
                " FROM projects WHERE name = %s",
                (run_id, run_id, datetime.fromtimestamp(T0_MS / 1000, UTC), project))


class Writer:
    """Inserts metric rows with increasing versions (later inserts win, as the server's)."""

    def __init__(self, ch: ClickHouse, table: str = "metrics") -> None:
        self.ch = ch
        self.table = table
        self.version = 1

    async def insert(self, run_id: str, name: str, samples: list[Sample]) -> None:
        rows: list[MetricRow] = []
        for sample in samples:
            rows.append((run_id, name, sample.key, sample.value, sample.other, self.version))
            self.version += 1
        for start in range(0, len(rows), 200_000):
            await self.ch.insert_rowbinary(self.table, METRIC_COLUMNS,
                                           encode_metric_rows(rows[start:start + 200_000]),
                                           timeout_s=DEADLINE_S)


def as_samples(points: list[SeriesPoint]) -> list[Sample]:
    return [Sample(p.step, p.value, p.timestamp) for p in points]


async def read(queries: Queries, run_id: str, name: str, method: Any, max_points: int | None,
               **extra: Any) -> Any:
    request = SeriesRequest(system=False, names=(name,), max_points=max_points,
                            start=extra.get("start"), end=extra.get("end"), method=method,
                            cursor=extra.get("cursor"))
    with anyio.fail_after(DEADLINE_S):
        result = await queries.series(READER, run_id, request)
    return result.series[0]


def assert_same_selection(got: list[Sample], expected: list[Sample]) -> None:
    """Equal keys and timestamps; values equal up to float summation order (avg's means)."""
    assert [(s.key, s.other) for s in got] == [(s.key, s.other) for s in expected]
    assert [s.value for s in got] == pytest.approx([s.value for s in expected], rel=1e-9)


def reference(samples: list[Sample], method: Method, max_points: int) -> list[Sample]:
    """The selection over the plan the server makes for a whole series (`samples`: its latest
    values): by whole blocks when it is long enough, else by points."""
    lo, hi = samples[0].key, samples[-1].key
    block_plan = plan_block_buckets(method, lo, hi, max_points, BLOCK_STEPS)
    plan = block_plan or plan_buckets(method, lo, hi, max_points)
    first, last, buckets = bucket_stats(samples, plan, method)
    buckets = [b for b in buckets if b.slot < plan.count]
    if method == "lttb":
        return select_lttb(first, last, buckets)
    if method == "avg":
        return select_avg(first, last, buckets)
    return select_minmax(first, last, buckets)


@pytest.mark.parametrize("seed", range(3))
async def test_lttb_and_minmax_equal_the_reference_on_random_series(
    queries: Queries, ch: ClickHouse, pg_dsn: str, seed: int
) -> None:
    rng = random.Random(seed)
    samples = random_series(rng, rng.randint(2_000, 20_000), sparse=bool(seed % 2))
    add_runs(pg_dsn, ["r"])
    await Writer(ch).insert("r", "loss", samples)
    for method in ("lttb", "minmax"):
        max_points = rng.randint(20, 600)
        series = await read(queries, "r", "loss", method, max_points)
        assert series.downsampled and series.total_points == len(samples)
        assert as_samples(series.points) == reference(samples, method, max_points), method
        assert len(series.points) <= max_points


async def test_duplicates_collapse_to_the_last_write_on_every_method(
    queries: Queries, ch: ClickHouse, pg_dsn: str
) -> None:
    rng = random.Random(7)
    samples = random_series(rng, 3000, sparse=False)
    add_runs(pg_dsn, ["r"])
    writer = Writer(ch)
    await writer.insert("r", "loss", samples[1500:])  # out of order
    await writer.insert("r", "loss", samples[:1500])
    await writer.insert("r", "loss", samples[:700])  # a replay
    rewritten = {s.key: Sample(s.key, s.value + 1000.0, s.other) for s in samples[2000:2100]}
    await writer.insert("r", "loss", list(rewritten.values()))  # a rewrite: the last wins
    latest = [rewritten.get(s.key, s) for s in samples]

    for method in ("lttb", "minmax"):
        series = await read(queries, "r", "loss", method, 300)
        assert series.total_points == 3000
        assert as_samples(series.points) == reference(latest, method, 300), method
    avg = await read(queries, "r", "loss", "avg", 300)
    assert avg.total_points == 3000 and len(avg.points) == 300
    raw = await read(queries, "r", "loss", "raw", 5000)
    assert as_samples(raw.points) == latest and raw.total_points == 3000
    whole = await read(queries, "r", "loss", "lttb", 5000)
    assert not whole.downsampled and as_samples(whole.points) == latest


async def test_the_fast_path_and_the_deduplicating_path_agree(ch: ClickHouse) -> None:
    rng = random.Random(11)
    samples = random_series(rng, 10_000, sparse=True)
    await Writer(ch).insert("r", "loss", samples)
    metrics = MetricQueries(ch)
    ref = SeriesRef("r", "loss")
    with anyio.fail_after(DEADLINE_S):
        stats = (await metrics.stats(METRICS, [ref], KeyRange()))[ref]
        assert not stats.has_duplicates and stats.rows == 10_000
        for method in ("lttb", "minmax", "avg"):
            plan = plan_buckets(method, stats.lo, stats.hi, 500)
            fast = await metrics.buckets(METRICS, [BucketRequest(ref, plan, method, False)])
            slow = await metrics.buckets(METRICS, [BucketRequest(ref, plan, method, True)])
            assert fast[ref].first == slow[ref].first == samples[0]
            assert fast[ref].last == slow[ref].last == samples[-1]
            assert [(b.slot, b.size, b.candidates) for b in fast[ref].buckets] == [
                (b.slot, b.size, b.candidates) for b in slow[ref].buckets]


async def test_a_one_point_spike_survives_minmax_of_a_million_points(
    queries: Queries, ch: ClickHouse, pg_dsn: str
) -> None:
    n, spike_at = 1_000_000, 777_777
    samples = [Sample(k, (k % 1000) / 1000.0, T0_MS + k) for k in range(n)]
    samples[spike_at] = Sample(spike_at, 1e9, T0_MS + spike_at)
    add_runs(pg_dsn, ["big"])
    await Writer(ch).insert("big", "loss", samples)
    series = await read(queries, "big", "loss", "minmax", 1000)
    assert series.total_points == n and len(series.points) <= 1000
    assert SeriesPoint(spike_at, 1e9, T0_MS + spike_at) in series.points
    lttb = await read(queries, "big", "loss", "lttb", 1000)
    assert SeriesPoint(spike_at, 1e9, T0_MS + spike_at) in lttb.points
    assert lttb.points[0].step == 0 and lttb.points[-1].step == n - 1


@pytest.mark.parametrize("method", ["lttb", "minmax", "avg"])
async def test_a_range_smaller_than_the_budget_and_tiny_series(
    queries: Queries, ch: ClickHouse, pg_dsn: str, method: Any
) -> None:
    add_runs(pg_dsn, ["r"])
    writer = Writer(ch)
    await writer.insert("r", "loss", [Sample(k, k * 2.0, T0_MS + k) for k in range(0, 1000, 10)])
    await writer.insert("r", "one", [Sample(5, 1.5, T0_MS)])
    window = await read(queries, "r", "loss", method, 1000, start=95, end=155)
    assert [p.step for p in window.points] == [100, 110, 120, 130, 140, 150]
    assert not window.downsampled and window.total_points == 6
    narrow = await read(queries, "r", "loss", method, 3, start=0, end=990)
    assert narrow.points[0].step == 0 and narrow.points[-1].step == 990
    assert len(narrow.points) <= 3 and narrow.total_points == 100
    one = await read(queries, "r", "one", method, 2)
    assert one.points == [SeriesPoint(5, 1.5, T0_MS)]
    empty = await read(queries, "r", "loss", method, 10, start=2000)
    assert empty.points == [] and empty.total_points == 0


async def test_raw_pages_cover_every_point_once(
    queries: Queries, ch: ClickHouse, pg_dsn: str
) -> None:
    add_runs(pg_dsn, ["r"])
    writer = Writer(ch)
    samples = [Sample(k, float(k), T0_MS + k) for k in range(2500)]
    await writer.insert("r", "loss", samples)
    await writer.insert("r", "loss", samples[100:300])  # replayed rows, deduplicated on read
    seen: list[int] = []
    cursor = None
    for _ in range(10):
        page = await read(queries, "r", "loss", "raw", 1000, cursor=cursor)
        assert page.total_points == 2500
        seen += [p.step for p in page.points]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(range(2500))
    with pytest.raises(InvalidInput) as caught:
        await read(queries, "r", "other", "raw", 1000, cursor=page.next_cursor or "x")
    assert caught.value.field == "cursor"


async def test_compare_and_project_scoped_keys(
    queries: Queries, ch: ClickHouse, pg_dsn: str
) -> None:
    add_runs(pg_dsn, ["a1", "a2"], project="alpha")
    add_runs(pg_dsn, ["b1"], project="beta")
    writer = Writer(ch)
    for run_id in ("a1", "a2", "b1"):
        await writer.insert(run_id, "loss", [Sample(k, 1.0 / (k + 1), T0_MS + k)
                                             for k in range(100)])
    with anyio.fail_after(DEADLINE_S):
        result = await queries.compare(READER, CompareRuns(run_ids=["a1", "a2", "a1"],
                                                           max_points=10))
        assert [r.run_id for r in result.runs] == ["a1", "a2"]
        assert result.common_metrics == ["loss"]
        assert all(len(r.series[0].points) <= 10 for r in result.runs)
        alpha_only = Principal(key_id="k", scopes=frozenset({"read"}), project="alpha")
        # Another project's run is exactly as invisible as a missing one (no existence oracle).
        with pytest.raises(NotFound) as compared:
            await queries.compare(alpha_only, CompareRuns(run_ids=["a1", "b1"]))
        assert (compared.value.code, compared.value.field) == ("run_not_found", "run_ids[1]")
        with pytest.raises(NotFound):
            await queries.get_run(alpha_only, "b1")
        with pytest.raises(NotFound):
            await queries.get_run(alpha_only, "zz")
        assert (await queries.get_run(alpha_only, "a1")).metrics_summary[0].count == 100


async def test_summaries_after_retries_replays_out_of_order_batches_and_rewrites(
    queries: Queries, ch: ClickHouse, pg_dsn: str
) -> None:
    add_runs(pg_dsn, ["r"])
    writer = Writer(ch)
    samples = [Sample(k, 10.0 - k * 0.01, T0_MS + k) for k in range(600)]
    await writer.insert("r", "loss", samples[300:])  # later steps first
    await writer.insert("r", "loss", samples[:300])
    await writer.insert("r", "loss", samples[100:400])  # a replay: the same rows again
    await writer.insert("r", "loss", samples[:300])  # a retry of a whole batch
    await writer.insert("r", "acc", [Sample(2, 0.5, T0_MS)])
    with anyio.fail_after(DEADLINE_S):
        detail = await queries.get_run(READER, "r")
    summary = {s.name: s for s in detail.metrics_summary}
    assert (summary["loss"].count, summary["loss"].last_step) == (600, 599)
    assert summary["loss"].last_value == pytest.approx(10.0 - 5.99)
    assert summary["loss"].min == pytest.approx(4.01) and summary["loss"].max == 10.0
    assert (summary["acc"].count, summary["acc"].last_value) == (1, 0.5)

    await writer.insert("r", "loss", [Sample(599, -1.0, T0_MS)])  # rewrite of the last step
    with anyio.fail_after(DEADLINE_S):
        rewritten = {s.name: s for s in (await queries.get_run(READER, "r")).metrics_summary}
    assert (rewritten["loss"].last_value, rewritten["loss"].count) == (-1.0, 600)
    assert rewritten["loss"].min == -1.0


async def test_a_series_rewritten_after_a_read_is_read_through_the_deduplicating_path(
    queries: Queries, ch: ClickHouse, pg_dsn: str
) -> None:
    add_runs(pg_dsn, ["r"])
    writer = Writer(ch)
    samples = [Sample(k, float(k), T0_MS + k) for k in range(300)]
    await writer.insert("r", "loss", samples)
    assert as_samples((await read(queries, "r", "loss", "raw", 1000)).points) == samples
    assert as_samples((await read(queries, "r", "loss", "minmax", 50)).points)[0] == samples[0]
    # Rewrites of known steps make their blocks dirty: the series is read through the
    # deduplicating path from then on.
    rewrites = [Sample(k, -float(k) - 1, T0_MS + k) for k in range(0, 300, 3)]
    await writer.insert("r", "loss", rewrites)
    latest = [Sample(k, -float(k) - 1, T0_MS + k) if k % 3 == 0 else s
              for k, s in enumerate(samples)]
    raw = await read(queries, "r", "loss", "raw", 1000)
    assert as_samples(raw.points) == latest and raw.total_points == 300
    minmax = await read(queries, "r", "loss", "minmax", 50)
    assert as_samples(minmax.points) == reference(latest, "minmax", 50)


async def test_long_series_are_bucketed_from_block_rollups_and_dirty_blocks_from_points(
    queries: Queries, ch: ClickHouse, pg_dsn: str
) -> None:
    rng = random.Random(5)
    samples = random_series(rng, 60_000, sparse=False)
    add_runs(pg_dsn, ["r"])
    writer = Writer(ch)
    await writer.insert("r", "loss", samples[30_000:])  # out of order batches
    await writer.insert("r", "loss", samples[:30_000])
    for method in ("lttb", "minmax", "avg"):
        assert plan_block_buckets(method, 0, 59_999, 100, BLOCK_STEPS) is not None
        series = await read(queries, "r", "loss", method, 100)
        assert series.downsampled and series.total_points == 60_000
        assert len(series.points) <= 100
        assert_same_selection(as_samples(series.points), reference(samples, method, 100))
        assert series.points[0].step == 0 and series.points[-1].step == 59_999
    # Steps written again (a spike, and the series' first and last step): their blocks are
    # dirty and computed from their points, the last write winning; the rest from rollups.
    rewrites = {0: Sample(0, -5.0, T0_MS), 12_345: Sample(12_345, 1e6, T0_MS),
                59_999: Sample(59_999, 7.0, T0_MS)}
    await writer.insert("r", "loss", list(rewrites.values()))
    latest = [rewrites.get(s.key, s) for s in samples]
    for method in ("lttb", "minmax", "avg"):
        series = await read(queries, "r", "loss", method, 100)
        assert series.total_points == 60_000 and len(series.points) <= 100
        assert_same_selection(as_samples(series.points), reference(latest, method, 100))
        assert as_samples(series.points)[0] == rewrites[0]
        assert as_samples(series.points)[-1] == rewrites[59_999]
    spike = await read(queries, "r", "loss", "minmax", 100)
    assert SeriesPoint(12_345, 1e6, T0_MS) in spike.points
    detail = await queries.get_run(READER, "r")
    assert [(s.name, s.count) for s in detail.metrics_summary] == [("loss", 60_000)]


async def test_a_step_range_is_bucketed_from_whole_block_rollups_and_its_edge_blocks(
    queries: Queries, ch: ClickHouse, pg_dsn: str
) -> None:
    """A ranged read of a long series is planned in whole blocks like a whole series: the
    blocks inside the range from their rollups, the two edge blocks (cut by the range) and
    dirty ones from their points. The answer must equal the reference over exactly the range's
    points (a point-planned read gives other buckets; one that counted the edge blocks whole
    would leak points from outside the range)."""
    rng = random.Random(11)
    samples = random_series(rng, 60_000, sparse=False)
    add_runs(pg_dsn, ["ranged"])
    writer = Writer(ch)
    await writer.insert("ranged", "loss", samples)
    ranges = [(1000, 50_000), (128 * 10, 128 * 300 - 1), (777, 59_999)]
    for start, end in ranges:
        inside = [s for s in samples if start <= s.key <= end]
        for method in ("lttb", "minmax", "avg"):
            assert plan_block_buckets(method, inside[0].key, inside[-1].key, 60,
                                      BLOCK_STEPS) is not None
            series = await read(queries, "ranged", "loss", method, 60, start=start, end=end)
            assert series.downsampled and series.total_points == len(inside)
            assert_same_selection(as_samples(series.points), reference(inside, method, 60))
            assert series.points[0].step == start and series.points[-1].step == end
    # A rewrite inside the range (a dirty block) and one just outside it (must not count).
    rewrites = {20_000: Sample(20_000, 1e6, T0_MS), 999: Sample(999, -1e6, T0_MS)}
    await writer.insert("ranged", "loss", list(rewrites.values()))
    latest = [rewrites.get(s.key, s) for s in samples if 1000 <= s.key <= 50_000]
    for method in ("lttb", "minmax", "avg"):
        series = await read(queries, "ranged", "loss", method, 60, start=1000, end=50_000)
        assert series.total_points == len(latest)
        assert_same_selection(as_samples(series.points), reference(latest, method, 60))
    spike = await read(queries, "ranged", "loss", "minmax", 60, start=1000, end=50_000)
    assert SeriesPoint(20_000, 1e6, T0_MS) in spike.points
    assert all(p.value != -1e6 for p in spike.points)


@pytest.mark.parametrize("method", ["lttb", "minmax"])
async def test_compare_of_runs_of_different_lengths_equals_the_reference_per_run(
    queries: Queries, ch: ClickHouse, pg_dsn: str, method: Any
) -> None:
    rng = random.Random(21)
    run_ids = [f"c{i}" for i in range(5)]
    add_runs(pg_dsn, run_ids)
    writer = Writer(ch)
    latest: dict[str, list[Sample]] = {}
    for index, run_id in enumerate(run_ids):
        samples = random_series(rng, 400 + 700 * index, sparse=bool(index % 2))
        await writer.insert(run_id, "loss", samples)
        if index == 3:  # one series with rewritten steps: read through the deduplicating path
            rewritten = {s.key: Sample(s.key, s.value * 2, s.other) for s in samples[::5]}
            await writer.insert(run_id, "loss", list(rewritten.values()))
            samples = [rewritten.get(s.key, s) for s in samples]
        latest[run_id] = samples
    with anyio.fail_after(DEADLINE_S):
        result = await queries.compare(READER, CompareRuns(
            run_ids=run_ids, max_points=150, method=method, alignment="absolute_time"))
    for run in result.runs:
        (series,) = run.series
        expected = latest[run.run_id]
        assert series.total_points == len(expected)
        assert as_samples(series.points) == reference(
            expected, method, 150), run.run_id


async def test_a_clean_long_series_read_again_is_not_bucketed_again_until_it_grows(
    queries: Queries, ch: ClickHouse, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block bucketings of whole, clean series are kept while the series' row count stays
    what it was: a repeated read sends ClickHouse no bucket statement and answers the same;
    new points (the count moves) are bucketed afresh and show up."""
    rng = random.Random(11)
    samples = random_series(rng, 60_000, sparse=False)
    add_runs(pg_dsn, ["r"])
    writer = Writer(ch)
    await writer.insert("r", "loss", samples[:40_000])
    bucket_statements: list[str] = []
    row_binary = ch.query_row_binary

    async def counted(sql: str, types: Any, *, timeout_s: float) -> list[list[Any]]:
        bucket_statements.append(sql)
        return await row_binary(sql, types, timeout_s=timeout_s)

    monkeypatch.setattr(ch, "query_row_binary", counted)
    for method in ("lttb", "minmax", "avg"):
        first = await read(queries, "r", "loss", method, 100)
        asked = len(bucket_statements)
        assert asked > 0 and first.total_points == 40_000
        assert_same_selection(as_samples(first.points), reference(samples[:40_000], method, 100))
        again = await read(queries, "r", "loss", method, 100)
        assert again == first and len(bucket_statements) == asked, method
    await writer.insert("r", "loss", samples[40_000:])
    for method in ("lttb", "minmax", "avg"):
        asked = len(bucket_statements)
        grown = await read(queries, "r", "loss", method, 100)
        assert len(bucket_statements) > asked and grown.total_points == 60_000
        assert_same_selection(as_samples(grown.points), reference(samples, method, 100))
        assert grown.points[-1].step == 59_999
