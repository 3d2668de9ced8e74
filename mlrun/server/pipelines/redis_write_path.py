"""The queued write path: a batch is durable once its entry is in a Redis stream.

Implements `mlrun.server.ports.write_path.WritePath` for `INGEST_MODE=queued`; `mlrun process`
(`pipelines.stream_processor`) moves the entries into ClickHouse and marks the ledger.

    reserve_nowait   503 when the queue is unreachable, 429 past its bound (entries, bytes,
                     Redis maxmemory) with Retry-After from the processors' drain rate; then
                     capacity in this server's own XADD pipeline (429 when that is full)
    reserve          the same, but when only the XADD pipeline is full — a transient buffer in
                     front of a Redis that answers in milliseconds, full because this server
                     is short of CPU, not because the queue is — the request waits for room
                     (in arrival order, at most `wait_s`, at most a pipeline's worth of
                     waiters) instead of getting a 429: backpressure by latency, which
                     closed-loop clients absorb. The queue bound is checked again after the
                     wait and still answers 429 at once.
    submit_nowait    encode the batch's entry (RowBinary rows + identity + versions, see
                     `stream_entries`) as XADD + INCRBY, queue it under the reservation
    writer           one MULTI/EXEC of every queued entry per round trip (the group commit of
                     concurrent requests: pipelining, as the ClickHouse writer groups inserts)
    holds            the same ClickHouse check as the direct path

What a 200 means here: the batch's entry is in Redis (and its PostgreSQL work is done). With
AOF on, it survives the kill -9 of any one process, Redis included; a power loss of Redis's
machine can lose what was acknowledged in the last second with `appendfsync everysec` (up to
two seconds if the disk stalls), nothing with `appendfsync always`, and everything since the
last snapshot without AOF (the README says so too).

The ledger row stays `pending` until a processor has inserted the rows and marked it. A resend
in between finds it pending, asks `holds` (ClickHouse does not have the rows yet: the batch is
still in the stream) and queues the same rows again: harmless, the entry carries the versions
assigned at admission, so ClickHouse keeps one row per (run, metric, step) whichever copy a
processor inserts first, and every read deduplicates; the answer is then "accepted", not
"duplicate".

The XADD pipeline is a `group_commit.Pipeline` whose items are encoded commands, so its
bound, tickets, outage retries and statistics are the direct path's; its rows are points, its
bytes are encoded command bytes.

Must not import the edges or the use-cases.
"""

from __future__ import annotations

import anyio
import anyio.abc
import msgspec

from mlrun.server.errors import BackendUnavailable, Overloaded
from mlrun.server.pipelines.clickhouse_write_path import clickhouse_holds, estimate_block_bytes
from mlrun.server.pipelines.group_commit import Pipeline, PipelineStatistics, Reservation, Ticket
from mlrun.server.pipelines.queue_monitor import QueueMonitor, QueueSnapshot
from mlrun.server.pipelines.stream_entries import StreamKeys, encode_xadd
from mlrun.server.ports.write_path import BatchWrite, PointColumns
from mlrun.server.storage.clickhouse.client import ClickHouse
from mlrun.server.storage.redis.client import BACKEND, RedisClient, raise_for_reply

# An entry's bytes beyond its RowBinary: field names, identity, RESP framing, the INCRBY.
_ENTRY_OVERHEAD_BYTES = 1024
_XADD_TIMEOUT_S = 3.0


class QueueAdmissionStatistics(msgspec.Struct, frozen=True):
    """This server's side of the queue: what it admitted and refused, and the view it used."""

    admitted_entries: int
    rejected_full: int
    rejected_unreachable: int
    max_entries: int
    max_bytes: int
    drain_rate_entries_per_s: float
    queue: QueueSnapshot


def _payload_bytes(run_id: str, metrics: PointColumns, system_metrics: PointColumns) -> int:
    """What admission counts for a batch's rows (the queue bound's unit)."""
    return estimate_block_bytes(run_id, metrics) + estimate_block_bytes(run_id, system_metrics)


class _Done:
    """The durability of a write with no rows: nothing to wait for."""

    async def wait(self, timeout_s: float) -> None:
        return None


class _Reservation:
    __slots__ = ("_reservation", "_write_path")

    def __init__(self, write_path: RedisWritePath, reservation: Reservation) -> None:
        self._write_path = write_path
        self._reservation = reservation

    def submit_nowait(self, write: BatchWrite) -> Ticket | _Done:
        if not write.rows:
            self._reservation.release()
            return _Done()
        payload, size = encode_xadd(self._write_path.keys, write)
        return self._write_path.pipeline.submit_nowait(self._reservation, payload, write.rows,
                                                       tag=size)

    def release(self) -> None:
        self._reservation.release()


class RedisWritePath:
    def __init__(self, redis: RedisClient, clickhouse: ClickHouse, monitor: QueueMonitor, *,
                 keys: StreamKeys, max_entries: int, max_bytes: int,
                 pipeline_max_rows: int, pipeline_max_bytes: int) -> None:
        self._redis = redis
        self._clickhouse = clickhouse
        self.monitor = monitor
        self.keys = keys
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.pipeline = Pipeline("redis_stream", backend=BACKEND, max_rows=pipeline_max_rows,
                                 max_bytes=pipeline_max_bytes)
        self.pipelines = (self.pipeline,)
        # Entries this server added since the monitor's view was taken (it does not see them
        # yet): (entries, bytes) added ever, and the totals when the last refresh began.
        self._added = [0, 0]
        self._added_at_refresh = [0, 0]
        self._admitted = 0
        self._rejected_full = 0
        self._rejected_unreachable = 0

    # --- the port ------------------------------------------------------------------------------

    def reserve_nowait(self, run_id: str, metrics: PointColumns, system_metrics: PointColumns
                       ) -> _Reservation:
        payload_bytes = _payload_bytes(run_id, metrics, system_metrics)
        self._admit(payload_bytes)
        reservation = self.pipeline.reserve_nowait(len(metrics) + len(system_metrics),
                                                   payload_bytes + _ENTRY_OVERHEAD_BYTES)
        self._admitted += 1
        return _Reservation(self, reservation)

    async def reserve(self, run_id: str, metrics: PointColumns, system_metrics: PointColumns,
                      *, wait_s: float) -> _Reservation:
        payload_bytes = _payload_bytes(run_id, metrics, system_metrics)
        self._admit(payload_bytes)
        rows = len(metrics) + len(system_metrics)
        nbytes = payload_bytes + _ENTRY_OVERHEAD_BYTES
        reservation = await self.pipeline.reserve(rows, nbytes, wait_s=wait_s)
        if reservation.waited:
            try:
                # The queue may have reached its bound while we waited (our own reservation
                # is counted by the pipeline now: leave it out).
                self._admit(payload_bytes, own_reserved_bytes=nbytes)
            except BaseException:
                reservation.release()
                raise
        self._admitted += 1
        return _Reservation(self, reservation)

    async def holds(self, write: BatchWrite, *, timeout_s: float) -> bool:
        return await clickhouse_holds(self._clickhouse, write, timeout_s=timeout_s)

    def committed_unmarked(self, run_id: str, batch_id: str) -> bool:
        return False  # processors mark the ledger; this server cannot know

    def _admit(self, payload_bytes: int, *, own_reserved_bytes: int = 0) -> None:
        snapshot = self.monitor.snapshot
        if not snapshot.reachable:
            self._rejected_unreachable += 1
            raise BackendUnavailable(f"the ingest queue (redis) is unreachable: {snapshot.error}; "
                                     "retry the same batch", backend=BACKEND)
        not_yet_seen_entries = self._added[0] - self._added_at_refresh[0]
        not_yet_seen_bytes = self._added[1] - self._added_at_refresh[1]
        in_flight_bytes = self.pipeline.statistics().queued_bytes - own_reserved_bytes
        entries = snapshot.entries + not_yet_seen_entries
        # An empty queue holds no bytes, whatever the counter says (it would drift only if
        # someone deleted entries by hand; this keeps such a drift from refusing forever).
        counted_bytes = snapshot.bytes if snapshot.entries else 0
        queued_bytes = counted_bytes + not_yet_seen_bytes + in_flight_bytes
        if (entries >= self.max_entries or queued_bytes + payload_bytes > self.max_bytes
                or snapshot.memory_full):
            self._rejected_full += 1
            reason = ("Redis is near its maxmemory" if snapshot.memory_full
                      else f"{entries} batches, {queued_bytes} bytes queued")
            raise Overloaded(f"the ingest queue is full ({reason}); retry the same batch after "
                             "Retry-After",
                             retry_after_s=self.monitor.retry_after_s(self.max_entries))

    # --- lifetime ------------------------------------------------------------------------------

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """The XADD writer and the queue view; returns once `close()` was called and the
        accepted entries are written (or given up on at the caller's deadline)."""
        async with anyio.create_task_group() as monitor_group:
            await monitor_group.start(self._serve_monitor)
            try:
                await self.pipeline.serve_writer(self._flush, on_committed=self._note_added,
                                                 flush_timeout_s=_XADD_TIMEOUT_S,
                                                 task_status=task_status)
            finally:
                monitor_group.cancel_scope.cancel()

    async def _serve_monitor(self, *,
                             task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                             ) -> None:
        task_status.started()
        while True:
            started_with = list(self._added)
            await self.monitor.refresh()
            if self.monitor.snapshot.reachable:
                self._added_at_refresh = started_with
            await anyio.sleep(self.monitor.interval_s)  # the refresh period of the queue view

    async def _flush(self, payload: bytes, rows: int) -> None:
        for reply in await self._redis.transaction(payload, timeout_s=_XADD_TIMEOUT_S):
            # A command that failed while running (say WRONGTYPE: a key of another type under
            # the stream's name) fails the group; what did get added is harmless when resent.
            raise_for_reply(reply, "XADD")

    def _note_added(self, sizes: list[object]) -> None:
        self._added[0] += len(sizes)
        self._added[1] += sum(size for size in sizes if isinstance(size, int))

    def close(self) -> None:
        """No new reservations; the writer drains what was accepted."""
        self.pipeline.close()

    def statistics(self) -> tuple[PipelineStatistics, QueueAdmissionStatistics]:
        return self.pipeline.statistics(), QueueAdmissionStatistics(
            admitted_entries=self._admitted, rejected_full=self._rejected_full,
            rejected_unreachable=self._rejected_unreachable, max_entries=self.max_entries,
            max_bytes=self.max_bytes,
            drain_rate_entries_per_s=round(self.monitor.drain_rate_entries_per_s, 1),
            queue=self.monitor.snapshot)
