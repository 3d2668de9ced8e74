"""The ClickHouse side of the data lifecycle (`storage.clickhouse.lifecycle`) against both real
engines: the 18.16 server over HTTP and chdb in-process, each in a fresh database, seeded with
`INSERT ... SELECT` from `system.numbers` (the views fill summaries and block rollups).

What must hold on both: deleting runs empties every table of them and leaves other runs alone;
expired months are found, their runs listed and their partitions dropped; rollups deleted and
rebuilt describe exactly the points left (summaries and the block rollups' distinct counts).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from mlrun.server.storage.clickhouse.client import ClickHouse
from mlrun.server.storage.clickhouse.embedded import open_embedded_clickhouse
from mlrun.server.storage.clickhouse.http_client import open_http_clickhouse
from mlrun.server.storage.clickhouse.lifecycle import ClickHouseLifecycle
from mlrun.server.storage.clickhouse.metric_reads import MetricQueries
from mlrun.server.storage.clickhouse.migrations import apply_clickhouse_migrations

from backends.clickhouse import ClickHouseServer

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 30.0
JAN_2020_MS = int(datetime(2020, 1, 10, tzinfo=UTC).timestamp() * 1000)
NOW_MS = int(datetime.now(UTC).timestamp() * 1000)


@pytest.fixture(params=["http", "embedded"])
async def ch(request: pytest.FixtureRequest, clickhouse_server: ClickHouseServer,
             embedded_clickhouse_dir: Path, clickhouse_database: str
             ) -> AsyncIterator[ClickHouse]:
    opened = (open_http_clickhouse(host=clickhouse_server.host, port=clickhouse_server.port,
                                   user=clickhouse_server.user,
                                   password=clickhouse_server.password,
                                   database=clickhouse_database)
              if request.param == "http" else
              open_embedded_clickhouse(data_dir=embedded_clickhouse_dir,
                                       database=clickhouse_database))
    async with opened as client:
        with anyio.fail_after(TIMEOUT_S):
            await apply_clickhouse_migrations(client)
        yield client


async def seed(ch: ClickHouse, run_id: str, *, first_step: int, steps: int, ts_ms: int) -> None:
    for table in ("metrics", "system_metrics"):
        await ch.execute(
            f"INSERT INTO {table} (run_id, name, step, value, timestamp_ms, version)"
            f" SELECT '{run_id}', 'loss', number + {first_step}, toFloat64(number % 100),"
            f" {ts_ms} + number, number + 1 FROM system.numbers LIMIT {steps}",
            timeout_s=TIMEOUT_S)


async def eventually_zero(count: Callable[[], Awaitable[int]]) -> None:
    with anyio.fail_after(TIMEOUT_S):
        while True:
            if await count() == 0:
                return
            await anyio.sleep(0.05)  # a mutation has no completion event; bounded by the deadline


async def test_delete_runs_retention_and_rebuild_on_both_engines(ch: ClickHouse) -> None:
    lifecycle = ClickHouseLifecycle(ch, timeout_s=TIMEOUT_S)
    reads = MetricQueries(ch, timeout_s=TIMEOUT_S)
    await seed(ch, "gone", first_step=0, steps=5000, ts_ms=NOW_MS)
    await seed(ch, "kept", first_step=0, steps=5000, ts_ms=NOW_MS)
    await seed(ch, "split", first_step=0, steps=1000, ts_ms=JAN_2020_MS)
    await seed(ch, "split", first_step=1000, steps=1000, ts_ms=NOW_MS)
    await seed(ch, "old", first_step=0, steps=300, ts_ms=JAN_2020_MS)
    assert await lifecycle.count_points(["gone"]) == 10_000

    # Deleting a run: every table, nothing of the others.
    await lifecycle.delete_runs(["gone"])
    await eventually_zero(lambda: lifecycle.remaining_rows(["gone"]))
    await eventually_zero(lifecycle.busy_mutations)
    assert await lifecycle.count_points(["kept"]) == 10_000
    assert [s.count for s in await reads.summaries(["kept"])] == [5000]
    assert await reads.summaries(["gone"]) == []

    # Retention: the January 2020 partition, its runs, then rollups rebuilt without it.
    assert await lifecycle.expired_partitions(before_month=202001) == []
    assert await lifecycle.expired_partitions(before_month=202006) == [202001]
    run_ids = await lifecycle.runs_in_partition(202001)
    assert run_ids == ["old", "split"]
    await lifecycle.delete_rollups(run_ids)
    await eventually_zero(lambda: lifecycle.remaining_rollups(run_ids))
    await lifecycle.drop_partition(202001)
    await lifecycle.drop_partition(202001)  # again: a no-op
    await lifecycle.rebuild_rollups(run_ids)
    assert await lifecycle.expired_partitions(before_month=202006) == []
    assert await lifecycle.count_points(["old"]) == 0
    assert await lifecycle.remaining_rows(["old"]) == 0
    (split,) = await reads.summaries(["split"])
    assert (split.count, split.last_step, split.min_value, split.max_value) == (
        1000, 1999, 0.0, 99.0)
    stats = (await reads.block_stats(["split"], ["loss"]))
    assert [(s.distinct, s.lo, s.hi, s.dirty) for s in stats.values()] == [
        (1000, 1000, 1999, ())]
    assert [s.count for s in await reads.summaries(["kept"])] == [5000]
