"""Group commit for PostgreSQL calls: the calls of requests that arrive while a statement is in
flight go to PostgreSQL together, as ONE statement in ONE worker-thread hop.

Owns: `StatementGroups`, a leader/follower queue in front of an `execute(items) -> answers`
coroutine function (the statement itself, and what each answer means, belong to its owner:
`storage.postgres.metadata` groups the common batch's ledger claims with it).

    submit(item), nothing in flight  -> this caller leads: execute([item]) at once
    submit(item), a statement in flight -> queued; when the statement ends, the first queued
                                        caller is handed the lead and executes everything queued
                                        (itself included) as one group; the others are answered
                                        from it

Why a leader and not a background task: no task to start or stop, so every `MetadataStore`
(server, processor, tests) groups without wiring; and the first call of a quiet server pays
nothing for the grouping (no queue hop, no extra task switch).

Invariants:
- At most ONE group of a `StatementGroups` is in flight; the queue is bounded (`max_queued`).
  A caller that finds it full does not wait for a place: it executes its item alone, as an
  ungrouped call would (the pool's limiter bounds those). `max_queued=0` turns grouping off
  (every item alone: the reference `bench.claims` measures the grouping against).
- Every await has a deadline. A queued caller waits at most `wait_timeout_s` (the statement in
  flight, then its own group), then leaves the queue with errors.BackendTimeout. The leader runs
  the group shielded from its own cancellation (the group's other callers depend on it) but
  bounded by `wait_timeout_s`; a cancellation that arrived meanwhile is re-raised afterwards.
- A queued caller that is cancelled (or times out) leaves the queue and re-raises; if it had just
  been handed the lead, it hands the lead on first, so the queue never stalls. A caller whose
  item is already in an executing group just stops waiting; its item's effect still happens
  (the owner's statement must be safe for that: a ledger claim left 'pending' is).
- An exception of `execute` reaches every caller of the group (the same instance, its traceback
  reset at each raise); an owner that wants per-item errors returns them as answers instead.

Why group at all, and why this way (issue 15; numbers from a 2-core box shared with four other
engineers, load average 10-17): a PostgreSQL call from the event loop costs the server
~0.6-0.8 ms of CPU whatever the statement (worker-thread hop, the call's task group and cancel
watcher, psycopg), so the common batch's claim, one statement per batch, was the largest
PostgreSQL cost per point (~0.75 us/pt for 1000-point batches). One statement per group divides
that by the group's size and adds a few microseconds per follower (an event, a cancel scope).
`python -m bench.claims`, grouped against one statement per claim in the same run: 8 writers
801 -> 376 us of CPU per claim (4.3 claims per statement), 32 writers 735 -> 182 us (16 per
statement). In a whole server at 32 writers the claims went 4-5 to a statement and its CPU
per point fell ~0.6 us (3.10 -> 2.45 gRPC, 3.19 -> 2.56 HTTP, medians of 5 alternated runs);
at 8 writers few claims overlap and no change shows through the noise. No linger: a claim
never waits for company, only for the statement in flight (a fraction of a millisecond), so a
quiet server's latency is unchanged. One group in flight, not
several: more would split the queue and shrink the groups, and one statement per process at a
time is far below what PostgreSQL takes. The price: a statement that waits on a lock (a
concurrent transaction holding the same ledger key) delays the claims queued behind it, up to
the statement deadline; such waits last as long as a claim transaction, i.e. milliseconds.

Must not import: trio or asyncio (anyio only), psycopg, the edges, the use-cases, ClickHouse.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel
import msgspec

from mlrun.server import errors

I = TypeVar("I")  # noqa: E741 - the item type, next to A for the answer type
A = TypeVar("A")

_BACKEND = "postgres"


class StatementGroupStatistics(msgspec.Struct, frozen=True):
    """Counters since start: `statements` executed (grouped or alone), `items` they carried,
    `largest` group, `overflows` (items executed alone because the queue was full),
    `abandoned` (callers that stopped waiting: cancelled or out of time)."""

    statements: int
    items: int
    largest: int
    overflows: int
    abandoned: int


@dataclass(eq=False, slots=True)
class _Waiter(Generic[I, A]):
    item: I
    wakeup: anyio.Event = field(default_factory=anyio.Event)
    lead: bool = False  # handed the lead (and still first in the queue)
    settled: bool = False  # answered (or failed) by a group
    answer: A | None = None
    error: BaseException | None = None

    def result(self) -> A:
        if self.error is not None:
            # One instance for the whole group: each caller raises it with its own traceback.
            raise self.error.with_traceback(None)
        if not self.settled:
            raise errors.BackendTimeout(
                "the grouped PostgreSQL statement did not finish", backend=_BACKEND)
        return self.answer  # type: ignore[return-value]  # settled without error: an A


class StatementGroups(Generic[I, A]):
    """See the module docstring. `execute` must return one answer per item, in order."""

    def __init__(
        self,
        execute: Callable[[Sequence[I]], Awaitable[Sequence[A]]],
        *,
        wait_timeout_s: float,
        max_queued: int = 1024,
    ) -> None:
        if wait_timeout_s <= 0:
            raise ValueError("wait_timeout_s must be positive")
        if max_queued < 0:
            raise ValueError("max_queued must not be negative")
        self._execute = execute
        self._wait_timeout_s = wait_timeout_s
        self._max_queued = max_queued
        self._queue: deque[_Waiter[I, A]] = deque()
        self._leading = False  # a group is in flight, or the lead was handed on
        self._statements = 0
        self._items = 0
        self._largest = 0
        self._overflows = 0
        self._abandoned = 0

    def statistics(self) -> StatementGroupStatistics:
        return StatementGroupStatistics(
            statements=self._statements, items=self._items, largest=self._largest,
            overflows=self._overflows, abandoned=self._abandoned)

    async def submit(self, item: I) -> A:
        """The answer `execute` gave for `item`, executed alone or in a group."""
        if self._max_queued == 0:  # grouping off: every item its own statement
            return (await self._run([item]))[0]
        if self._leading and len(self._queue) >= self._max_queued:
            self._overflows += 1
            return (await self._run([item]))[0]
        waiter: _Waiter[I, A] = _Waiter(item)
        self._queue.append(waiter)
        if self._leading:
            await self._follow(waiter)
            if not waiter.lead:
                return waiter.result()
        else:
            self._leading = True
        return await self._lead(waiter)

    async def _follow(self, waiter: _Waiter[I, A]) -> None:
        """Wait until a group answered `waiter` or the lead was handed to it."""
        try:
            with anyio.move_on_after(self._wait_timeout_s):
                await waiter.wakeup.wait()
        except BaseException:
            self._leave(waiter)
            raise
        if not waiter.wakeup.is_set():
            self._leave(waiter)
            raise errors.BackendTimeout(
                f"PostgreSQL did not answer within {self._wait_timeout_s:g} s", backend=_BACKEND)

    async def _lead(self, waiter: _Waiter[I, A]) -> A:
        """Execute everything queued (`waiter` first) as one group; answer the others; hand the
        lead to whoever queued meanwhile."""
        group = list(self._queue)
        self._queue.clear()
        try:
            # Shielded: the others' answers depend on this statement, whatever happens to the
            # leader's own request; bounded all the same.
            with anyio.move_on_after(self._wait_timeout_s, shield=True):
                try:
                    answers = await self._run([w.item for w in group])
                except Exception as exc:
                    for w in group:
                        w.error = exc
                        w.settled = True
                else:
                    for w, answer in zip(group, answers, strict=True):
                        w.answer = answer
                        w.settled = True
        finally:
            for w in group:
                if w is not waiter:
                    w.wakeup.set()
            self._pass_lead()
        await anyio.lowlevel.checkpoint_if_cancelled()
        return waiter.result()

    async def _run(self, items: list[I]) -> Sequence[A]:
        self._statements += 1
        self._items += len(items)
        self._largest = max(self._largest, len(items))
        return await self._execute(items)

    def _leave(self, waiter: _Waiter[I, A]) -> None:
        """A queued caller stops waiting (cancelled or out of time)."""
        self._abandoned += 1
        if waiter in self._queue:  # not yet taken by a group (bounded: max_queued)
            self._queue.remove(waiter)
            if waiter.lead:  # handed the lead but will not take it: hand it on
                waiter.lead = False
                self._pass_lead()

    def _pass_lead(self) -> None:
        if self._queue:
            head = self._queue[0]
            head.lead = True
            head.wakeup.set()
        else:
            self._leading = False
