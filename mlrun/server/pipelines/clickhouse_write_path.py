"""The in-process write path: group-commit pipelines straight into ClickHouse.

Implements `mlrun.server.ports.write_path.WritePath` with one bounded `Pipeline` per metric
table (`metrics`, `system_metrics`) and one writer task each, plus a `LedgerMarker`:

    reserve_nowait   capacity in both pipelines or in neither (429 when full)
    reserve          the same, never waiting: a full pipeline here means ClickHouse is behind,
                     which only a 429 tells the client
    submit_nowait    encode each table's rows as one Native block, queue it under the reservation
    writer           one INSERT per group of queued payloads; once a batch's every part is
                     committed, its (run_id, batch_id) goes to the ledger marker
    holds            SELECT count() of the batch's versions per table, for a pending resend

Owns the Native encoding of metric rows (the use-case never sees bytes) and the byte
estimate that admission reserves. `serve` runs the writers and the marker until `close()`:
listeners stop first, then the pipelines drain what was accepted, then the marker writes its
last marks.

Must not import the edges or the use-cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
import anyio.abc

from mlrun.server.pipelines.group_commit import (
    Pipeline,
    PipelineStatistics,
    Reservation,
    Ticket,
    reserve_all,
)
from mlrun.server.pipelines.ledger_marker import LedgerMarker, LedgerMarkerStatistics
from mlrun.server.ports.write_path import (
    BatchIdentity,
    BatchLedger,
    BatchWrite,
    MetricTable,
    PointColumns,
)
from mlrun.server.protocols.clickhouse import (
    METRIC_COLUMNS,
    encode_metric_block,
    quote_identifier,
    quote_string,
)
from mlrun.server.storage.clickhouse.client import ClickHouse

TABLES: tuple[MetricTable, MetricTable] = ("metrics", "system_metrics")

# Native block size beyond the strings: per row the run id's length (a varint, at most 2 bytes
# for the ids we accept), the name's index (at most 4 bytes) and 4 x 8-byte numbers; per block
# the column names and types, the LowCardinality headers and the row counts.
_ROW_OVERHEAD_BYTES = 38
_BLOCK_OVERHEAD_BYTES = 256
_INSERT_TIMEOUT_S = 5.0


def estimate_block_bytes(run_id: str, columns: PointColumns) -> int:
    """An upper bound of the Native block size of `columns` (names counted generously: every
    point's name, 4 bytes per character, where the block holds each distinct name once)."""
    if not len(columns):
        return 0
    run_id_bytes = len(run_id.encode())
    return (_BLOCK_OVERHEAD_BYTES + sum(len(name) for name in columns.names) * 4
            + len(columns) * (run_id_bytes + _ROW_OVERHEAD_BYTES))


def encode_columns(run_id: str, columns: PointColumns) -> bytes:
    """One Native block: the writer sends a group's blocks back to back in one INSERT."""
    return encode_metric_block(run_id, columns.names, columns.steps, columns.values,
                               columns.timestamps_ms, columns.versions)


async def clickhouse_holds(clickhouse: ClickHouse, write: BatchWrite, *, timeout_s: float
                           ) -> bool:
    """`WritePath.holds` for any write path whose rows end up in ClickHouse: SELECT count() of
    the batch's versions per table."""
    first = write.identity.first_version
    last = first + write.rows - 1
    expected = {"metrics": len(write.metrics), "system_metrics": len(write.system_metrics)}
    selects = " UNION ALL ".join(
        f"SELECT '{table}' AS t, count() AS n FROM {quote_identifier(table)}"
        f" WHERE run_id = {quote_string(write.identity.run_id)}"
        f" AND version >= {first} AND version <= {last}"
        for table in TABLES if expected[table])
    if not selects:
        return True
    rows = await clickhouse.query_rows(selects, timeout_s=timeout_s)
    found = {row["t"]: int(row["n"]) for row in rows}
    # Fewer rows than written is possible only if a later write of the same steps replaced
    # some in a merge; then writing the batch again (same versions) is harmless.
    return all(found.get(table, 0) >= count for table, count in expected.items() if count)


class _BatchProgress:
    """Parts of one batch still waiting for their flush; the ledger mark goes out at zero."""

    __slots__ = ("identity", "parts_left")

    def __init__(self, identity: BatchIdentity, parts: int) -> None:
        self.identity = identity
        self.parts_left = parts


class _Durability:
    __slots__ = ("_tickets",)

    def __init__(self, tickets: list[Ticket]) -> None:
        self._tickets = tickets

    async def wait(self, timeout_s: float) -> None:
        deadline = anyio.current_time() + timeout_s
        for ticket in self._tickets:
            await ticket.wait(max(deadline - anyio.current_time(), 0.0))


class _Reservation:
    __slots__ = ("_reservations", "_write_path")

    def __init__(self, write_path: ClickHouseWritePath, reservations: list[Reservation]) -> None:
        self._write_path = write_path
        self._reservations = reservations

    def submit_nowait(self, write: BatchWrite) -> _Durability:
        parts = [(pipeline, reservation, columns)
                 for pipeline, reservation, columns in zip(
                     self._write_path.pipelines, self._reservations,
                     (write.metrics, write.system_metrics), strict=True)]
        progress = _BatchProgress(write.identity, sum(1 for *_, c in parts if len(c)))
        tickets: list[Ticket] = []
        for pipeline, reservation, columns in parts:
            if len(columns):
                payload = encode_columns(write.identity.run_id, columns)
                tickets.append(pipeline.submit_nowait(reservation, payload, len(columns),
                                                      tag=progress))
            else:
                reservation.release()
        return _Durability(tickets)

    def release(self) -> None:
        for reservation in self._reservations:
            reservation.release()


class ClickHouseWritePath:
    def __init__(self, clickhouse: ClickHouse, ledger: BatchLedger, *, max_rows: int,
                 max_bytes: int, before_ledger_mark: Callable[[], None] | None = None) -> None:
        self._clickhouse = clickhouse
        self.pipelines = tuple(
            Pipeline(table, backend="clickhouse", max_rows=max_rows, max_bytes=max_bytes)
            for table in TABLES)
        self.marker = LedgerMarker(ledger, before_mark=before_ledger_mark)

    # --- the port ------------------------------------------------------------------------------

    def reserve_nowait(self, run_id: str, metrics: PointColumns, system_metrics: PointColumns
                       ) -> _Reservation:
        requests = [(pipeline, len(columns), estimate_block_bytes(run_id, columns))
                    for pipeline, columns in zip(self.pipelines, (metrics, system_metrics),
                                                 strict=True)]
        return _Reservation(self, reserve_all(requests))

    async def reserve(self, run_id: str, metrics: PointColumns, system_metrics: PointColumns,
                      *, wait_s: float) -> _Reservation:
        return self.reserve_nowait(run_id, metrics, system_metrics)

    async def holds(self, write: BatchWrite, *, timeout_s: float) -> bool:
        return await clickhouse_holds(self._clickhouse, write, timeout_s=timeout_s)

    def committed_unmarked(self, run_id: str, batch_id: str) -> bool:
        return self.marker.is_pending(run_id, batch_id)

    # --- lifetime ------------------------------------------------------------------------------

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Writers and ledger marker; returns once `close()` was called and all drained."""
        async with anyio.create_task_group() as marker_group:
            await marker_group.start(self.marker.serve)
            try:
                async with anyio.create_task_group() as writers:
                    for pipeline in self.pipelines:
                        await writers.start(self._serve_writer, pipeline)
                    task_status.started()
            finally:
                self.marker.close()

    async def _serve_writer(self, pipeline: Pipeline, *,
                            task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                            ) -> None:
        table = pipeline.name

        async def flush(payload: bytes, rows: int) -> None:
            await self._clickhouse.insert_native(table, METRIC_COLUMNS, payload,
                                                 timeout_s=_INSERT_TIMEOUT_S)

        await pipeline.serve_writer(flush, on_committed=self._note_committed,
                                    task_status=task_status)

    def _note_committed(self, tags: Sequence[object]) -> None:
        for tag in tags:
            assert isinstance(tag, _BatchProgress)
            tag.parts_left -= 1
            identity = tag.identity
            if tag.parts_left == 0 and identity.batch_id is not None:
                self.marker.note_committed_nowait(identity.run_id, identity.batch_id)

    def close(self) -> None:
        """No new reservations; writers drain, then the marker makes its last attempt."""
        for pipeline in self.pipelines:
            pipeline.close()

    def statistics(self) -> tuple[tuple[PipelineStatistics, ...], LedgerMarkerStatistics]:
        return tuple(p.statistics() for p in self.pipelines), self.marker.statistics()
