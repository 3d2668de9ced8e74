"""The processor of queued ingest (`mlrun process`): Redis stream entries into ClickHouse.

One `StreamProcessor` is one consumer of the deployment's group. Its loop, one round at a time:

    take   its own pending entries first (a restart under the same name), else, every
           claim interval, entries other consumers left idle for `claim_idle_s` (XAUTOCLAIM:
           they died), else new entries (XREADGROUP ... BLOCK, from every stream at once)
    decode a malformed or foreign entry is set aside for the dead-letter stream
    insert one INSERT per table for the whole round (group commit: whatever accumulated while
           the previous round ran is the next round's one large insert); an outage is retried
           with back-off, a rejected insert is split per entry so only the bad one is set aside
    ack    dead letters XADDed first, then one script per stream XACKs, XDELs and updates the
           queue's byte, drained-entry and drained-row counters, in one round trip, with this
           processor's telemetry since its last ack added to the deployment's processing hash
           (redeliveries, insert count, time and latency buckets: every process's /metrics
           shows them; best effort, a round whose ack had to be retried may miss its share)
    mark   the inserted batches' ledger rows via `LedgerMarker` (grouped, retried)

Up to `ROUNDS_IN_FLIGHT` (3) rounds run at once: the next round is read and inserted while
earlier inserts are still in flight, so a batch that arrives during an insert waits for a free
round, not for that insert to finish. Log -> visible is that wait plus one insert; traced at
nominal load, the oldest entry of a round had waited for a free round ~0.45 of an insert's
duration with two rounds and ~0.31 with three (the wait shrinks with the rounds, while the
insert's own time is ClickHouse's). Memory stays bounded: at most 3 x `read_entries` entries
are held. Entries of rounds in flight are never taken again by this processor's own claim.
Rounds of one run may commit out of order: harmless, see below.

Exactly once, visibly: an entry is acknowledged only after the insert that carried it
committed, so a processor killed at any point leaves its entries pending, and another claims
and inserts them again. Inserting twice is harmless: the rows carry the versions assigned at
admission, ClickHouse keeps one row per (run, metric, step) and every read deduplicates. The
ack script counts an entry as drained only when its XACK took it out of the pending list, so
two processors that inserted the same entry do not subtract it twice.

`close()` (SIGTERM) stops taking new entries: the rounds in flight are inserted and
acknowledged, the ledger marker makes its last attempt, and `serve` returns.

Must not import the edges or the use-cases.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

import anyio
import anyio.abc
import msgspec

from mlrun.server.errors import BackendError, BackendUnavailable, MlrunError
from mlrun.server.pipelines.ledger_marker import LedgerMarker
from mlrun.server.pipelines.stream_entries import (
    STAT_INSERT_BUCKET,
    STAT_INSERT_US,
    STAT_INSERTS,
    STAT_REDELIVERED,
    MalformedEntry,
    QueuedBatch,
    StreamKeys,
    decode_entry,
    entry_bytes,
)
from mlrun.server.protocols.clickhouse import METRIC_COLUMNS
from mlrun.server.protocols.redis_streams import (
    StreamEntry,
    parse_autoclaim_reply,
    parse_read_reply,
)
from mlrun.server.protocols.resp import CommandArg, ReplyError
from mlrun.server.storage.clickhouse.client import ClickHouse
from mlrun.server.storage.redis.client import RedisClient, raise_for_reply
from mlrun.server.telemetry import Histogram

logger = logging.getLogger("mlrun.processor")

T = TypeVar("T")

# XACK what was inserted, XDEL it (the stream holds only what is not yet in ClickHouse, so its
# length is the queue's), and move the counters by what this call really took out.
# KEYS: stream, byte counter, drained counter, processing hash (its field 'rows' is
# `STAT_ROWS`). ARGV: group, then id, bytes and rows (0 for an entry set aside) per entry.
ACK_SCRIPT: Final = """
local acked, freed, rows = 0, 0, 0
for i = 2, #ARGV, 3 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    acked = acked + 1
    freed = freed + tonumber(ARGV[i + 1])
    rows = rows + tonumber(ARGV[i + 2])
  end
end
if freed > 0 then redis.call('DECRBY', KEYS[2], freed) end
if acked > 0 then redis.call('INCRBY', KEYS[3], acked) end
if rows > 0 then redis.call('HINCRBY', KEYS[4], 'rows', rows) end
return acked
"""
DEAD_LETTER_MAX_ENTRIES: Final = 10_000
ROUNDS_IN_FLIGHT: Final = 3
_REDIS_TIMEOUT_S: Final = 5.0
_INSERT_TIMEOUT_S: Final = 30.0
_MAX_BACKOFF_S: Final = 2.0
_RATE_WINDOW_S: Final = 10.0
# ClickHouse errors that say the table, database or credentials are wrong, not the rows: a
# rejected insert with one of these is waited out like an outage; it must not send every entry
# to the dead letters.
_NOT_THE_ENTRIES_FAULT: Final = frozenset({
    60,   # UNKNOWN_TABLE
    81,   # UNKNOWN_DATABASE
    192,  # UNKNOWN_USER
    193,  # WRONG_PASSWORD
    194,  # REQUIRED_PASSWORD
    497,  # ACCESS_DENIED
    516,  # AUTHENTICATION_FAILED
})


class ProcessorStatistics(msgspec.Struct, frozen=True):
    consumer: str
    entries_read: int
    entries_committed: int
    rows_committed: int
    inserts: int
    insert_failures: int
    redelivered: int  # entries taken over from idle consumers or re-read from our own list
    dead_lettered: int
    redis_failures: int
    rows_per_s: float  # committed over the last ten seconds
    last_insert_duration_s: float


class StreamProcessor:
    def __init__(self, redis: RedisClient, clickhouse: ClickHouse, marker: LedgerMarker, *,
                 keys: StreamKeys, group: str, consumer: str, read_entries: int = 1000,
                 claim_idle_s: float = 30.0, block_s: float = 0.5,
                 before_ack: Callable[[], None] | None = None) -> None:
        self._redis = redis
        # A fault hook for the crash tests (MLRUN_FAULT_INJECTION); None in production.
        self._before_ack = before_ack
        self._clickhouse = clickhouse
        self.marker = marker
        self._keys = keys
        self._group = group
        self.consumer = consumer
        self._count_per_stream = max(1, read_entries // keys.partitions)
        self._claim_idle_ms = int(claim_idle_s * 1000)
        self._claim_interval_s = max(0.2, claim_idle_s / 2)
        self._block_ms = int(block_s * 1000)
        self._closed = anyio.Event()
        self.insert_latency = Histogram()
        self._recent: deque[tuple[float, int]] = deque()
        self._counts = dict.fromkeys(
            ("entries_read", "entries_committed", "rows_committed", "inserts",
             "insert_failures", "redelivered", "dead_lettered", "redis_failures"), 0)
        self._last_insert_duration_s = 0.0
        # This processor's share of the processing hash not yet added to it (see _publishable).
        self._unpublished_redelivered = 0
        self._unpublished_latency = Histogram()
        # (stream, id) of the entries of the rounds in flight (never claimed again by us).
        self._in_flight: set[tuple[bytes, bytes]] = set()

    # --- lifetime ------------------------------------------------------------------------------

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Consume until `close()`; then the round in flight finishes and the marks drain."""
        async with anyio.create_task_group() as marker_group:
            await marker_group.start(self.marker.serve)
            try:
                task_status.started()
                await self._consume()
            finally:
                self.marker.close()

    def close(self) -> None:
        self._closed.set()

    def statistics(self) -> ProcessorStatistics:
        now = anyio.current_time()
        while self._recent and now - self._recent[0][0] > _RATE_WINDOW_S:
            self._recent.popleft()
        return ProcessorStatistics(
            consumer=self.consumer, **self._counts,
            rows_per_s=round(sum(rows for _, rows in self._recent) / _RATE_WINDOW_S, 1),
            last_insert_duration_s=round(self._last_insert_duration_s, 6))

    # --- the loop ------------------------------------------------------------------------------

    async def _consume(self) -> None:
        """Take entries while a round is free and start a round for them; returns once closed
        and every round in flight is done."""
        rounds_free = anyio.Semaphore(ROUNDS_IN_FLIGHT)
        async with anyio.create_task_group() as rounds:
            groups_ready = False
            own_pending_left = True  # entries read by an earlier life of this consumer name
            next_claim_at = anyio.current_time()
            backoff_s = 0.0
            while not self._closed.is_set():
                await rounds_free.acquire()
                started = False
                try:
                    if self._closed.is_set():
                        break  # closed while waiting for a free round: take nothing more
                    if not groups_ready:
                        await self._ensure_groups()
                        groups_ready = True
                        continue
                    if own_pending_left:
                        # What an earlier life of this name left pending, or a read whose
                        # answer was lost (Redis delivered, the reply never arrived): taken
                        # back at once instead of after the claim timeout. Entries of our
                        # own rounds in flight are pending too: they stay theirs.
                        read = await self._read(b"0")
                        entries = [entry for entry in read
                                   if (entry.stream, entry.entry_id) not in self._in_flight]
                        own_pending_left = bool(entries)
                        self._note_redelivered(len(entries))
                        if entries:
                            await self._process(entries)
                        continue
                    if anyio.current_time() >= next_claim_at:
                        entries, more = await self._claim_idle()
                        next_claim_at = anyio.current_time() + (
                            0 if more else self._claim_interval_s)
                        self._note_redelivered(len(entries))
                    else:
                        entries = await self._read(b">")
                    if entries:
                        self._in_flight.update((e.stream, e.entry_id) for e in entries)
                        rounds.start_soon(self._round, entries, rounds_free)
                        started = True
                    backoff_s = 0.0
                except BackendUnavailable as exc:  # redis is down or restarting
                    self._counts["redis_failures"] += 1
                    own_pending_left = True  # a lost reply may have delivered entries to us
                    backoff_s = min(max(backoff_s * 2, 0.05), _MAX_BACKOFF_S)
                    logger.warning("cannot read the ingest queue (%s); retrying in %.2fs",
                                   exc.message, backoff_s)
                    with anyio.move_on_after(backoff_s):  # retry back-off; close() ends it
                        await self._closed.wait()
                finally:
                    if not started:
                        rounds_free.release()

    async def _round(self, entries: list[StreamEntry], rounds_free: anyio.Semaphore) -> None:
        try:
            await self._process(entries)
        finally:
            self._in_flight.difference_update((e.stream, e.entry_id) for e in entries)
            rounds_free.release()

    async def _read(self, after_id: bytes) -> list[StreamEntry]:
        """XREADGROUP from every stream: new entries (`>`, blocking a little) or this
        consumer's own pending ones (`0`)."""
        streams = self._keys.streams
        block: tuple[CommandArg, ...] = ("BLOCK", self._block_ms) if after_id == b">" else ()
        command = ("XREADGROUP", "GROUP", self._group, self.consumer,
                   "COUNT", self._count_per_stream, *block, "STREAMS", *streams,
                   *([after_id] * len(streams)))
        (reply,) = await self._redis.pipeline(
            [command], timeout_s=self._block_ms / 1000 + _REDIS_TIMEOUT_S)
        if isinstance(reply, ReplyError) and reply.kind == "NOGROUP":
            logger.warning("the consumer group is gone (redis lost its data?); creating it")
            await self._ensure_groups()
            return []
        entries = parse_read_reply(raise_for_reply(reply, "XREADGROUP"))
        self._counts["entries_read"] += len(entries)
        return entries

    async def _claim_idle(self) -> tuple[list[StreamEntry], bool]:
        """XAUTOCLAIM every stream's entries idle past the claim timeout; whether more wait."""
        streams = self._keys.streams
        replies = await self._redis.pipeline(
            [("XAUTOCLAIM", stream, self._group, self.consumer, self._claim_idle_ms, "0-0",
              "COUNT", self._count_per_stream) for stream in streams],
            timeout_s=_REDIS_TIMEOUT_S)
        entries: list[StreamEntry] = []
        more = False
        for stream, reply in zip(streams, replies, strict=True):
            if isinstance(reply, ReplyError) and reply.kind == "NOGROUP":
                continue  # a stream nobody wrote to yet; `_read` recreates lost groups
            claimed = parse_autoclaim_reply(stream, raise_for_reply(reply, "XAUTOCLAIM"))
            # Our own round in flight (say, an insert retried through a ClickHouse outage)
            # is idle to Redis too: it stays that round's.
            entries.extend(entry for entry in claimed.entries
                           if (entry.stream, entry.entry_id) not in self._in_flight)
            more = more or claimed.next_cursor != b"0-0"
        more = more and bool(entries)  # only our own rounds' entries are idle: wait
        if entries:
            logger.info("took over %d entries idle for over %.0fs (a processor died?)",
                        len(entries), self._claim_idle_ms / 1000)
        self._counts["entries_read"] += len(entries)
        return entries, more

    async def _ensure_groups(self) -> None:
        replies = await self._redis.pipeline(
            [("XGROUP", "CREATE", stream, self._group, "0", "MKSTREAM")
             for stream in self._keys.streams], timeout_s=_REDIS_TIMEOUT_S)
        for reply in replies:
            if not (isinstance(reply, ReplyError) and reply.kind == "BUSYGROUP"):
                raise_for_reply(reply, "XGROUP CREATE")

    # --- one round -----------------------------------------------------------------------------

    async def _process(self, entries: list[StreamEntry]) -> None:
        batches: list[QueuedBatch] = []
        rejects: list[tuple[StreamEntry, str]] = []
        entry_of = {(entry.stream, entry.entry_id): entry for entry in entries}
        for entry in entries:
            if entry.fields is None:
                continue  # pending, but its data is gone: only the ack is left to do
            try:
                batches.append(decode_entry(entry))
            except MalformedEntry as exc:
                rejects.append((entry, str(exc)))
        committed, refused = await self._insert(batches)
        rejects += [(entry_of[(batch.stream, batch.entry_id)], reason)
                    for batch, reason in refused]
        if self._before_ack is not None and committed:
            self._before_ack()
        rows_of = {(batch.stream, batch.entry_id): batch.rows for batch in committed}
        await self._retrying("acknowledge entries",
                             lambda: self._acknowledge(entries, rejects, rows_of))
        for batch in committed:
            if batch.identity.batch_id is not None:
                self.marker.note_committed_nowait(batch.identity.run_id, batch.identity.batch_id)
        rows = sum(batch.rows for batch in committed)
        self._counts["entries_committed"] += len(committed)
        self._counts["rows_committed"] += rows
        self._recent.append((anyio.current_time(), rows))

    async def _insert(self, batches: list[QueuedBatch]
                      ) -> tuple[list[QueuedBatch], list[tuple[QueuedBatch, str]]]:
        """Insert every batch in one INSERT per table; when ClickHouse rejects that, each
        alone, so one bad entry is all that is set aside. Returns (inserted, refused)."""
        if not batches:
            return [], []
        try:
            await self._retrying("insert into ClickHouse", lambda: self._insert_all(batches))
            return batches, []
        except BackendError as exc:
            if len(batches) == 1:
                logger.error("ClickHouse rejected entry %s: %s", batches[0].entry_id.decode(),
                             exc.detail or exc.message)
                return [], [(batches[0], f"ClickHouse rejected it: {exc.detail[:300]}")]
        inserted: list[QueuedBatch] = []
        refused: list[tuple[QueuedBatch, str]] = []
        for batch in batches:
            done, bad = await self._insert([batch])
            inserted += done
            refused += bad
        return inserted, refused

    async def _insert_all(self, batches: Sequence[QueuedBatch]) -> None:
        for table, payload in (("metrics", b"".join(b.metrics for b in batches)),
                               ("system_metrics", b"".join(b.system_metrics for b in batches))):
            if not payload:
                continue
            started = anyio.current_time()
            try:
                await self._clickhouse.insert_rowbinary(table, METRIC_COLUMNS, payload,
                                                        timeout_s=_INSERT_TIMEOUT_S)
            except BackendError as exc:
                self._counts["insert_failures"] += 1
                if exc.backend_code in _NOT_THE_ENTRIES_FAULT:
                    raise BackendUnavailable(f"ClickHouse cannot take inserts: {exc.message} "
                                             f"(code {exc.backend_code})",
                                             backend=exc.backend) from exc
                raise
            except MlrunError:
                self._counts["insert_failures"] += 1
                raise
            self._last_insert_duration_s = anyio.current_time() - started
            self.insert_latency.observe(self._last_insert_duration_s)
            self._unpublished_latency.observe(self._last_insert_duration_s)
            self._counts["inserts"] += 1

    def _note_redelivered(self, count: int) -> None:
        self._counts["redelivered"] += count
        self._unpublished_redelivered += count

    def _publishable(self) -> list[tuple[CommandArg, ...]]:
        """HINCRBYs that add this processor's telemetry since the last call to the
        deployment's processing hash. Taken out here, so a retried ack cannot add it twice."""
        latency, self._unpublished_latency = self._unpublished_latency, Histogram()
        redelivered, self._unpublished_redelivered = self._unpublished_redelivered, 0
        key = self._keys.processing_stats
        commands: list[tuple[CommandArg, ...]] = []
        if redelivered:
            commands.append(("HINCRBY", key, STAT_REDELIVERED, redelivered))
        if latency.total:
            commands += [("HINCRBY", key, STAT_INSERTS, latency.total),
                         ("HINCRBY", key, STAT_INSERT_US, round(latency.sum_s * 1e6))]
            commands += [("HINCRBY", key, STAT_INSERT_BUCKET + b"%d" % index, count)
                         for index, count in enumerate(latency.counts) if count]
        return commands

    async def _acknowledge(self, entries: Sequence[StreamEntry],
                           rejects: Sequence[tuple[StreamEntry, str]],
                           rows_of: dict[tuple[bytes, bytes], int]) -> None:
        """Dead letters first (a crash in between re-delivers, never loses), then the ack
        script per stream and the telemetry, all in one round trip."""
        keys = self._keys
        commands: list[tuple[CommandArg, ...]] = []
        for entry, reason in rejects:
            original = [part for name, value in (entry.fields or {}).items()
                        for part in (b"original." + name, value)]
            commands.append(("XADD", keys.dead_letters, "MAXLEN", "~", DEAD_LETTER_MAX_ENTRIES,
                             "*", "stream", entry.stream, "id", entry.entry_id,
                             "reason", reason, "consumer", self.consumer, *original))
        by_stream: dict[bytes, list[CommandArg]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).extend(
                (entry.entry_id, entry_bytes(entry),
                 rows_of.get((entry.stream, entry.entry_id), 0)))
        commands += [("EVAL", ACK_SCRIPT, 4, stream, keys.bytes_counter, keys.drained_counter,
                      keys.processing_stats, self._group, *ids_sizes_rows)
                     for stream, ids_sizes_rows in by_stream.items()]
        commands += self._publishable()
        replies = await self._redis.pipeline(commands, timeout_s=_REDIS_TIMEOUT_S)
        for reply in replies:
            raise_for_reply(reply, "XADD/EVAL")
        if rejects:
            self._counts["dead_lettered"] += len(rejects)
            logger.warning("moved %d malformed or rejected entries to %s: %s", len(rejects),
                           keys.dead_letters.decode(), rejects[0][1])

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt` until it works, backing off while its backend is unavailable. An outage
        never drops what was read: it waits (a shutdown deadline may cancel it, and then the
        entries stay pending for another processor)."""
        backoff_s = 0.05
        while True:
            try:
                return await attempt()
            except BackendUnavailable as exc:
                if exc.backend == "redis":
                    self._counts["redis_failures"] += 1
                logger.warning("could not %s (%s: %s); retrying in %.2fs", what, exc.backend,
                               exc.message, backoff_s)
            await anyio.sleep(backoff_s)  # retry back-off
            backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)

