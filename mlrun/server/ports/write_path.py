"""The write-path port: how the ingest use-case hands metric rows to whatever makes them durable.

The use-case (`mlrun.server.usecases.ingest`) only ever sees these names; the in-process
group-commit pipeline into ClickHouse (`mlrun.server.pipelines.clickhouse_write_path`) is the
first implementation, and a queue-backed one (Redis Streams) plugs in beside it.

    reservation = await write_path.reserve(run_id, metrics, system, wait_s=...)
                                                     # all or none; 429 if full (after a wait,
                                                     # if the implementation waits)
    ... PostgreSQL: ledger claim, run state, cardinality ...
    durability = reservation.submit_nowait(write)                      # cannot fail
    await durability.wait(timeout_s)                                   # committed, or raises

The contract an implementation keeps:
- `reserve_nowait` never waits: it holds capacity for both tables or for neither, and raises
  `Overloaded` (429 / RESOURCE_EXHAUSTED with a retry delay) when full, `BackendUnavailable`
  (`shutting_down`) once closed. An unused reservation is given back with `release()`.
- `reserve` is the same with a bounded wait: an implementation whose fullness is only a
  transient buffer in front of a bound it checks elsewhere (the queued path's XADD buffer)
  may wait up to `wait_s` for room — backpressure by latency — before answering `Overloaded`;
  one whose fullness means storage is behind (the direct path) answers at once. The real
  bound (storage, the broker's queue) always answers 429 at once.
- `submit_nowait` cannot fail or block: capacity was reserved. The implementation owns the
  encoding (RowBinary, a stream entry, ...), not the use-case.
- `Durability.wait` returns only once every row of the write is durable in storage (or in a
  broker that survives the loss of any single process), and raises `BackendTimeout`
  (`commit_timeout`, retryable) when the deadline passes first, or the write's own error.
- Once a write with a `batch_id` is durable, the implementation — not the request — marks its
  ledger row committed (`BatchLedger.mark_batches_committed`), retrying until it lands, so an
  acknowledged batch answers `duplicate` when resent even if the request was gone by then.
- `holds(write)` answers whether storage already holds every row of `write` (identified by the
  run and the versions assigned at admission). The use-case asks it for a resend whose ledger
  row is still `pending` (the first attempt may have been committed without its mark landing)
  to answer `duplicate`; it submits the rows again either way, since derived state (views,
  rollups) of a first attempt cut short may be incomplete.

Rows carry explicit versions: `first_version + i` was assigned to the i-th point of the batch
(metrics first, then system metrics) at admission and is kept in the ledger row, so a resend
writes the very same rows (same versions) instead of new ones that could outrank a later write.

Must not import storage, pipelines, edges or anything that does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

MetricTable = Literal["metrics", "system_metrics"]


@dataclass(frozen=True, slots=True)
class PointColumns:
    """Metric points as parallel columns (no object per point). All lists have one length."""

    names: Sequence[str]
    steps: Sequence[int]
    values: Sequence[float]
    timestamps_ms: Sequence[int]
    versions: Sequence[int]

    def __len__(self) -> int:
        return len(self.steps)


EMPTY_COLUMNS = PointColumns(names=(), steps=(), values=(), timestamps_ms=(), versions=())


@dataclass(frozen=True, slots=True)
class BatchIdentity:
    """Which ledger row a write belongs to. `batch_id` None: the batch is not deduplicated and
    has no ledger row to mark."""

    run_id: str
    batch_id: str | None
    first_version: int


@dataclass(frozen=True, slots=True)
class BatchWrite:
    """Everything one batch stores in the metric tables, with its identity."""

    identity: BatchIdentity
    metrics: PointColumns
    system_metrics: PointColumns

    @property
    def rows(self) -> int:
        return len(self.metrics) + len(self.system_metrics)


class Durability(Protocol):
    """What a request awaits: the fate of its own rows."""

    async def wait(self, timeout_s: float) -> None: ...


class WriteReservation(Protocol):
    """Capacity held for one batch; `submit_nowait` uses it, `release` gives it back unused."""

    def submit_nowait(self, write: BatchWrite) -> Durability: ...

    def release(self) -> None: ...


class WritePath(Protocol):
    def reserve_nowait(self, run_id: str, metrics: PointColumns, system_metrics: PointColumns
                       ) -> WriteReservation:
        """Capacity for at most these points of `run_id` (the write may end up smaller)."""
        ...

    async def reserve(self, run_id: str, metrics: PointColumns, system_metrics: PointColumns,
                      *, wait_s: float) -> WriteReservation:
        """`reserve_nowait`, or a wait of at most `wait_s` for room (see the contract)."""
        ...

    async def holds(self, write: BatchWrite, *, timeout_s: float) -> bool:
        """True when storage holds every row of `write` already."""
        ...

    def committed_unmarked(self, run_id: str, batch_id: str) -> bool:
        """True when this process saw the batch commit whole (views included) and its ledger
        mark is still on its way: a resend is then a duplicate, nothing to write or repair.
        False when this process does not know (another process committed it, or the mark
        landed already and the ledger answers instead)."""
        ...


class BatchLedger(Protocol):
    """The side of the idempotency ledger a write path needs (PostgreSQL's `ingest_batches`)."""

    async def mark_batches_committed(self, batches: Iterable[tuple[str, str | None]]) -> None:
        """'pending' -> 'committed' for these (run_id, batch_id) pairs, in one transaction."""
        ...
