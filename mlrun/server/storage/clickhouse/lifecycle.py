"""The ClickHouse side of the data lifecycle: deleting runs (every table), dropping expired
monthly partitions, and rebuilding the summaries and block rollups of runs that lost part of
their points. Implements `ports.lifecycle.MetricLifecycle`.

Runs unchanged on ClickHouse 18.16 and chdb (ClickHouse 26), both exercised by the tests:
- deletes are `ALTER TABLE ... DELETE WHERE run_id IN (...)` mutations (18.16 has no lightweight
  DELETE). They are asynchronous: callers start them, then wait until `remaining_rows` is 0
  (a row is visible until its part was rewritten). A mutation rewrites every part holding
  matching rows (on 18.16 every part of the table), so callers batch many runs into one and
  start the next only when `busy_mutations` is 0: one mutation at a time bounds the load.
- a mutation only touches parts that existed when it was created: rows inserted afterwards
  (and summary or block states the views add for them) survive it.
- expired data goes by `DROP PARTITION YYYYMM` (metrics and system_metrics are partitioned by
  UTC month, sql/clickhouse/0001_metrics.sql); summaries and block rollups are not partitioned,
  so the runs that had points in a dropped month get theirs deleted and rebuilt.

Must not import a transport, PostgreSQL, the use-cases or the edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from mlrun.server.protocols.clickhouse import quote_list, quote_string
from mlrun.server.storage.clickhouse.client import ClickHouse

# Every table that holds rows of a run.
RUN_TABLES: Final = ("metrics", "system_metrics", "metrics_summary", "metric_blocks")
ROLLUP_TABLES: Final = ("metrics_summary", "metric_blocks")
POINT_TABLES: Final = ("metrics", "system_metrics")
# Run ids per statement: an IN list of this many ids stays far below max_query_size.
MAX_RUNS_PER_STATEMENT: Final = 1000

# The rebuild's SELECT lists: exactly the states of the materialized views metrics_summary_mv2
# (0003_summary_without_step_set.sql) and metric_blocks_mv (0002_metric_blocks.sql), which feed
# these tables on every insert (the step set is empty since 0003: nothing reads it). A rebuild
# racing an insert can only count points twice in `metric_blocks`, which makes their blocks
# dirty (read the slow, exact way), never wrong-and-clean.
_SUMMARY_STATES: Final = (
    "run_id, name, minState(value), maxState(value), argMaxState(value, (step, version)),"
    " maxState(step), uniqExactStateIf(step, 0)")
_BLOCK_STATES: Final = (
    "run_id, name, intDiv(step, 128) AS block, countState(),"
    " groupBitOrState(if(step % 128 < 64, bitShiftLeft(toUInt64(1), toUInt64(step % 64)),"
    " toUInt64(0))),"
    " groupBitOrState(if(step % 128 >= 64, bitShiftLeft(toUInt64(1), toUInt64(step % 64)),"
    " toUInt64(0))),"
    " sumState(toFloat64(step)), sumState(value), sumState(toFloat64(timestamp_ms)),"
    " minState(step), argMinState(value, step), argMinState(timestamp_ms, step),"
    " maxState(step), argMaxState(value, step), argMaxState(timestamp_ms, step),"
    " minState(value), argMinState(step, value), argMinState(timestamp_ms, value),"
    " maxState(value), argMaxState(step, value), argMaxState(timestamp_ms, value)")

_MONTH_OF_POINT: Final = "toYYYYMM(toDateTime(intDiv(timestamp_ms, 1000), 'UTC'))"


def _chunks(run_ids: Sequence[str]) -> list[Sequence[str]]:
    return [run_ids[i:i + MAX_RUNS_PER_STATEMENT]
            for i in range(0, len(run_ids), MAX_RUNS_PER_STATEMENT)]


class ClickHouseLifecycle:
    def __init__(self, clickhouse: ClickHouse, *, timeout_s: float = 60.0) -> None:
        self._ch = clickhouse
        self._timeout_s = timeout_s

    async def _count(self, tables: Sequence[str], run_ids: Sequence[str]) -> int:
        total = 0
        for chunk in _chunks(run_ids):
            for table in tables:
                rows = await self._ch.query_rows(
                    f"SELECT count() AS n FROM {table} WHERE run_id IN {quote_list(chunk)}",
                    timeout_s=self._timeout_s)
                total += int(rows[0]["n"])
        return total

    async def _delete(self, tables: Sequence[str], run_ids: Sequence[str]) -> None:
        for chunk in _chunks(run_ids):
            for table in tables:
                await self._ch.execute(
                    f"ALTER TABLE {table} DELETE WHERE run_id IN {quote_list(chunk)}",
                    timeout_s=self._timeout_s)

    async def count_points(self, run_ids: Sequence[str]) -> int:
        return await self._count(POINT_TABLES, run_ids)

    async def delete_runs(self, run_ids: Sequence[str]) -> None:
        await self._delete(RUN_TABLES, run_ids)

    async def remaining_rows(self, run_ids: Sequence[str]) -> int:
        return await self._count(RUN_TABLES, run_ids)

    async def busy_mutations(self) -> int:
        rows = await self._ch.query_rows(
            "SELECT count() AS n FROM system.mutations WHERE is_done = 0"
            f" AND database = {quote_string(self._ch.database)}"
            f" AND table IN {quote_list(RUN_TABLES)}", timeout_s=self._timeout_s)
        return int(rows[0]["n"])

    async def expired_partitions(self, *, before_month: int) -> list[int]:
        rows = await self._ch.query_rows(
            "SELECT DISTINCT partition FROM system.parts WHERE active"
            f" AND database = {quote_string(self._ch.database)}"
            f" AND table IN {quote_list(POINT_TABLES)}", timeout_s=self._timeout_s)
        months = {int(str(r["partition"]).strip("'")) for r in rows}
        return sorted(m for m in months if m < before_month)

    async def runs_in_partition(self, month: int) -> list[str]:
        rows = await self._ch.query_rows(
            f"SELECT DISTINCT run_id FROM metrics WHERE {_MONTH_OF_POINT} = {int(month)}"
            " ORDER BY run_id", timeout_s=self._timeout_s)
        return [str(r["run_id"]) for r in rows]

    async def delete_rollups(self, run_ids: Sequence[str]) -> None:
        await self._delete(ROLLUP_TABLES, run_ids)

    async def remaining_rollups(self, run_ids: Sequence[str]) -> int:
        return await self._count(ROLLUP_TABLES, run_ids)

    async def drop_partition(self, month: int) -> None:
        for table in POINT_TABLES:
            await self._ch.execute(f"ALTER TABLE {table} DROP PARTITION {int(month)}",
                                   timeout_s=self._timeout_s)

    async def rebuild_rollups(self, run_ids: Sequence[str]) -> None:
        for chunk in _chunks(run_ids):
            where = f"run_id IN {quote_list(chunk)}"
            await self._ch.execute(
                f"INSERT INTO metrics_summary SELECT {_SUMMARY_STATES} FROM metrics"
                f" WHERE {where} GROUP BY run_id, name", timeout_s=self._timeout_s)
            await self._ch.execute(
                f"INSERT INTO metric_blocks SELECT {_BLOCK_STATES} FROM metrics"
                f" WHERE {where} GROUP BY run_id, name, block", timeout_s=self._timeout_s)
