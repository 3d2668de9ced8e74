"""The queue as every process of a queued deployment sees it: a snapshot of the Redis streams,
refreshed in the background, and the processors' drain rate derived from it.

Owns: one pipelined round trip per refresh (XLEN and XINFO GROUPS of every stream, the byte
and drained counters, the dead-letter stream's length, the processors' processing hash, INFO
memory) turned into a `QueueSnapshot`; the drain rates (entries and rows the processors
acknowledged per second, smoothed); and the Retry-After that a full queue answers with.
Servers admit against the snapshot (`RedisWritePath`), and both servers and processors show it
in `/metrics`.

Why a periodic refresh: admission (`WritePath.reserve_nowait`) must decide without waiting,
so it reads what the last refresh saw. The view is at most `interval_s` old; what a server
adds in between it counts itself (see `RedisWritePath`), what other servers add it does not,
so N servers can overshoot the bound by what they admit in one interval each.

Invariants:
- Every refresh has a deadline; a failed one marks the queue unreachable (admission answers
  503 `backend_unavailable` naming redis) until the next refresh succeeds, and so does a
  snapshot older than `stale_s` (a refresh that hangs is no better than a failed one).
- Before the first successful refresh the queue counts as unreachable.

Must not import the edges or the use-cases; Redis is reached through `storage.redis`.
"""

from __future__ import annotations

import logging
import math
from typing import Final

import anyio
import anyio.abc
import msgspec

from mlrun.server.errors import MlrunError
from mlrun.server.pipelines.stream_entries import (
    STAT_INSERT_BUCKET,
    STAT_INSERT_US,
    STAT_INSERTS,
    STAT_REDELIVERED,
    STAT_ROWS,
    StreamKeys,
)
from mlrun.server.protocols.redis_streams import parse_info, parse_xinfo_groups
from mlrun.server.protocols.resp import CommandArg, ProtocolError, Reply, ReplyError
from mlrun.server.storage.redis.client import RedisClient
from mlrun.server.telemetry import DEFAULT_LATENCY_BUCKETS_S, Histogram

logger = logging.getLogger("mlrun.queue")

_NO_DRAIN_RETRY_AFTER_S: Final = 5
_MAX_RETRY_AFTER_S: Final = 30
_DRAIN_MEMORY_S: Final = 5.0
# Past this share of Redis's maxmemory the queue counts as full: XADD would soon be refused
# with OOM, and noeviction (the only safe policy for streams) refuses every write then.
MEMORY_FULL_SHARE: Final = 0.9


class QueueSnapshot(msgspec.Struct, frozen=True):
    reachable: bool
    error: str | None = None
    entries: int = 0  # in the streams: not yet acknowledged by a processor
    bytes: int = 0  # their payload bytes (the byte counter)
    pending: int = 0  # delivered to a processor, not yet acknowledged
    lag: int = 0  # not yet delivered to any processor
    consumers: int = 0
    dead_letters: int = 0
    drained_total: int = 0  # entries acknowledged by processors, ever (the drained counter)
    used_memory_bytes: int = 0
    max_memory_bytes: int = 0  # 0: no maxmemory set
    # All processors together, from the processing hash (telemetry: best effort).
    drained_rows_total: int = 0
    redelivered_total: int = 0
    inserts_total: int = 0
    insert_seconds_total: float = 0.0
    insert_bucket_counts: tuple[int, ...] = ()  # per DEFAULT_LATENCY_BUCKETS_S bucket

    def insert_latency(self) -> Histogram:
        """The processors' insert durations as one histogram."""
        histogram = Histogram()
        for index, count in enumerate(self.insert_bucket_counts[:len(histogram.counts)]):
            histogram.counts[index] = count
        histogram.total = self.inserts_total
        histogram.sum_s = self.insert_seconds_total
        return histogram

    @property
    def memory_full(self) -> bool:
        return bool(self.max_memory_bytes
                    and self.used_memory_bytes >= MEMORY_FULL_SHARE * self.max_memory_bytes)


class QueueMonitor:
    def __init__(self, redis: RedisClient, keys: StreamKeys, group: str, *,
                 interval_s: float = 0.2, timeout_s: float = 1.0, stale_s: float = 3.0) -> None:
        self._redis = redis
        self._keys = keys
        self._group = group
        self.interval_s = interval_s
        self._timeout_s = timeout_s
        self._stale_s = stale_s
        self._snapshot = QueueSnapshot(reachable=False, error="not reached yet")
        self._refreshed_at = float("-inf")
        self._drain_rate = 0.0
        self._drain_rate_rows = 0.0
        self._last_drain_at = float("-inf")
        self.refreshes = 0
        self.failed_refreshes = 0

    @property
    def snapshot(self) -> QueueSnapshot:
        if (self._snapshot.reachable
                and anyio.current_time() - self._refreshed_at > self._stale_s):
            return msgspec.structs.replace(self._snapshot, reachable=False,
                                           error="no answer from redis lately")
        return self._snapshot

    @property
    def drain_rate_entries_per_s(self) -> float:
        if anyio.current_time() - self._last_drain_at > _DRAIN_MEMORY_S:
            return 0.0
        return self._drain_rate

    @property
    def drain_rate_rows_per_s(self) -> float:
        if anyio.current_time() - self._last_drain_at > _DRAIN_MEMORY_S:
            return 0.0
        return self._drain_rate_rows

    def retry_after_s(self, max_entries: int) -> int:
        """When a client refused for a full queue may try again: the time the processors need,
        at the rate they drain now, to empty the top tenth of the bound; 5 s when nothing was
        drained lately (processors down or stalled), at most 30 s."""
        rate = self.drain_rate_entries_per_s
        if rate <= 0:
            return _NO_DRAIN_RETRY_AFTER_S
        excess = max(self._snapshot.entries - 0.9 * max_entries, 1.0)
        return max(1, min(_MAX_RETRY_AFTER_S, math.ceil(excess / rate)))

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Refresh every `interval_s` until cancelled."""
        task_status.started()
        while True:
            await self.refresh()
            await anyio.sleep(self.interval_s)  # the refresh period of a remote gauge

    async def refresh(self) -> QueueSnapshot:
        keys = self._keys
        commands: list[tuple[CommandArg, ...]] = [("XLEN", stream) for stream in keys.streams]
        commands += [("XINFO", "GROUPS", stream) for stream in keys.streams]
        commands += [("GET", keys.bytes_counter), ("GET", keys.drained_counter),
                     ("XLEN", keys.dead_letters), ("HGETALL", keys.processing_stats),
                     ("INFO", "memory")]
        try:
            replies = await self._redis.pipeline(commands, timeout_s=self._timeout_s)
            snapshot = self._read(replies)
        except (MlrunError, ProtocolError) as exc:
            self.failed_refreshes += 1
            message = getattr(exc, "message", str(exc))
            if self._snapshot.reachable:
                logger.warning("the ingest queue is unreachable: %s", message)
            self._snapshot = QueueSnapshot(reachable=False, error=message)
            return self._snapshot
        if not self._snapshot.reachable and self.refreshes:
            logger.info("the ingest queue is reachable again")
        self._note_drained(snapshot.drained_total, snapshot.drained_rows_total)
        self._snapshot = snapshot
        self._refreshed_at = anyio.current_time()
        self.refreshes += 1
        return snapshot

    def _read(self, replies: list[Reply]) -> QueueSnapshot:
        count = self._keys.partitions
        lengths, groups = replies[:count], replies[count:2 * count]
        queued_bytes, drained, dead_letters, processing, memory = replies[2 * count:]
        pending = lag = consumers = 0
        for reply in groups:
            if isinstance(reply, ReplyError):  # "no such key": a stream nobody wrote to yet
                continue
            for group in parse_xinfo_groups(reply):
                if group.name == self._group:
                    pending += group.pending
                    lag += group.lag or 0
                    consumers = max(consumers, group.consumers)
        info = parse_info(memory)
        stats = _hash(processing)
        return QueueSnapshot(
            reachable=True,
            entries=sum(_integer(length) for length in lengths),
            bytes=max(_integer(queued_bytes), 0),
            pending=pending,
            lag=lag,
            consumers=consumers,
            dead_letters=_integer(dead_letters),
            drained_total=_integer(drained),
            used_memory_bytes=int(info.get("used_memory", "0")),
            max_memory_bytes=int(info.get("maxmemory", "0")),
            drained_rows_total=stats.get(STAT_ROWS, 0),
            redelivered_total=stats.get(STAT_REDELIVERED, 0),
            inserts_total=stats.get(STAT_INSERTS, 0),
            insert_seconds_total=stats.get(STAT_INSERT_US, 0) / 1e6,
            insert_bucket_counts=tuple(stats.get(STAT_INSERT_BUCKET + b"%d" % index, 0)
                                       for index in range(len(DEFAULT_LATENCY_BUCKETS_S))),
        )

    def _note_drained(self, drained_total: int, drained_rows_total: int) -> None:
        now = anyio.current_time()
        previous = self._snapshot if self._snapshot.reachable else None
        if (previous is None or drained_total < previous.drained_total
                or not math.isfinite(self._refreshed_at)):
            return  # first sight, or the counter went back (a Redis that lost its data)
        if drained_total > previous.drained_total:
            elapsed_s = max(now - self._refreshed_at, 1e-3)
            rate = (drained_total - previous.drained_total) / elapsed_s
            rows_rate = max(drained_rows_total - previous.drained_rows_total, 0) / elapsed_s
            recent = anyio.current_time() - self._last_drain_at <= _DRAIN_MEMORY_S
            self._drain_rate = 0.7 * self._drain_rate + 0.3 * rate if recent else rate
            self._drain_rate_rows = (0.7 * self._drain_rate_rows + 0.3 * rows_rate if recent
                                     else rows_rate)
            self._last_drain_at = now


def _hash(reply: Reply) -> dict[bytes, int]:
    """HGETALL of the processing hash: field -> integer (an absent hash is empty)."""
    if isinstance(reply, ReplyError):
        raise ProtocolError(f"redis answered {reply.kind} to a queue statistics command")
    if not isinstance(reply, list) or len(reply) % 2:
        raise ProtocolError("unexpected reply to HGETALL")
    fields = reply[0::2]
    return {field: _integer(value) for field, value in zip(fields, reply[1::2], strict=True)
            if isinstance(field, bytes)}


def _integer(reply: Reply) -> int:
    """An integer reply, or a GET of a counter (bulk digits, nil for zero)."""
    if reply is None:
        return 0
    if isinstance(reply, int):
        return reply
    if isinstance(reply, bytes):
        try:
            return int(reply)
        except ValueError:
            raise ProtocolError("a counter holds something that is not a number") from None
    if isinstance(reply, ReplyError):
        raise ProtocolError(f"redis answered {reply.kind} to a queue statistics command")
    raise ProtocolError("unexpected reply to a queue statistics command")
