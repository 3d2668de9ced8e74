"""ClickHouse storage against both real engines: the 18.16 server over HTTP and chdb in-process.

Every test runs once per engine (the `ch` fixture), each in a fresh database; schema, inserts,
last-write-wins, summaries and error translation must agree on both. Server-only behaviour
(a stopped or frozen process) uses the session server's stop/start and freeze/thaw and always
restores it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio
import pytest

from mlrun.server.errors import BackendError, BackendTimeout, BackendUnavailable, ConfigError
from mlrun.server.ports.metric_reads import BLOCK_STEPS, SeriesRef
from mlrun.server.protocols.clickhouse import (
    METRIC_COLUMNS,
    MetricRow,
    encode_metric_block,
    encode_metric_rows,
    quote_string,
)
from mlrun.server.storage.clickhouse.bucket_sql import popcount_sql
from mlrun.server.storage.clickhouse.client import ClickHouse
from mlrun.server.storage.clickhouse.embedded import open_embedded_clickhouse
from mlrun.server.storage.clickhouse.http_client import open_http_clickhouse
from mlrun.server.storage.clickhouse.metric_reads import MetricQueries
from mlrun.server.storage.clickhouse.migrations import apply_clickhouse_migrations
from mlrun.server.storage.migrations import load_migrations

from backends.clickhouse import ClickHouseServer

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 30.0
SCHEMA_VERSIONS = [m.version for m in load_migrations("clickhouse")]


def open_engine(
    kind: str, server: ClickHouseServer, chdb_dir: Path, database: str
) -> AbstractAsyncContextManager[ClickHouse]:
    if kind == "http":
        return open_http_clickhouse(
            host=server.host,
            port=server.port,
            user=server.user,
            password=server.password,
            database=database,
        )
    return open_embedded_clickhouse(data_dir=chdb_dir, database=database)


@pytest.fixture(params=["http", "embedded"])
async def ch(
    request: pytest.FixtureRequest,
    clickhouse_server: ClickHouseServer,
    embedded_clickhouse_dir: Path,
    clickhouse_database: str,
) -> AsyncIterator[ClickHouse]:
    async with open_engine(
        request.param, clickhouse_server, embedded_clickhouse_dir, clickhouse_database
    ) as client:
        yield client


@pytest.fixture
async def migrated(ch: ClickHouse) -> ClickHouse:
    with anyio.fail_after(TIMEOUT_S):
        await apply_clickhouse_migrations(ch)
    return ch


async def insert_metrics(ch: ClickHouse, rows: list[MetricRow]) -> None:
    await ch.insert_rowbinary(
        "metrics", METRIC_COLUMNS, encode_metric_rows(rows), timeout_s=TIMEOUT_S
    )


async def summary(ch: ClickHouse, run_id: str) -> dict[str, dict[str, object]]:
    """min/max/last from the summary, distinct steps from the block rollups (what reads use:
    the summary's own step set is no longer kept, sql/clickhouse/0003)."""
    rows = await ch.query_rows(
        "SELECT name, minMerge(min_value) AS min, maxMerge(max_value) AS max,"
        " argMaxMerge(last_value) AS last, maxMerge(last_step) AS last_step"
        f" FROM metrics_summary WHERE run_id = {quote_string(run_id)} GROUP BY name",
        timeout_s=TIMEOUT_S,
    )
    steps = await ch.query_rows(
        f"SELECT name, sum({popcount_sql('low')} + {popcount_sql('high')}) AS steps FROM"
        " (SELECT name, block, groupBitOrMerge(steps_low) AS low,"
        " groupBitOrMerge(steps_high) AS high FROM metric_blocks"
        f" WHERE run_id = {quote_string(run_id)} GROUP BY name, block) GROUP BY name",
        timeout_s=TIMEOUT_S,
    )
    counts = {str(row["name"]): int(row["steps"]) for row in steps}
    by_name = {str(row.pop("name")): row for row in rows}
    return {name: {**row, "steps": counts.get(name, 0)} for name, row in by_name.items()}


# ---------------------------------------------------------------- migrations


async def test_migrations_apply_on_empty_database_then_nothing(ch: ClickHouse) -> None:
    with anyio.fail_after(TIMEOUT_S):
        assert await apply_clickhouse_migrations(ch) == SCHEMA_VERSIONS
        tables = await ch.query_rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase()",
            timeout_s=TIMEOUT_S,
        )
        assert {row["name"] for row in tables} >= {
            "metrics",
            "metrics_summary",
            "metrics_summary_mv2",
            "metric_blocks",
            "metric_blocks_mv",
            "system_metrics",
            "schema_migrations",
        }
        assert await apply_clickhouse_migrations(ch) == []
        ledger = await ch.query_rows(
            "SELECT version, count() AS n FROM schema_migrations GROUP BY version ORDER BY version",
            timeout_s=TIMEOUT_S,
        )
        assert ledger == [{"version": v, "n": 1} for v in SCHEMA_VERSIONS]


async def test_concurrent_appliers_with_a_shared_lock_record_each_version_once(
    ch: ClickHouse,
    request: pytest.FixtureRequest,
    clickhouse_server: ClickHouseServer,
    embedded_clickhouse_dir: Path,
) -> None:
    kind = request.node.callspec.params["ch"]
    lock = anyio.Lock()
    results: list[list[int]] = []

    async def applier(client: ClickHouse) -> None:
        results.append(await apply_clickhouse_migrations(client, lock=lock))

    second = open_engine(kind, clickhouse_server, embedded_clickhouse_dir, ch.database)
    with anyio.fail_after(TIMEOUT_S):
        async with second as other, anyio.create_task_group() as tg:
            tg.start_soon(applier, ch)
            tg.start_soon(applier, other)
        assert sorted(results) == [[], SCHEMA_VERSIONS]
        ledger = await ch.query_rows(
            "SELECT version, count() AS n FROM schema_migrations GROUP BY version ORDER BY version",
            timeout_s=TIMEOUT_S,
        )
        assert ledger == [{"version": v, "n": 1} for v in SCHEMA_VERSIONS]


async def test_a_changed_schema_file_stops_the_applier(ch: ClickHouse) -> None:
    with anyio.fail_after(TIMEOUT_S):
        await ch.ensure_database(timeout_s=TIMEOUT_S)
        await ch.execute(
            "CREATE TABLE schema_migrations"
            " (version UInt32, name String, checksum String, applied_at_ms Int64)"
            " ENGINE = MergeTree ORDER BY version",
            timeout_s=TIMEOUT_S,
        )
        await ch.execute(
            "INSERT INTO schema_migrations VALUES (1, 'metrics', 'not-the-file-checksum', 0)",
            timeout_s=TIMEOUT_S,
        )
        with pytest.raises(ConfigError, match="changed after it was applied"):
            await apply_clickhouse_migrations(ch)
        tables = await ch.query_rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase()",
            timeout_s=TIMEOUT_S,
        )
        assert [row["name"] for row in tables] == ["schema_migrations"]


# ---------------------------------------------------------------- data


async def test_rowbinary_rows_read_back_exactly(migrated: ClickHouse) -> None:
    rows: list[MetricRow] = [
        ("run-ü😀", "loss/train", 0, 0.1, 1_700_000_000_000, 1),
        ("run-ü😀", "loss/train", 1, -1e-300, 1_700_000_000_001, 2),
        ("run-ü😀", "acc'\\\0x", -(2**62), 1e308, 1_700_000_000_002, 2**64 - 1),
        ("r" * 300, "big", 2**63 - 1, 123456.789, 1_600_000_000_000, 2**63),
    ]
    with anyio.fail_after(TIMEOUT_S):
        await insert_metrics(migrated, rows)
        back = await migrated.query_rows(
            "SELECT run_id, name, step, value, timestamp_ms, version FROM metrics"
            " ORDER BY run_id, name, step",
            timeout_s=TIMEOUT_S,
        )
        parts = await migrated.query_rows(
            "SELECT DISTINCT partition_id FROM system.parts"
            " WHERE database = currentDatabase() AND table = 'metrics' AND active",
            timeout_s=TIMEOUT_S,
        )
    assert [tuple(row.values()) for row in back] == sorted(rows)
    assert all(type(row["step"]) is int and type(row["version"]) is int for row in back)
    # Monthly UTC partitions, the unit of retention.
    assert {row["partition_id"] for row in parts} == {"202009", "202311"}


@pytest.mark.parametrize("distinct_names", [3, 300, 70_000])
async def test_native_blocks_back_to_back_read_back_exactly(
    migrated: ClickHouse, distinct_names: int
) -> None:
    """What the ingest writers send: one Native block per batch, several per INSERT. The name
    dictionary's index width grows with the distinct names (UInt8, UInt16, UInt32)."""
    first = [("run-ü😀", f"loss/{i % distinct_names}", i, i / 7, 1_700_000_000_000 + i, 10 + i)
             for i in range(max(distinct_names, 5))]
    second: list[MetricRow] = [
        ("r" * 300, "acc'\\\0x", -(2**62), 1e308, 1_600_000_000_000, 2**64 - 1),
        ("r" * 300, "", 2**63 - 1, -1e-300, 1_600_000_000_001, 2**63),
    ]
    body = b"".join(
        encode_metric_block(rows[0][0], *(list(c) for c in list(zip(*rows, strict=True))[1:]))
        for rows in (first, second))
    with anyio.fail_after(TIMEOUT_S):
        await migrated.insert_native("metrics", METRIC_COLUMNS, body, timeout_s=TIMEOUT_S)
        back = await migrated.query_rows(
            "SELECT run_id, name, step, value, timestamp_ms, version FROM metrics"
            " ORDER BY run_id, name, step",
            timeout_s=TIMEOUT_S,
        )
        parts = await migrated.query_rows(
            "SELECT count() AS n FROM system.parts"
            " WHERE database = currentDatabase() AND table = 'metrics' AND active",
            timeout_s=TIMEOUT_S,
        )
    assert [tuple(row.values()) for row in back] == sorted(first + second)
    # One INSERT of two blocks: squashed into one part per partition (two months here).
    assert parts[0]["n"] == 2


def test_a_native_block_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        encode_metric_block("r", ["a"], [1, 2], [0.5], [1], [1])
    with pytest.raises(ValueError, match="cannot be encoded"):
        encode_metric_block("r", ["a"], [2**63], [0.5], [1], [1])
    with pytest.raises(ValueError, match="cannot be encoded"):
        encode_metric_block("r", ["a"], [1], [0.5], [1], [-1])
    assert encode_metric_block("r", [], [], [], [], []) == b""


async def test_last_write_wins_per_run_metric_step(migrated: ClickHouse) -> None:
    with anyio.fail_after(TIMEOUT_S):
        first = [("r", "m", step, float(step), 1_700_000_000_000, 10) for step in range(3)]
        await insert_metrics(migrated, first)
        await insert_metrics(migrated, [("r", "m", 1, 100.0, 1_700_000_000_000, 11)])
        # A replay of an older write arriving last must not win.
        await insert_metrics(migrated, [("r", "m", 1, -5.0, 1_700_000_000_000, 9)])
        final = await migrated.query_rows(
            "SELECT step, value FROM metrics FINAL WHERE run_id = 'r' ORDER BY step",
            timeout_s=TIMEOUT_S,
        )
        grouped = await migrated.query_rows(
            "SELECT step, argMax(value, version) AS value FROM metrics WHERE run_id = 'r'"
            " GROUP BY step ORDER BY step",
            timeout_s=TIMEOUT_S,
        )
    expected = [{"step": 0, "value": 0.0}, {"step": 1, "value": 100.0}, {"step": 2, "value": 2.0}]
    assert final == expected
    assert grouped == expected


async def test_summary_survives_replays_and_out_of_order_batches(migrated: ClickHouse) -> None:
    def batch(steps: range, version: int) -> list[MetricRow]:
        return [("run", "loss", s, 10.0 - s, 1_700_000_000_000 + s, version) for s in steps]

    with anyio.fail_after(TIMEOUT_S):
        late = batch(range(5, 10), 2)
        await insert_metrics(migrated, late)
        await insert_metrics(migrated, batch(range(5), 1))  # earlier steps arrive after
        await insert_metrics(migrated, late)  # a retried batch
        await insert_metrics(migrated, [("run", "acc", 3, 0.7, 1_700_000_000_000, 3)])
        await insert_metrics(migrated, [("other", "loss", 99, -1.0, 1_700_000_000_000, 4)])
        result = await summary(migrated, "run")
    assert result == {
        "loss": {"min": 1.0, "max": 10.0, "last": 1.0, "last_step": 9, "steps": 10},
        "acc": {"min": 0.7, "max": 0.7, "last": 0.7, "last_step": 3, "steps": 1},
    }


async def test_string_literals_round_trip(ch: ClickHouse) -> None:
    values = ["", "it's", "back\\slash\\", "nul\0byte", "line\nbreak\ttab\rcr", "über 😀 ✓"]
    with anyio.fail_after(TIMEOUT_S):
        await ch.ensure_database(timeout_s=TIMEOUT_S)
        for value in values:
            rows = await ch.query_rows(f"SELECT {quote_string(value)} AS s", timeout_s=TIMEOUT_S)
            assert rows == [{"s": value}]


# ---------------------------------------------------------------- errors


async def test_bad_sql_is_a_backend_error_with_the_clickhouse_code(migrated: ClickHouse) -> None:
    with anyio.fail_after(TIMEOUT_S):
        with pytest.raises(BackendError) as syntax:
            await migrated.execute("SELEC 1", timeout_s=TIMEOUT_S)
        assert syntax.value.backend_code == 62
        assert "Syntax error" in syntax.value.detail
        assert "Syntax error" not in syntax.value.message  # the client-facing text stays generic
        assert syntax.value.http_status == 500

        with pytest.raises(BackendError) as missing:
            await migrated.query_rows("SELECT * FROM no_such_table", timeout_s=TIMEOUT_S)
        assert missing.value.backend_code == 60

        with pytest.raises(BackendError) as bad_insert:
            await migrated.insert_rowbinary("no_such_table", ["a"], b"\x00", timeout_s=TIMEOUT_S)
        assert bad_insert.value.backend_code == 60

        # Truncated RowBinary: CANNOT_READ_ALL_DATA, and nothing is written.
        body = encode_metric_rows([("r", "m", 1, 1.0, 1_700_000_000_000, 1)])
        with pytest.raises(BackendError) as truncated:
            await migrated.insert_rowbinary(
                "metrics", METRIC_COLUMNS, body[:-3], timeout_s=TIMEOUT_S
            )
        assert truncated.value.backend_code == 33

        # The client keeps working after errors.
        count = await migrated.query_rows("SELECT count() AS n FROM metrics", timeout_s=TIMEOUT_S)
        assert count == [{"n": 0}]


async def test_error_after_streaming_started_is_a_backend_error(ch: ClickHouse) -> None:
    # Small blocks make the server send rows (and its 200 status) before the failing one.
    sql = (
        "SELECT number, throwIf(number = 200000) AS boom FROM system.numbers"
        " LIMIT 400000 SETTINGS max_block_size = 1000"
    )
    with anyio.fail_after(TIMEOUT_S):
        await ch.ensure_database(timeout_s=TIMEOUT_S)
        with pytest.raises(BackendError) as raised:
            await ch.query_rows(sql, timeout_s=TIMEOUT_S)
    assert raised.value.backend_code == 395


# ---------------------------------------------------------------- availability


async def test_ping_follows_the_server_going_away_and_coming_back(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    async with open_http_clickhouse(
        host=clickhouse_server.host,
        port=clickhouse_server.port,
        user=clickhouse_server.user,
        password=clickhouse_server.password,
        database=clickhouse_database,
    ) as ch:
        with anyio.fail_after(TIMEOUT_S):
            await ch.ping(timeout_s=5.0)
            await ch.ensure_database(timeout_s=TIMEOUT_S)  # leaves a kept-alive connection
        clickhouse_server.stop()
        try:
            with anyio.fail_after(5.0):  # refused at once; far below the call's own deadline
                with pytest.raises(BackendUnavailable) as down:
                    await ch.ping(timeout_s=30.0)
                assert not isinstance(down.value, BackendTimeout)
                with pytest.raises(BackendUnavailable):
                    await ch.query_rows("SELECT 1 AS one", timeout_s=30.0)
        finally:
            clickhouse_server.start()
        with anyio.fail_after(TIMEOUT_S):
            await ch.ping(timeout_s=5.0)
            assert await ch.query_rows("SELECT 1 AS one", timeout_s=5.0) == [{"one": 1}]


async def test_a_frozen_server_times_out(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    async with open_http_clickhouse(
        host=clickhouse_server.host,
        port=clickhouse_server.port,
        user=clickhouse_server.user,
        password=clickhouse_server.password,
        database=clickhouse_database,
    ) as ch:
        clickhouse_server.freeze()
        try:
            with anyio.fail_after(10.0):
                with pytest.raises(BackendTimeout):
                    await ch.ping(timeout_s=0.5)
                with pytest.raises(BackendTimeout):
                    await ch.ensure_database(timeout_s=0.5)
        finally:
            clickhouse_server.thaw()
        with anyio.fail_after(TIMEOUT_S):
            await ch.ping(timeout_s=5.0)


async def test_wrong_password_is_a_backend_error(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    async with open_http_clickhouse(
        host=clickhouse_server.host,
        port=clickhouse_server.port,
        user=clickhouse_server.user,
        password="wrong",
        database=clickhouse_database,
    ) as ch:
        with anyio.fail_after(TIMEOUT_S), pytest.raises(BackendError) as raised:
            await ch.ensure_database(timeout_s=TIMEOUT_S)
    assert raised.value.backend_code == 193


async def test_chdb_refuses_a_second_data_dir_clearly(
    embedded_clickhouse_dir: Path, clickhouse_database: str, tmp_path: Path
) -> None:
    with anyio.fail_after(TIMEOUT_S):
        async with open_embedded_clickhouse(
            data_dir=embedded_clickhouse_dir, database=clickhouse_database
        ) as ch:
            await ch.ping(timeout_s=5.0)
            with pytest.raises(ConfigError, match="one data directory per process"):
                async with open_embedded_clickhouse(data_dir=tmp_path, database="x"):
                    pass
            # The refusal left the open one working.
            await ch.ping(timeout_s=5.0)


async def test_closed_clients_refuse_calls(
    ch: ClickHouse,
) -> None:
    await ch.aclose()
    with anyio.fail_after(TIMEOUT_S), pytest.raises(BackendUnavailable, match="closed"):
        await ch.ping(timeout_s=5.0)


# ---------------------------------------------------------------- deadlines and cancellation

# Far more work than any machine does in the deadlines below (10^11 hashes); the server-side
# max_execution_time derived from timeout_s stops it soon after the client gives up.
ENDLESS_SQL = "SELECT sum(sipHash64(number)) AS h FROM numbers(100000000000)"


async def test_a_query_past_its_deadline_times_out_and_the_client_recovers(
    ch: ClickHouse,
) -> None:
    with anyio.fail_after(TIMEOUT_S):
        await ch.ensure_database(timeout_s=TIMEOUT_S)
        with pytest.raises(BackendTimeout):
            await ch.query_rows(ENDLESS_SQL, timeout_s=0.5)
        assert await ch.query_rows("SELECT 1 AS one", timeout_s=TIMEOUT_S) == [{"one": 1}]


# ---------------------------------------------------------------- block rollups


async def test_popcount_counts_every_bit_on_both_engines(migrated: ClickHouse) -> None:
    values = [0, 1, 3, 255, 2**63, 2**64 - 1, 0x5555555555555555, 12345678901234567, 2**32 + 7]
    literal = ", ".join(f"toUInt64({v})" for v in values)
    with anyio.fail_after(TIMEOUT_S):
        rows = await migrated.query_rows(
            f"SELECT x, {popcount_sql('x')} AS bits FROM (SELECT arrayJoin([{literal}]) AS x)",
            timeout_s=TIMEOUT_S)
    assert [(int(r["x"]), int(r["bits"])) for r in rows] == [
        (v, bin(v).count("1")) for v in values]


async def test_block_stats_count_distinct_steps_and_find_the_dirty_blocks(
    migrated: ClickHouse,
) -> None:
    rows: list[MetricRow] = [("r", "m", step, float(step), 1_700_000_000_000 + step, 1)
                             for step in range(0, 1000, 3)]
    await insert_metrics(migrated, rows[200:])  # out of order
    await insert_metrics(migrated, rows[:200])
    metrics = MetricQueries(migrated, timeout_s=TIMEOUT_S)
    with anyio.fail_after(TIMEOUT_S):
        (clean,) = (await metrics.block_stats(["r"], ["m"])).values()
        assert (clean.rows, clean.distinct, clean.lo, clean.hi, clean.dirty) == (
            334, 334, 0, 999, ())
        await insert_metrics(migrated, [("r", "m", 300, -1.0, 1_700_000_000_000, 2),
                                        ("r", "m", 999, -1.0, 1_700_000_000_000, 2)])
        dirty = (await metrics.block_stats(["r"], None))[SeriesRef("r", "m")]
    assert (dirty.rows, dirty.distinct) == (336, 334)
    assert dirty.dirty == (300 // BLOCK_STEPS, 999 // BLOCK_STEPS)


async def test_the_backfill_of_existing_points_equals_what_the_view_wrote(
    migrated: ClickHouse,
) -> None:
    rows: list[MetricRow] = [(run, name, step, (step * 7919 % 1000) / 7.0, step * 10, 1)
                             for run in ("a", "b") for name in ("loss", "acc")
                             for step in range(0, 5000, 7)]
    await insert_metrics(migrated, rows)
    columns = ("countMerge(rows) AS n, groupBitOrMerge(steps_low) AS l,"
               " groupBitOrMerge(steps_high) AS h, sumMerge(sum_value) AS sv,"
               " argMinMerge(low_step) AS lk, argMaxMerge(last_value) AS zv")
    read_blocks = (f"SELECT run_id, toString(name) AS name, block, {columns} FROM metric_blocks"
                   " GROUP BY run_id, name, block ORDER BY run_id, name, block")
    (backfill,) = [statement for statement in load_migrations("clickhouse")[1].statements
                   if statement.startswith("INSERT")]
    with anyio.fail_after(TIMEOUT_S):
        from_view = await migrated.query_rows(read_blocks, timeout_s=TIMEOUT_S)
        await migrated.execute("TRUNCATE TABLE metric_blocks", timeout_s=TIMEOUT_S)
        await migrated.execute(backfill, timeout_s=TIMEOUT_S)
        from_backfill = await migrated.query_rows(read_blocks, timeout_s=TIMEOUT_S)
    assert len(from_view) == 2 * 2 * (4999 // BLOCK_STEPS + 1)
    assert from_backfill == from_view


async def test_cancellation_propagates_out_of_a_running_query(ch: ClickHouse) -> None:
    with anyio.fail_after(TIMEOUT_S):
        await ch.ensure_database(timeout_s=TIMEOUT_S)
        with anyio.move_on_after(0.3) as scope:
            await ch.query_rows(ENDLESS_SQL, timeout_s=2.0)
        assert scope.cancelled_caught  # cancelled, not turned into an error or a result
        assert await ch.query_rows("SELECT 1 AS one", timeout_s=TIMEOUT_S) == [{"one": 1}]


def test_both_engines_work_on_asyncio(
    clickhouse_server: ClickHouseServer, embedded_clickhouse_dir: Path, clickhouse_database: str
) -> None:
    async def scenario(kind: str) -> None:
        database = f"{clickhouse_database}_{kind}"
        async with open_engine(kind, clickhouse_server, embedded_clickhouse_dir, database) as ch:
            assert await apply_clickhouse_migrations(ch) == SCHEMA_VERSIONS
            await insert_metrics(ch, [("r", "m", 1, 2.5, 1_700_000_000_000, 1)])
            assert await summary(ch, "r") == {
                "m": {"min": 2.5, "max": 2.5, "last": 2.5, "last_step": 1, "steps": 1}
            }
            with pytest.raises(BackendTimeout):
                await ch.query_rows(ENDLESS_SQL, timeout_s=0.5)

    async def main() -> None:
        with anyio.fail_after(TIMEOUT_S):
            await scenario("http")
            await scenario("embedded")

    anyio.run(main, backend="asyncio")
