"""The write path stores exactly what a Python reference says, on ClickHouse 18.16 and chdb.

Random batches go through the real in-process write path (`ClickHouseWritePath`: group commit,
RowBinary, one INSERT per group of concurrent batches, the schema's views) with what happens to
batches in production: retries (the same rows, same versions, again), replays of an old batch
long after, batches admitted in one order and committed in another, and steps logged again by a
later batch (new versions, new values). Then every read surface is compared with the reference
computed here from the rows sent:

- summaries (`MetricQueries.summaries`): min/max over every value ever written (a replaced one
  included), last = the value at the highest (step, version), last_step, count = distinct steps;
- block rollups (`MetricQueries.block_stats`): rows ever written (duplicates included), distinct
  steps, first/last step, and exactly the dirty blocks (a step written more than once);
- series (`Queries.series`): raw = one point per step, the highest version's (last write wins);
  minmax and lttb = the reference selection of tests/test_queries_metrics.py over those points
  (so a one-point spike is kept).

This is the guarantee the schema's cheaper summary view (sql/clickhouse/0003) must keep.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from test_queries_metrics import add_runs, as_samples, assert_same_selection, read, reference

from mlrun.server.domain.downsampling import Sample
from mlrun.server.pipelines.clickhouse_write_path import ClickHouseWritePath
from mlrun.server.ports.metric_reads import BLOCK_STEPS, BlockStats, SeriesRef
from mlrun.server.ports.write_path import (
    EMPTY_COLUMNS,
    BatchIdentity,
    BatchWrite,
    PointColumns,
)
from mlrun.server.storage.clickhouse import migrations as clickhouse_migrations
from mlrun.server.storage.clickhouse.client import ClickHouse
from mlrun.server.storage.clickhouse.embedded import open_embedded_clickhouse
from mlrun.server.storage.clickhouse.http_client import open_http_clickhouse
from mlrun.server.storage.clickhouse.metric_reads import MetricQueries
from mlrun.server.storage.clickhouse.migrations import apply_clickhouse_migrations
from mlrun.server.storage.migrations import load_migrations
from mlrun.server.storage.postgres.client import Postgres
from mlrun.server.storage.postgres.run_reads import RunQueries
from mlrun.server.usecases.queries import Queries

from backends.clickhouse import ClickHouseServer

pytestmark = pytest.mark.timeout(300)

DEADLINE_S = 120
T0_MS = 1_700_000_000_000
RUNS = ("eq-a", "eq-b")
NAMES = ("loss", "acc", "grad/norm")


Opener = Callable[[str], AbstractAsyncContextManager[ClickHouse]]


@pytest.fixture(params=["http", "embedded"])
def open_ch(request: pytest.FixtureRequest, clickhouse_server: ClickHouseServer,
            embedded_clickhouse_dir: Path) -> Opener:
    """Opens a database by name on the 18.16 server (`http`) or chdb (`embedded`)."""
    def opener(database: str) -> AbstractAsyncContextManager[ClickHouse]:
        if request.param == "http":
            return open_http_clickhouse(
                host=clickhouse_server.host, port=clickhouse_server.port,
                user=clickhouse_server.user, password=clickhouse_server.password,
                database=database)
        return open_embedded_clickhouse(data_dir=embedded_clickhouse_dir, database=database)

    return opener


@pytest.fixture
async def ch(open_ch: Opener, clickhouse_database: str) -> AsyncIterator[ClickHouse]:
    async with open_ch(clickhouse_database) as opened:
        with anyio.fail_after(DEADLINE_S):
            await apply_clickhouse_migrations(opened)
        yield opened


class _NoLedger:
    """The batches here carry no batch_id, so no ledger row is ever marked."""

    async def mark_batches_committed(self, batches: Iterable[tuple[str, str | None]]) -> None:
        raise AssertionError(f"no batch of this test has a ledger row: {list(batches)}")


@dataclass(frozen=True)
class Row:
    name: str
    step: int
    value: float
    timestamp_ms: int
    version: int


def write_of(run_id: str, rows: list[Row]) -> BatchWrite:
    columns = PointColumns(names=[r.name for r in rows], steps=[r.step for r in rows],
                           values=[r.value for r in rows],
                           timestamps_ms=[r.timestamp_ms for r in rows],
                           versions=[r.version for r in rows])
    return BatchWrite(BatchIdentity(run_id, None, rows[0].version), columns, EMPTY_COLUMNS)


def random_batches(rng: random.Random) -> list[tuple[str, list[Row]]]:
    """Batches with versions assigned in admission order, as the server does: mostly new steps
    in order, some re-logging earlier steps (resumed from a checkpoint) with new values, with
    rare spikes; steps sparse enough to span several blocks."""
    batches: list[tuple[str, list[Row]]] = []
    next_step = dict.fromkeys(RUNS, 0)
    version = 1
    for _ in range(60):
        run_id = rng.choice(RUNS)
        if next_step[run_id] and rng.random() < 0.2:
            start = rng.randrange(0, next_step[run_id])  # re-logged steps
        else:
            start = next_step[run_id]
        stride = rng.choice((1, 1, 3))
        steps = [start + i * stride for i in range(rng.randint(20, 300))]
        next_step[run_id] = max(next_step[run_id], steps[-1] + 1)
        rows = []
        for step in steps:
            for name in rng.sample(NAMES, rng.randint(1, len(NAMES))):
                value = rng.gauss(0, 1) * (1000 if rng.random() < 0.003 else 1)
                rows.append(Row(name, step, round(value, 6), T0_MS + step * 10, version))
                version += 1
        batches.append((run_id, rows))
    return batches


def deliveries(rng: random.Random, batches: list[tuple[str, list[Row]]]
               ) -> list[list[tuple[str, list[Row]]]]:
    """Rounds of concurrent submissions: admission order shuffled within a round (committed
    out of order), some batches retried in the same round or replayed rounds later."""
    rounds: list[list[tuple[str, list[Row]]]] = []
    replays: list[tuple[str, list[Row]]] = []
    for start in range(0, len(batches), 6):
        group = list(batches[start:start + 6])
        group += [b for b in group if rng.random() < 0.3]  # retries
        if replays and rng.random() < 0.5:
            group.append(replays.pop(rng.randrange(len(replays))))  # a late replay
        replays += [b for b in group if rng.random() < 0.2]
        rng.shuffle(group)
        rounds.append(group)
    rounds.append(replays)
    return rounds


async def deliver(ch: ClickHouse, rounds: list[list[tuple[str, list[Row]]]]) -> None:
    path = ClickHouseWritePath(ch, _NoLedger(), max_rows=1_000_000, max_bytes=256 << 20)
    async with anyio.create_task_group() as tg:
        await tg.start(path.serve)
        for group in rounds:
            durabilities = []
            for run_id, rows in group:
                write = write_of(run_id, rows)
                reservation = path.reserve_nowait(run_id, write.metrics, write.system_metrics)
                durabilities.append(reservation.submit_nowait(write))
            for durability in durabilities:
                await durability.wait(DEADLINE_S)
        path.close()


@dataclass
class Reference:
    written: dict[SeriesRef, list[Row]]  # every row that reached storage, duplicates included

    def latest(self, ref: SeriesRef) -> list[Sample]:
        winners: dict[int, Row] = {}
        for row in self.written[ref]:
            if row.step not in winners or row.version > winners[row.step].version:
                winners[row.step] = row
        return [Sample(s, winners[s].value, winners[s].timestamp_ms) for s in sorted(winners)]

    def summary(self, ref: SeriesRef) -> tuple[float, float, float, int, int]:
        rows = self.written[ref]
        last = max(rows, key=lambda r: (r.step, r.version))
        return (min(r.value for r in rows), max(r.value for r in rows), last.value, last.step,
                len({r.step for r in rows}))

    def blocks(self, ref: SeriesRef) -> BlockStats:
        rows = self.written[ref]
        per_block: dict[int, list[int]] = {}
        for row in rows:
            per_block.setdefault(row.step // BLOCK_STEPS, []).append(row.step)
        dirty = tuple(sorted(b for b, steps in per_block.items() if len(steps) > len(set(steps))))
        steps = {r.step for r in rows}
        return BlockStats(rows=len(rows), distinct=len(steps), lo=min(steps), hi=max(steps),
                          dirty=dirty)


def reference_of(rounds: list[list[tuple[str, list[Row]]]]) -> Reference:
    written: dict[SeriesRef, list[Row]] = {}
    for group in rounds:
        for run_id, rows in group:
            for row in rows:
                written.setdefault(SeriesRef(run_id, row.name), []).append(row)
    return Reference(written)


@pytest.mark.parametrize("seed", [1, 2])
async def test_summaries_rollups_and_series_equal_the_python_reference(
    ch: ClickHouse, pg: Postgres, pg_dsn: str, clickhouse_database: str, seed: int
) -> None:
    rng = random.Random(seed)
    run_ids = [f"{run_id}-{seed}" for run_id in RUNS]
    batches = [(f"{run_id}-{seed}", rows) for run_id, rows in random_batches(rng)]
    rounds = deliveries(rng, batches)
    expected = reference_of(rounds)
    assert any(stats.dirty for stats in map(expected.blocks, expected.written))  # re-logged
    add_runs(pg_dsn, run_ids, project=f"eq-{clickhouse_database}-{seed}")
    metric_reads = MetricQueries(ch, timeout_s=60)
    queries = Queries(RunQueries(pg), metric_reads)
    with anyio.fail_after(DEADLINE_S):
        await deliver(ch, rounds)
        summaries = await metric_reads.summaries(run_ids)
        blocks = await metric_reads.block_stats(run_ids, None)

    assert {SeriesRef(s.run_id, s.name): (s.min_value, s.max_value, s.last_value, s.last_step,
                                          s.count) for s in summaries} == {
        ref: expected.summary(ref) for ref in expected.written}
    assert blocks == {ref: expected.blocks(ref) for ref in expected.written}
    for ref in expected.written:
        latest = expected.latest(ref)
        raw = await read(queries, ref.run_id, ref.name, "raw", 100_000)
        assert as_samples(raw.points) == latest and raw.total_points == len(latest)
        for method in ("minmax", "lttb"):
            got = await read(queries, ref.run_id, ref.name, method, 60)
            assert_same_selection(as_samples(got.points), reference(latest, method, 60))
        spike = max(latest, key=lambda s: abs(s.value))
        minmax = as_samples((await read(queries, ref.run_id, ref.name, "minmax", 12)).points)
        assert spike in minmax


async def test_summaries_stay_exact_across_the_upgrade_to_the_cheaper_summary_view(
    open_ch: Opener, clickhouse_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Points written under 0001+0002 (the view with the step set), then 0003 applied (both
    views live for a moment, then only the new one), then more points, retries and re-logged
    steps: the summaries and rollups still equal the reference over everything written."""
    rng = random.Random(7)
    batches = [(f"up-{run_id}", rows) for run_id, rows in random_batches(rng)]
    rounds = deliveries(rng, batches)
    half = len(rounds) // 2
    everything = load_migrations("clickhouse")
    older = tuple(m for m in everything if m.version < 3)
    async with open_ch(f"{clickhouse_database}_upgrade") as fresh:
        with anyio.fail_after(DEADLINE_S):
            monkeypatch.setattr(clickhouse_migrations, "load_migrations", lambda engine: older)
            await apply_clickhouse_migrations(fresh)
            await deliver(fresh, rounds[:half])
            monkeypatch.setattr(clickhouse_migrations, "load_migrations",
                                lambda engine: everything)
            assert await apply_clickhouse_migrations(fresh) == [
                m.version for m in everything if m.version >= 3]
            await deliver(fresh, rounds[half:])
            reads = MetricQueries(fresh, timeout_s=60)
            run_ids = sorted({ref.run_id for ref in reference_of(rounds).written})
            summaries = await reads.summaries(run_ids)
            blocks = await reads.block_stats(run_ids, None)
    expected = reference_of(rounds)
    assert {SeriesRef(s.run_id, s.name): (s.min_value, s.max_value, s.last_value, s.last_step,
                                          s.count) for s in summaries} == {
        ref: expected.summary(ref) for ref in expected.written}
    assert blocks == {ref: expected.blocks(ref) for ref in expected.written}
