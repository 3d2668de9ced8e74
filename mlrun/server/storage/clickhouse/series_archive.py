"""ClickHouse side of export and import (`ports.run_archive.SeriesArchive`): a run's series read
in keyset chunks exactly as stored, written back unchanged, and summaries restored.

Must not import PostgreSQL, the edges or the use-cases; codes against the `ClickHouse` protocol,
values escaped client-side (18.16 has no query parameters). Every statement runs on 18.16 and
chdb.

Invariants:
- Export reads every stored row (all versions not merged away yet), never a deduplicated view:
  import then writes the very same rows with the same versions, so every read of the target
  deduplicates them exactly as the source's reads do. A chunk is one statement returning one
  row of column arrays (no per-point JSON objects), in the table's key order then version;
  the next chunk starts strictly after the last (key, step, version), so chunks neither
  overlap nor skip (exact duplicates of a row, same version, are the same row: kept once).
- Memory is bounded by the chunk size: nothing reads a whole series.
- Summaries are AggregatingMergeTree states: restoring a min/max inserts one more state row
  whose other states re-state what the target already holds for that metric (its last point,
  its highest step), so last/last_step/count answers do not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import Final

from mlrun.server.ports.run_archive import SeriesCursor
from mlrun.server.protocols.clickhouse import METRIC_COLUMNS, encode_metric_rows, quote_string
from mlrun.server.protocols.export_file import Points, SeriesTable, Summary
from mlrun.server.storage.clickhouse.client import ClickHouse

# The key a series is ordered by in its table (sql/clickhouse/0001_metrics.sql).
_KEY_COLUMN: Final[dict[str, str]] = {"metrics": "step", "system_metrics": "timestamp_ms"}


class SeriesArchive:
    def __init__(self, ch: ClickHouse, *, timeout_s: float = 120.0) -> None:
        self._ch = ch
        self._timeout_s = timeout_s

    async def series_names(self, table: SeriesTable, run_id: str) -> list[str]:
        rows = await self._ch.query_rows(
            f"SELECT DISTINCT name FROM {table} WHERE run_id = {quote_string(run_id)}"
            " ORDER BY name", timeout_s=self._timeout_s)
        return [str(row["name"]) for row in rows]

    async def read_chunk(self, table: SeriesTable, run_id: str, name: str, *,
                         after: SeriesCursor | None, limit: int
                         ) -> tuple[Points, SeriesCursor | None]:
        key = _KEY_COLUMN[table]
        where = f"run_id = {quote_string(run_id)} AND name = {quote_string(name)}"
        if after is not None:
            # Spelled out rather than a tuple comparison so the primary key still applies.
            where += (f" AND ({key} > {after.key} OR ({key} = {after.key} AND (step > {after.step}"
                      f" OR (step = {after.step} AND version > {after.version}))))")
        # The inner ORDER BY ... LIMIT runs as one sorted stream, so groupArray keeps its
        # order; the last (key, step, version) is also asked for explicitly.
        sql = (
            "SELECT groupArray(step) AS chunk_steps, groupArray(value) AS chunk_values,"
            " groupArray(timestamp_ms) AS chunk_times, groupArray(version) AS chunk_versions,"
            " count() AS chunk_rows,"
            f" max(({key}, step, version)) AS chunk_last"
            " FROM (SELECT step, value, timestamp_ms, version"
            f" FROM {table} WHERE {where}"
            f" ORDER BY {key}, step, version LIMIT {int(limit)})"
        )
        rows = await self._ch.query_rows(sql, timeout_s=self._timeout_s)
        row = rows[0] if rows else {}
        count = int(row.get("chunk_rows", 0))
        chunk = Points(run_id=run_id, table=table, name=name,
                       steps=list(row.get("chunk_steps", [])),
                       values=[float(value) for value in row.get("chunk_values", [])],
                       timestamps_ms=list(row.get("chunk_times", [])),
                       versions=list(row.get("chunk_versions", [])))
        if count < limit:
            return chunk, None
        last = row["chunk_last"]
        return chunk, SeriesCursor(key=int(last[0]), step=int(last[1]), version=int(last[2]))

    async def summaries(self, run_id: str) -> list[Summary]:
        rows = await self._ch.query_rows(
            "SELECT name, minMerge(min_value) AS low, maxMerge(max_value) AS high"
            f" FROM metrics_summary WHERE run_id = {quote_string(run_id)}"
            " GROUP BY name ORDER BY name", timeout_s=self._timeout_s)
        return [Summary(run_id=run_id, name=str(row["name"]), min=float(row["low"]),
                        max=float(row["high"])) for row in rows]

    async def write_points(self, chunks: Sequence[Points]) -> None:
        for table in ("metrics", "system_metrics"):
            parts = [
                encode_metric_rows(zip(repeat(chunk.run_id), repeat(chunk.name), chunk.steps,
                                       chunk.values, chunk.timestamps_ms, chunk.versions,
                                       strict=False))
                for chunk in chunks if chunk.table == table and chunk.steps
            ]
            if parts:
                await self._ch.insert_rowbinary(table, METRIC_COLUMNS, b"".join(parts),
                                                timeout_s=self._timeout_s)

    async def restore_summary(self, summary: Summary) -> None:
        where = (f"run_id = {quote_string(summary.run_id)}"
                 f" AND name = {quote_string(summary.name)}")
        await self._ch.execute(
            "INSERT INTO metrics_summary (run_id, name, min_value, max_value, last_value,"
            " last_step, step_count)"
            f" SELECT run_id, name, minState(toFloat64({summary.min!r})),"
            f" maxState(toFloat64({summary.max!r})), argMaxState(value, (step, version)),"
            " maxState(step), uniqExactState(step)"
            " FROM (SELECT run_id, name, value, step, version FROM metrics"
            f" WHERE {where} ORDER BY step DESC, version DESC LIMIT 1)"
            " GROUP BY run_id, name",
            timeout_s=self._timeout_s)
