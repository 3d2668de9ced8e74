"""The outbox: the one ordered queue of operations between the batcher and the sender, held
partly in memory and partly in the spool, with a hard memory bound.

Order: every operation gets its `pos` when pushed, and the sender takes them strictly in `pos`
order, whether they sit in memory or on disk (spool files are named by `pos`). So a spilled or
replayed batch never overtakes an older one, and the server's last-write-wins per (run, metric,
step) sees the writes in the order they were logged.

More than one in flight (`take(max_in_flight=N)`, the live sender's lanes): the next operation
may start while others are in flight only when the order between them cannot matter to the
server: all of them are metric batches without params or tags, and its (metric, step) and
(system metric, timestamp) ranges meet none of theirs. Run creation, finish, a batch with
params or tags (write-once params, last-value tags) and a batch re-logging steps of one in
flight wait until everything before them is acknowledged, as do all operations while offline.
So the server's versions (assigned at admission) order every pair of writes that share a key
exactly as they were logged, whatever order the concurrent batches are admitted in.
How many may be in flight at once is also bounded by the sender's window (`set_window`),
which it opens one batch at a time while the server acknowledges and closes to one on any
overload or outage answer.

Where an operation lives:
- memory (a deque, at most `max_memory_ops` entries) while the server keeps up;
- the spool when memory is full (the oldest in memory is spilled first), when the server is
  unreachable (`set_offline(True)` spills everything and new operations go straight to disk),
  or when a flush must make data durable (`spill(through_pos)`);
- "in flight" while the sender delivers it (it stays in the spool, if it is there, until
  acknowledged, so a crash mid-request replays it; the server answers that as a duplicate).

The memory bound, when the spool cannot take more (its size cap, or a disk error): the newest
operation is dropped, counted in `dropped_batches`/`dropped_points` and logged at ERROR — the
spool stays a gap-free prefix of what was logged. Run creation and finish are exempt from the
cap (tiny), so they are never dropped for size.

Thread-safety: every method takes the one lock; disk writes happen under it (they are bounded
by an fsync and keep the order simple). Must not import httpx, grpc or `mlrun.server`.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable

import msgspec

from mlrun.sdk.ops import BatchOp, DeadLetter, Op, decode_op, encode_dead_letter, encode_op, op_kind
from mlrun.sdk.spool import Spool, SpoolCorrupt, SpoolEntry, SpoolFull
from mlrun.sdk.statistics import Counters

logger = logging.getLogger("mlrun.sdk.outbox")

_INFINITY = float("inf")


class Outbox:
    def __init__(
        self,
        spool: Spool,
        *,
        max_memory_ops: int,
        counters: Counters,
        recovered: Iterable[SpoolEntry] = (),
    ) -> None:
        self._spool = spool
        self._max_memory_ops = max_memory_ops
        self._counters = counters
        self._changed = threading.Condition(threading.Lock())
        self._memory: deque[Op] = deque()
        self._spooled: list[SpoolEntry] = sorted(recovered)
        # pos -> (operation, its spool entry if it is on disk); in `pos` order.
        self._in_flight: dict[int, tuple[Op, SpoolEntry | None]] = {}
        self._ranges: dict[int, dict[tuple[str, str], tuple[int, int]] | None] = {}
        self._offline = False
        self._closed = False
        self._window: int | None = None  # None: only `take`'s max_in_flight bounds
        self._next_pos = self._spooled[-1].pos + 1 if self._spooled else 0
        # While the spool refuses writes: dropped_batches when the refusals began (for the log
        # line that says how many were dropped once it accepts again).
        self._refusing_since: int | None = None

    # --- producer side (the batcher, and the run for init) ---------------------------------

    def push(self, op: Op) -> int:
        """Queue `op` at the tail; returns its `pos`. Never blocks on the network."""
        with self._changed:
            op = msgspec.structs.replace(op, pos=self._next_pos)
            self._next_pos += 1
            self._memory.append(op)
            self._enforce_memory_bound()
            self._changed.notify_all()
            return op.pos

    @property
    def last_pos(self) -> int:
        """The `pos` of the newest operation pushed (-1 before the first)."""
        with self._changed:
            return self._next_pos - 1

    # --- consumer side (the sender) --------------------------------------------------------

    def take(self, timeout_s: float | None, *, max_in_flight: int = 1) -> Op | None:
        """Mark the oldest pending operation in flight and return it; None on timeout or close.
        The caller must `settle` or `dead_letter` it (or leave it for `spill`). With
        `max_in_flight` 1 (the default) the caller takes the next only after that; with more,
        several callers may hold operations at once, and `take` waits until the oldest pending
        one may go alongside those in flight (see the module docstring)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            if max_in_flight <= 1 and self._in_flight:
                raise RuntimeError("take() while an operation is in flight")
            while not self._closed:
                op = self._take_head(max_in_flight)
                if op is not None:
                    return op
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._changed.wait(remaining)
            return None

    def settle(self, op: Op) -> None:
        """The server acknowledged `op`: forget it (and delete its spool file, if any)."""
        with self._changed:
            self._finish_in_flight(op)

    def dead_letter(self, op: Op, letter: DeadLetter) -> None:
        """The server refused `op` for good: keep it under dead/ and move on."""
        with self._changed:
            try:
                self._spool.dead_letter(op.pos, op_kind(op), encode_dead_letter(letter))
                self._counters.dead_lettered += 1
            except (SpoolFull, OSError) as exc:
                self._count_dropped(op)
                logger.error("could not keep refused %s #%d as a dead letter (%s); it is "
                             "dropped", op_kind(op), op.pos, exc)
            self._finish_in_flight(op)

    # --- modes -----------------------------------------------------------------------------

    def set_offline(self, offline: bool) -> None:
        """Offline: everything in memory (and the operation in flight) goes to disk, and new
        operations go straight to disk, until the server answers again."""
        with self._changed:
            self._offline = offline
            if offline:
                self._spill_in_flight()
                self._spill_memory(keep=0)
            self._changed.notify_all()

    def set_window(self, window: int) -> None:
        """At most `window` operations in flight from now on (those already are not stopped)."""
        with self._changed:
            self._window = max(1, window)
            self._changed.notify_all()

    @property
    def offline(self) -> bool:
        return self._offline

    def spill(self, through_pos: int | None = None) -> bool:
        """Make every pending operation up to `through_pos` (all if None) durable on disk.
        Returns False if the spool could not take all of them."""
        with self._changed:
            self._spill_in_flight(through_pos)
            while self._memory and (through_pos is None or self._memory[0].pos <= through_pos):
                if not self._spill_one():
                    break
            self._changed.notify_all()
            return self._volatile_min_pos() > (_INFINITY if through_pos is None else through_pos)

    def close(self) -> None:
        """Wake a waiting `take` for good (the sender stops)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # --- waiting and accounting ------------------------------------------------------------

    def wait_settled(self, through_pos: int, timeout_s: float) -> bool:
        """Wait until every operation up to `through_pos` is acknowledged, dead-lettered or
        dropped."""
        return self._wait(lambda: self._pending_min_pos() > through_pos, timeout_s)

    def wait_durable(self, through_pos: int, timeout_s: float) -> bool:
        """Wait until every operation up to `through_pos` is settled or on disk."""
        return self._wait(lambda: self._volatile_min_pos() > through_pos, timeout_s)

    def pending_counts(self) -> tuple[int, int]:
        """(pending operations, of which on disk)."""
        with self._changed:
            in_flight_only_in_memory = sum(
                1 for _, entry in self._in_flight.values() if entry is None)
            pending = len(self._memory) + len(self._spooled) + in_flight_only_in_memory
            return pending, len(self._spooled)

    def _wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout=max(0.0, timeout_s))

    def _pending_min_pos(self) -> float:
        candidates: list[float] = [_INFINITY]
        if self._in_flight:
            candidates.append(min(self._in_flight))
        if self._memory:
            candidates.append(self._memory[0].pos)
        if self._spooled:
            candidates.append(self._spooled[0].pos)
        return min(candidates)

    def _volatile_min_pos(self) -> float:
        candidates: list[float] = [_INFINITY]
        candidates.extend(pos for pos, (_, entry) in self._in_flight.items() if entry is None)
        if self._memory:
            candidates.append(self._memory[0].pos)
        return min(candidates)

    # --- internals (lock held) -------------------------------------------------------------

    def _take_head(self, max_in_flight: int) -> Op | None:
        if self._window is not None:
            max_in_flight = min(max_in_flight, self._window)
        if self._in_flight and (len(self._in_flight) >= max_in_flight or self._offline):
            return None
        while True:
            # In-flight operations that were spilled stay in `_spooled` until settled.
            entry = next((e for e in self._spooled if e.pos not in self._in_flight), None)
            if entry is None or (self._memory and self._memory[0].pos < entry.pos):
                break
            try:
                op = decode_op(self._spool.read(entry))
            except (SpoolCorrupt, OSError, zlib.error, msgspec.DecodeError) as exc:
                # Damaged after it was written (recovery checked it): keep it aside, counted.
                self._spooled.remove(entry)
                self._spool.quarantine(entry, str(exc))
                continue
            return self._start(op, entry)
        if self._memory:
            return self._start(self._memory[0], None)
        return None

    def _start(self, op: Op, entry: SpoolEntry | None) -> Op | None:
        """Put `op` (the oldest pending one) in flight, unless it must wait for those that are."""
        ranges = batch_key_ranges(op)
        if self._in_flight and (ranges is None or any(
                other is None or _overlap(ranges, other) for other in self._ranges.values())):
            return None
        if entry is None:
            self._memory.popleft()
        self._in_flight[op.pos] = (op, entry)
        self._ranges[op.pos] = ranges
        return op

    def _finish_in_flight(self, op: Op) -> None:
        held = self._in_flight.get(op.pos)
        if held is None or held[0] is not op:
            raise RuntimeError("settling an operation that is not in flight")
        entry = held[1]
        if entry is not None:
            self._spool.remove(entry)
            self._spooled.remove(entry)
        del self._in_flight[op.pos]
        del self._ranges[op.pos]
        self._changed.notify_all()

    def _enforce_memory_bound(self) -> None:
        self._spill_memory(keep=0 if self._offline else self._max_memory_ops)
        if len(self._memory) > self._max_memory_ops:
            self._count_dropped(self._memory.pop())  # the newest: the spool stays a prefix

    def _spill_memory(self, *, keep: int) -> None:
        while len(self._memory) > keep:
            if not self._spill_one():
                return

    def _spill_one(self) -> bool:
        entry = self._write(self._memory[0])
        if entry is None:
            return False
        self._memory.popleft()
        bisect.insort(self._spooled, entry)
        return True

    def _spill_in_flight(self, through_pos: int | None = None) -> None:
        for pos, (op, entry) in list(self._in_flight.items()):
            if entry is not None or (through_pos is not None and pos > through_pos):
                continue
            written = self._write(op)
            if written is not None:  # otherwise it stays in memory, in flight: not lost
                self._in_flight[pos] = (op, written)
                bisect.insort(self._spooled, written)

    def _write(self, op: Op) -> SpoolEntry | None:
        try:
            entry = self._spool.write(
                op.pos, op_kind(op), encode_op(op), exempt=not isinstance(op, BatchOp)
            )
        except (SpoolFull, OSError) as exc:
            if self._refusing_since is None:
                logger.error("the spool cannot take more (%s); while it stays full and the "
                             "memory queue is full, new batches are dropped and counted", exc)
                self._refusing_since = self._counters.dropped_batches
            return None
        if self._refusing_since is not None:
            logger.warning("the spool accepts writes again; %d batches were dropped meanwhile",
                           self._counters.dropped_batches - self._refusing_since)
            self._refusing_since = None
        if isinstance(op, BatchOp):
            self._counters.spilled_batches += 1
        return entry

    def _count_dropped(self, op: Op) -> None:
        self._counters.dropped_batches += 1
        if isinstance(op, BatchOp):
            self._counters.dropped_points += op.points


def batch_key_ranges(op: Op) -> dict[tuple[str, str], tuple[int, int]] | None:
    """The keys a batch writes, as ranges per series: ("m", name) -> (lowest, highest step) and
    ("s", name) -> (lowest, highest timestamp) of system metrics. None for an operation whose
    order matters whatever it writes: run creation, finish, a batch with params or tags, a
    point without its own timestamp (the server fills in its clock)."""
    if not isinstance(op, BatchOp):
        return None
    request = op.request
    if request.params or request.tags:
        return None
    ranges: dict[tuple[str, str], tuple[int, int]] = {}

    def add(key: tuple[str, str], low: int, high: int) -> None:
        known = ranges.get(key)
        ranges[key] = (low, high) if known is None else (min(known[0], low), max(known[1], high))

    bounds: dict[int, tuple[int, int]] = {}  # the batcher shares one steps list among series
    for series in request.series:
        if series.steps:
            known = bounds.get(id(series.steps))
            if known is None:
                known = bounds[id(series.steps)] = (min(series.steps), max(series.steps))
            add(("m", series.name), *known)
    for point in request.metrics:
        add(("m", point.name), point.step, point.step)
    for point in request.system_metrics:
        if point.timestamp is None:
            return None
        add(("s", point.name), point.timestamp, point.timestamp)
    return ranges


def _overlap(ranges: dict[tuple[str, str], tuple[int, int]],
             other: dict[tuple[str, str], tuple[int, int]]) -> bool:
    for key, (low, high) in ranges.items():
        known = other.get(key)
        if known is not None and low <= known[1] and known[0] <= high:
            return True
    return False
