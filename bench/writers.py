"""K writers for a fixed duration: the loop every workload shares, and what it counts.

Owns: running K writer threads that start together and stop at one deadline; each writer's
retry discipline (the SDK's: honour 429 `Retry-After`, retry the same batch after a retryable
failure, give up on anything else); and the tally of requests, acknowledged points, throttles,
errors and per-request latency.

Why threads with blocking clients, not anyio tasks: measured on this 2-core machine (1000-row,
44 KB POSTs to ClickHouse, CPU of the client process per request): httpx.Client in threads
~0.8-1.1 ms, httpx.AsyncClient on trio ~1.3-2.7 ms (worse as K grows), the standard library's
`http.client` in threads ~0.18 ms. The load generator shares two cores with the server and its
backends, so its writers use `http.client` (HTTP) and grpcio's blocking stubs (gRPC, whose
C core releases the GIL while it waits); grpcio's asyncio API would not run on trio anyway.
There is no event loop in the bench, so blocking calls block nothing but their own thread.

Invariants:
- Bounded in time: no batch starts after `stop_at`; a throttled batch whose wait would pass
  `stop_at` is dropped (a 429 means nothing was admitted); a batch that may have been stored
  (a retryable failure) is retried until `give_up_at` and then counted as unresolved. Every
  request has its own client-side timeout, so every thread ends by `give_up_at` + that timeout.
- Bounded in count: at most `max_batches` batches and `max_attempts` attempts per batch.
- Latency is measured per request attempt that was acknowledged (waits for `Retry-After` and
  back-off are not part of it); throttled and failed attempts are counted, not timed.

Must not import anyio or trio.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from bench.batches import Batch

P = TypeVar("P")

_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0
# Why a writer stopped, when nothing went wrong (anything else is reported as a problem).
DEADLINE = "deadline"
DEADLINE_WHILE_THROTTLED = "deadline while throttled"
NORMAL_STOPS = frozenset({DEADLINE, DEADLINE_WHILE_THROTTLED})
_START_TIMEOUT_S = 30.0  # all writer threads reach the start barrier in microseconds


@dataclass(frozen=True, slots=True)
class Acked:
    """The server (or ClickHouse) acknowledged the batch: it is durable."""

    latency_s: float
    duplicate: bool = False
    server_accepted: int | None = None  # what the server said it stored (None: not reported)


@dataclass(frozen=True, slots=True)
class Throttled:
    """429 / RESOURCE_EXHAUSTED: nothing was admitted; send the same batch after the delay."""

    retry_after_s: float


@dataclass(frozen=True, slots=True)
class Failed:
    """Any other answer. `retryable`: the batch may or may not have been stored (503, timeout,
    broken connection) and a retry with the same batch id is safe. `kind` is a short, stable
    label for the tally (e.g. `503 backend_timeout`, `UNIMPLEMENTED`, `ConnectionResetError`)."""

    kind: str
    retryable: bool
    detail: str = ""


Outcome = Acked | Throttled | Failed


class Sender(Protocol[P]):
    """One writer's connection: encodes a batch once, sends it (again on retries)."""

    def encode(self, batch: Batch) -> P: ...

    def send(self, payload: P) -> Outcome: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class WriterTally:
    """What one writer did; only its own thread writes it, the harness reads it after join."""

    requests: int = 0
    acked_batches: int = 0
    acked_points: int = 0
    duplicates: int = 0
    accepted_mismatches: int = 0  # acknowledged, but the server reported storing another count
    throttled: int = 0
    retry_after_s_total: float = 0.0
    unresolved_points: int = 0  # may or may not be stored: never acknowledged, not throttled
    errors: Counter[str] = field(default_factory=Counter)
    error_details: dict[str, str] = field(default_factory=dict)  # first detail per kind
    latencies_s: list[float] = field(default_factory=list)
    stopped_by: str = DEADLINE


@dataclass(frozen=True, slots=True)
class Limits:
    duration_s: float
    grace_s: float  # how long after the deadline a maybe-stored batch is still retried
    max_batches: int
    max_attempts: int = 50


@dataclass(frozen=True, slots=True)
class WorkloadRun:
    """The tallies of all writers of one workload and the wall time they took together."""

    tallies: tuple[WriterTally, ...]
    elapsed_s: float  # start barrier -> last writer finished
    stuck_writers: int  # threads still running after the join deadline (should be 0)

    @property
    def acked_points(self) -> int:
        return sum(t.acked_points for t in self.tallies)

    @property
    def unresolved_points(self) -> int:
        return sum(t.unresolved_points for t in self.tallies)

    def latencies_s(self) -> list[float]:
        return [latency for t in self.tallies for latency in t.latencies_s]

    def errors(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for tally in self.tallies:
            total.update(tally.errors)
        return total


class _Writer(Generic[P]):
    def __init__(self, sender: Sender[P], make: Callable[[int], Batch], limits: Limits) -> None:
        self.sender = sender
        self.make = make
        self.limits = limits
        self.tally = WriterTally()
        # Set by the harness when every writer is ready, so all start at the same moment.
        self.stop_at = 0.0
        self.give_up_at = 0.0
        self.finished_at = 0.0

    def run(self, start: threading.Barrier) -> None:
        try:
            start.wait(timeout=_START_TIMEOUT_S)
            for seq in range(self.limits.max_batches):
                if time.monotonic() >= self.stop_at or not self._deliver(self.make(seq)):
                    return
            self.tally.stopped_by = "max_batches"
        except Exception as exc:  # a bug in a sender must end this writer, visibly, not hang
            self.tally.errors[f"crash {type(exc).__name__}"] += 1
            self.tally.error_details.setdefault(f"crash {type(exc).__name__}", str(exc)[:300])
            self.tally.stopped_by = "crash"
        finally:
            self.finished_at = time.monotonic()
            self.sender.close()

    def _deliver(self, batch: Batch) -> bool:
        """Send one batch until acknowledged; False when the writer must stop."""
        tally = self.tally
        payload = self.sender.encode(batch)
        maybe_stored = False
        backoff_s = _BACKOFF_FIRST_S
        for _ in range(self.limits.max_attempts):
            outcome = self.sender.send(payload)
            tally.requests += 1
            if isinstance(outcome, Acked):
                tally.acked_batches += 1
                tally.acked_points += batch.points
                tally.latencies_s.append(outcome.latency_s)
                tally.duplicates += outcome.duplicate
                if (
                    not outcome.duplicate
                    and outcome.server_accepted is not None
                    and outcome.server_accepted != batch.points
                ):
                    tally.accepted_mismatches += 1
                return True
            now = time.monotonic()
            if isinstance(outcome, Throttled):
                tally.throttled += 1
                tally.retry_after_s_total += outcome.retry_after_s
                wait_until = now + outcome.retry_after_s
                limit = self.give_up_at if maybe_stored else self.stop_at
                if wait_until >= limit:
                    # Not a failure: the workload is over before the server wants the batch.
                    return self._stop(batch, maybe_stored, DEADLINE_WHILE_THROTTLED)
                time.sleep(outcome.retry_after_s)  # the server said how long; honour it
                continue
            tally.errors[outcome.kind] += 1
            tally.error_details.setdefault(outcome.kind, outcome.detail[:300])
            if not outcome.retryable:
                # A 4xx/5xx that a retry cannot fix: a bug in the bench or in the server.
                # Continuing would repeat it for the whole duration; stop this writer.
                return self._stop(batch, True, f"non-retryable {outcome.kind}")
            maybe_stored = True
            if now + backoff_s >= self.give_up_at:
                return self._stop(batch, maybe_stored, "retries past the grace period")
            time.sleep(backoff_s)  # back-off before retrying the same batch id
            backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)
        return self._stop(batch, maybe_stored, "max attempts")

    def _stop(self, batch: Batch, maybe_stored: bool, reason: str) -> bool:
        if maybe_stored:
            self.tally.unresolved_points += batch.points
        self.tally.stopped_by = reason
        return False


def run_writers(
    senders: Sequence[Sender[P]],
    make_batch: Callable[[int, int], Batch],
    limits: Limits,
    *,
    request_timeout_s: float,
) -> WorkloadRun:
    """Run one writer thread per sender for `limits.duration_s`; `make_batch(writer, seq)`.

    Senders are closed by their writers. Returns once every thread has ended, or after the
    join deadline (every request has a timeout, so that only happens on a bug: reported).
    """
    writers = [
        _Writer(sender, functools.partial(make_batch, index), limits)
        for index, sender in enumerate(senders)
    ]
    started_at = 0.0

    def release() -> None:
        # Runs once, in the last thread to reach the barrier, before any thread proceeds.
        nonlocal started_at
        started_at = time.monotonic()
        for writer in writers:
            writer.stop_at = started_at + limits.duration_s
            writer.give_up_at = writer.stop_at + limits.grace_s

    barrier = threading.Barrier(len(writers), action=release)
    threads = [
        threading.Thread(target=writer.run, args=(barrier,), name=f"bench-writer-{index}",
                         daemon=True)
        for index, writer in enumerate(writers)
    ]
    for thread in threads:
        thread.start()
    join_deadline = (
        time.monotonic() + limits.duration_s + limits.grace_s + 2 * request_timeout_s + 5.0
    )
    for thread in threads:
        thread.join(timeout=max(0.0, join_deadline - time.monotonic()))
    stuck = sum(thread.is_alive() for thread in threads)
    ended_at = time.monotonic() if stuck else max(writer.finished_at for writer in writers)
    return WorkloadRun(
        tallies=tuple(writer.tally for writer in writers),
        elapsed_s=max(ended_at - started_at, 1e-9) if started_at else 0.0,
        stuck_writers=stuck,
    )
