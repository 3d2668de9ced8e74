"""Bounded ingest pipelines and their group-commit writers: the engine of the in-process write
path (`mlrun.server.pipelines.clickhouse_write_path`), independent of what it flushes into.

Owns: admission (capacity reserved in rows and bytes: at once, or waited for in FIFO order
for a bounded time), the bounded queue between request handlers and one writer task per sink,
group commit, and the answer each request gets about its own data.

    handler: reserve_all(...)  --full-->  Overloaded (HTTP 429 + Retry-After / RESOURCE_EXHAUSTED)
             await reserve(rows, nbytes, wait_s=...)   (full: wait up to wait_s for room, then
                                                        Overloaded)
             submit_nowait(...) -> Ticket     (cannot block or fail: capacity was reserved)
             await ticket.wait(timeout_s)     -> committed | BackendTimeout 503 | the flush error
    writer:  take every queued item (up to max_flush_bytes), one flush, answer each ticket

Invariants:
- Memory is bounded: queued + in-flight payloads never exceed `max_rows` / `max_bytes`; a
  reservation is released only when the writer is done with the item (committed or failed),
  or when the request gives up before submitting.
- A ticket says "committed" only after the flush that carried its payload returned without
  error. A request that stops waiting (deadline) gets a retryable 503; its payload may still be
  written later, which is safe because the client retries with the same batch id and storage
  deduplicates by (run, metric, step).
- A flush that fails with an outage (BackendUnavailable) is retried with back-off for as long
  as some request still waits for it; a rejected payload (BackendError) fails its tickets.
- A request that touches several pipelines reserves in all of them or in none (`reserve_all`).
- Waiting for room (`reserve`) is bounded twice: in time (`wait_s`, the caller's deadline) and
  in size (what waits may not exceed the pipeline's own `max_rows` / `max_bytes` / item count;
  past that, Overloaded at once). Room freed by a release goes to the waiters in arrival order,
  and nobody takes room past a waiter (`reserve_nowait` answers Overloaded while one waits).
  Which pipelines may wait is the write path's choice: one whose fullness means its backend is
  behind answers 429 instead (the direct path); one that only buffers for a fast broker waits
  (the queued path's XADD buffer).

Retry-After is derived from the observed drain rate: queued rows / rows-per-second of recent
flushes, in whole seconds, at least 1; with no successful flush lately it is a fixed 5 s.

Each item may carry an opaque `tag`; after a flush committed, the writer hands the tags of its
items to `on_committed` (the write path uses it to mark ledger rows from the writer's side, not
the request's, so a request that stopped waiting still gets its batch marked).

Must not import storage drivers or the HTTP/gRPC edges: a writer flushes through an injected
`flush(payload, rows)` coroutine function.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mlrun.server.errors import BackendError, BackendTimeout, BackendUnavailable, Overloaded
from mlrun.server.telemetry import Histogram
from mlrun.wire.error_codes import ErrorCode

logger = logging.getLogger("mlrun.pipeline")

Flush = Callable[[bytes, int], Awaitable[None]]
OnCommitted = Callable[[list[object]], None]

_STALE_DRAIN_S = 5.0
_MAX_RETRY_AFTER_S = 30


class PipelineStatistics(msgspec.Struct, frozen=True):
    name: str
    queued_rows: int
    queued_bytes: int
    max_rows: int
    max_bytes: int
    admitted_requests: int
    rejected_requests: int
    committed_rows: int
    flushes: int
    flush_errors: int
    abandoned_requests: int
    drain_rate_rows_per_s: float
    last_flush_duration_s: float
    waiting_requests: int = 0
    admitted_after_wait: int = 0
    wait_timeouts: int = 0


@dataclass(eq=False, slots=True)
class _Item:
    payload: bytes
    rows: int
    reservation: Reservation
    tag: object = None
    done: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None
    abandoned: bool = False

    def finish(self, error: Exception | None = None) -> None:
        self.error = error
        self.reservation.release()
        self.done.set()


class Reservation:
    """Capacity held in one pipeline for one request; release() is idempotent. `waited`: it
    was granted after a wait for room (`Pipeline.reserve`)."""

    __slots__ = ("_pipeline", "_released", "nbytes", "rows", "waited")

    def __init__(self, pipeline: Pipeline, rows: int, nbytes: int) -> None:
        self._pipeline = pipeline
        self.rows = rows
        self.nbytes = nbytes
        self._released = False
        self.waited = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pipeline._queued_rows -= self.rows
            self._pipeline._queued_bytes -= self.nbytes
            self._pipeline._grant_waiters()


@dataclass(eq=False, slots=True)
class _Waiter:
    """A request waiting for room; `granted` is set (and `ready` fired) when room went to it."""

    rows: int
    nbytes: int
    ready: anyio.Event = field(default_factory=anyio.Event)
    granted: Reservation | None = None


class Ticket:
    """What a handler awaits: the fate of its own payload."""

    __slots__ = ("_item", "_pipeline")

    def __init__(self, pipeline: Pipeline, item: _Item) -> None:
        self._pipeline = pipeline
        self._item = item

    async def wait(self, timeout_s: float) -> None:
        with anyio.move_on_after(timeout_s):
            await self._item.done.wait()
        if not self._item.done.is_set():
            self._item.abandoned = True
            self._pipeline._abandoned += 1
            raise BackendTimeout(
                f"the {self._pipeline.name} write was not committed within {timeout_s:g}s; "
                "retry with the same batch_id",
                backend=self._pipeline.backend,
                code=ErrorCode.COMMIT_TIMEOUT,
            )
        if self._item.error is not None:
            raise self._item.error


class Pipeline:
    def __init__(
        self,
        name: str,
        *,
        backend: str,
        max_rows: int,
        max_bytes: int,
        max_items: int = 4096,
    ) -> None:
        self.name = name
        self.backend = backend
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._queued_rows = 0
        self._queued_bytes = 0
        self._admitted = 0
        self._rejected = 0
        self._abandoned = 0
        self._committed_rows = 0
        self._flushes = 0
        self._flush_errors = 0
        self._drain_rate = 0.0
        self._last_flush_ok_at = -math.inf
        self._last_flush_duration_s = 0.0
        self.flush_latency = Histogram()
        self._closed = False
        # Items are bounded twice: by rows/bytes through reservations, and by count here, so
        # submit_nowait after a successful reservation can never find the stream full.
        self._max_items = max_items
        self._items_in_queue = 0
        # Requests waiting for room (`reserve`), in arrival order, and what they wait for.
        self._waiters: deque[_Waiter] = deque()
        self._waiting_rows = 0
        self._waiting_bytes = 0
        self._admitted_after_wait = 0
        self._wait_timeouts = 0
        self._send: MemoryObjectSendStream[_Item]
        self._receive: MemoryObjectReceiveStream[_Item]
        self._send, self._receive = anyio.create_memory_object_stream[_Item](max_items)

    # --- handler side -----------------------------------------------------------------------

    def reserve_nowait(self, rows: int, nbytes: int) -> Reservation:
        self._check_open()
        if self._waiters or not self._fits(rows, nbytes):
            self._rejected += 1
            raise self._full()
        return self._take(rows, nbytes)

    async def reserve(self, rows: int, nbytes: int, *, wait_s: float) -> Reservation:
        """Like `reserve_nowait`, but when the pipeline is full, wait up to `wait_s` for room
        (in arrival order) instead of refusing; Overloaded once that passes, or at once when
        what already waits is as large as the pipeline itself."""
        self._check_open()
        if not self._waiters and self._fits(rows, nbytes):
            return self._take(rows, nbytes)
        if (wait_s <= 0 or len(self._waiters) >= self._max_items
                or self._waiting_rows + rows > self.max_rows
                or self._waiting_bytes + nbytes > self.max_bytes):
            self._rejected += 1
            raise self._full()
        waiter = _Waiter(rows, nbytes)
        self._waiters.append(waiter)
        self._waiting_rows += rows
        self._waiting_bytes += nbytes
        try:
            with anyio.move_on_after(wait_s):
                await waiter.ready.wait()
        except BaseException:  # cancelled: give back what may have been granted meanwhile
            if waiter.granted is not None:
                waiter.granted.release()
            self._forget(waiter)
            raise
        if waiter.granted is None:
            self._forget(waiter)
            self._check_open()
            self._wait_timeouts += 1
            self._rejected += 1
            raise self._full()
        self._admitted_after_wait += 1
        return waiter.granted

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable(
                "the server is shutting down; retry against another server or later",
                backend=self.backend,
                code=ErrorCode.SHUTTING_DOWN,
            )

    def _fits(self, rows: int, nbytes: int) -> bool:
        return (self._queued_rows + rows <= self.max_rows
                and self._queued_bytes + nbytes <= self.max_bytes
                and self._items_in_queue < self._max_items)

    def _full(self) -> Overloaded:
        return Overloaded(
            f"the {self.name} pipeline is full ({self._queued_rows} rows queued); "
            "retry the same batch after Retry-After",
            retry_after_s=self.retry_after_s(),
        )

    def _take(self, rows: int, nbytes: int) -> Reservation:
        self._queued_rows += rows
        self._queued_bytes += nbytes
        return Reservation(self, rows, nbytes)

    def _forget(self, waiter: _Waiter) -> None:
        """Take a waiter out of the line (no-op once it was granted or forgotten)."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            self._waiting_rows -= waiter.rows
            self._waiting_bytes -= waiter.nbytes

    def _grant_waiters(self) -> None:
        """Hand freed room to the waiters, first come first served, while it fits."""
        while self._waiters and not self._closed:
            waiter = self._waiters[0]
            if not self._fits(waiter.rows, waiter.nbytes):
                return
            self._forget(waiter)
            waiter.granted = self._take(waiter.rows, waiter.nbytes)
            waiter.granted.waited = True
            waiter.ready.set()

    def submit_nowait(self, reservation: Reservation, payload: bytes, rows: int,
                      tag: object = None) -> Ticket:
        """Queue a payload under its reservation (shrunk to the payload's real size). `tag`
        comes back through the writer's `on_committed` once the payload is committed."""
        if reservation._pipeline is not self:
            raise ValueError("reservation belongs to another pipeline")
        # The payload may be smaller than reserved (names dropped by guardrails, or the
        # estimate was generous); give the difference back now.
        if rows < reservation.rows or len(payload) < reservation.nbytes:
            self._queued_rows -= reservation.rows - min(rows, reservation.rows)
            self._queued_bytes -= reservation.nbytes - min(len(payload), reservation.nbytes)
            reservation.rows = min(rows, reservation.rows)
            reservation.nbytes = min(len(payload), reservation.nbytes)
            self._grant_waiters()
        item = _Item(payload=payload, rows=rows, reservation=reservation, tag=tag)
        self._items_in_queue += 1
        self._send.send_nowait(item)
        self._admitted += 1
        return Ticket(self, item)

    def retry_after_s(self) -> int:
        now = anyio.current_time()
        if self._drain_rate <= 0 or now - self._last_flush_ok_at > _STALE_DRAIN_S:
            return int(_STALE_DRAIN_S)
        seconds = math.ceil(self._queued_rows / self._drain_rate)
        return max(1, min(_MAX_RETRY_AFTER_S, seconds))

    def statistics(self) -> PipelineStatistics:
        return PipelineStatistics(
            name=self.name,
            queued_rows=self._queued_rows,
            queued_bytes=self._queued_bytes,
            max_rows=self.max_rows,
            max_bytes=self.max_bytes,
            admitted_requests=self._admitted,
            rejected_requests=self._rejected,
            committed_rows=self._committed_rows,
            flushes=self._flushes,
            flush_errors=self._flush_errors,
            abandoned_requests=self._abandoned,
            drain_rate_rows_per_s=round(self._drain_rate, 1),
            last_flush_duration_s=round(self._last_flush_duration_s, 6),
            waiting_requests=len(self._waiters),
            admitted_after_wait=self._admitted_after_wait,
            wait_timeouts=self._wait_timeouts,
        )

    def close(self) -> None:
        """No new reservations (waiters are refused too); the writer drains what is queued
        and then returns."""
        if not self._closed:
            self._closed = True
            self._send.close()
            for waiter in self._waiters:
                waiter.ready.set()

    # --- writer side --------------------------------------------------------------------------

    async def serve_writer(
        self,
        flush: Flush,
        *,
        on_committed: OnCommitted | None = None,
        max_flush_bytes: int = 32 * 1024 * 1024,
        flush_timeout_s: float = 5.0,
        max_backoff_s: float = 2.0,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until the pipeline is closed and drained (or cancelled)."""
        task_status.started()
        async with self._receive:
            while True:
                try:
                    first = await self._receive.receive()
                except anyio.EndOfStream:
                    return
                batch = [first]
                batch_bytes = len(first.payload)
                while batch_bytes < max_flush_bytes:
                    try:
                        item = self._receive.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    batch.append(item)
                    batch_bytes += len(item.payload)
                self._items_in_queue -= len(batch)
                await self._flush_with_retry(
                    batch, flush, on_committed,
                    flush_timeout_s=flush_timeout_s, max_backoff_s=max_backoff_s,
                )

    async def _flush_with_retry(
        self,
        batch: Sequence[_Item],
        flush: Flush,
        on_committed: OnCommitted | None,
        *,
        flush_timeout_s: float,
        max_backoff_s: float,
    ) -> None:
        backoff_s = 0.05
        pending = list(batch)
        try:
            while True:
                # Nobody waits for an abandoned item any more and its client will retry: drop
                # it rather than keep a stalled backend's queue growing.
                for item in [i for i in pending if i.abandoned]:
                    item.finish(BackendTimeout("abandoned", backend=self.backend))
                pending = [i for i in pending if not i.abandoned]
                if not pending:
                    return
                payload = b"".join(i.payload for i in pending)
                rows = sum(i.rows for i in pending)
                started = anyio.current_time()
                try:
                    with anyio.fail_after(flush_timeout_s):
                        await flush(payload, rows)
                except (BackendUnavailable, TimeoutError) as exc:
                    self._flush_errors += 1
                    logger.warning("%s flush of %d rows failed (%s); retrying in %.2fs",
                                   self.name, rows, _describe(exc), backoff_s)
                    await anyio.sleep(backoff_s)  # retry back-off
                    backoff_s = min(backoff_s * 2, max_backoff_s)
                    continue
                except BackendError as exc:
                    self._flush_errors += 1
                    logger.error("%s flush of %d rows rejected by %s: %s", self.name, rows,
                                 exc.backend, exc.detail or exc.message)
                    for item in pending:
                        item.finish(exc)
                    pending = []
                    return
                duration_s = anyio.current_time() - started
                self._record_flush(rows, duration_s)
                # Abandoned items were committed too (a timed-out request's batch may have
                # been in this flush): their tags go to on_committed like everyone's.
                if on_committed is not None:
                    on_committed([item.tag for item in pending if item.tag is not None])
                for item in pending:
                    item.finish()
                pending = []
                return
        finally:
            # Cancelled mid-flush (shutdown deadline): answer whoever still waits.
            for item in pending:
                if not item.done.is_set():
                    item.finish(BackendUnavailable("the server stopped before this write "
                                                   "committed; retry", backend=self.backend))

    def _record_flush(self, rows: int, duration_s: float) -> None:
        self._flushes += 1
        self._committed_rows += rows
        self._last_flush_duration_s = duration_s
        self.flush_latency.observe(duration_s)
        now = anyio.current_time()
        # Rate over the flush itself; an EWMA smooths bursty group sizes.
        rate = rows / max(duration_s, 1e-4)
        self._drain_rate = rate if self._drain_rate <= 0 else 0.7 * self._drain_rate + 0.3 * rate
        self._last_flush_ok_at = now


def reserve_all(requests: Sequence[tuple[Pipeline, int, int]]) -> list[Reservation]:
    """Reserve (rows, bytes) in several pipelines: all or none."""
    reservations: list[Reservation] = []
    try:
        for pipeline, rows, nbytes in requests:
            reservations.append(pipeline.reserve_nowait(rows, nbytes))
    except BaseException:
        for reservation in reservations:
            reservation.release()
        raise
    return reservations


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "code", type(exc).__name__)
