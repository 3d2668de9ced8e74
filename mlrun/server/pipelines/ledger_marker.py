"""Marks ledger rows committed from the side that made their batches durable.

A write path calls `note_committed_nowait(run_id, batch_id)` from its writer once a batch's rows
are durable; `serve` groups what accumulated into one `mark_batches_committed` statement and
retries it with back-off until it lands, so an acknowledged batch is recognised as a duplicate
when resent, even when the request that carried it timed out or PostgreSQL was slow for a while.

Invariants:
- Bounded: at most `max_pending` marks wait. Past that the oldest are dropped with a warning and
  counted (`statistics().dropped`); nothing is lost by it, because a resend whose ledger row is
  still `pending` asks the write path whether storage holds its rows (`WritePath.holds`) before
  writing anything again.
- Every statement has a deadline; a failed one is retried with back-off (0.05 s doubling to 2 s)
  while the marks stay pending. On shutdown (`close()`), `serve` makes a last bounded attempt.
- Marks are idempotent ('pending' -> 'committed' only), so a retried statement is harmless.

Must not import storage drivers or the edges: the ledger is the `BatchLedger` port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import anyio.abc
import msgspec

from mlrun.server.errors import MlrunError
from mlrun.server.ports.write_path import BatchLedger

logger = logging.getLogger("mlrun.ledger")

_MAX_MARKS_PER_STATEMENT = 5000
_MAX_BACKOFF_S = 2.0


class LedgerMarkerStatistics(msgspec.Struct, frozen=True):
    pending: int
    marked: int
    failed_attempts: int
    dropped: int


class LedgerMarker:
    def __init__(self, ledger: BatchLedger, *, max_pending: int = 100_000,
                 statement_timeout_s: float = 3.0, final_attempt_s: float = 3.0,
                 before_mark: Callable[[], None] | None = None) -> None:
        self._ledger = ledger
        # A fault hook for the crash tests (MLRUN_FAULT_INJECTION); None in production.
        self._before_mark = before_mark
        self._max_pending = max_pending
        self._statement_timeout_s = statement_timeout_s
        self._final_attempt_s = final_attempt_s
        # Insertion-ordered: the oldest mark is the first to drop when full.
        self._pending: dict[tuple[str, str], None] = {}
        self._wakeup = anyio.Event()
        self._closed = anyio.Event()
        self._marked = 0
        self._failed_attempts = 0
        self._dropped = 0

    def note_committed_nowait(self, run_id: str, batch_id: str) -> None:
        key = (run_id, batch_id)
        if key in self._pending:
            return
        if len(self._pending) >= self._max_pending:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            self._dropped += 1
            logger.warning("ledger marks backlog full (%d): dropped the mark of batch %s of run "
                           "%s (a resend is checked against storage instead)",
                           self._max_pending, oldest[1], oldest[0])
        self._pending[key] = None
        self._wakeup.set()

    def is_pending(self, run_id: str, batch_id: str) -> bool:
        """Committed, mark not written yet (a key leaves only once its mark is written)."""
        return (run_id, batch_id) in self._pending

    def close(self) -> None:
        """No more marks will come; `serve` makes its last attempt and returns."""
        self._closed.set()
        self._wakeup.set()

    def statistics(self) -> LedgerMarkerStatistics:
        return LedgerMarkerStatistics(pending=len(self._pending), marked=self._marked,
                                      failed_attempts=self._failed_attempts,
                                      dropped=self._dropped)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Run until closed and drained (or cancelled); then one last bounded attempt."""
        task_status.started()
        backoff_s = 0.05
        while True:
            if self._closed.is_set():
                await self._final_attempt()
                return
            if not self._pending:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                continue
            if await self._mark_some(self._statement_timeout_s):
                backoff_s = 0.05
                continue
            with anyio.move_on_after(backoff_s):  # retry back-off; a close ends it early
                await self._closed.wait()
            backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)

    async def _final_attempt(self) -> None:
        deadline = anyio.current_time() + self._final_attempt_s
        while self._pending:
            remaining_s = deadline - anyio.current_time()
            if remaining_s <= 0 or not await self._mark_some(remaining_s):
                break
        if self._pending:
            logger.warning("stopping with %d ledger marks not written (their resends are "
                           "checked against storage)", len(self._pending))

    async def _mark_some(self, timeout_s: float) -> bool:
        keys = list(self._pending)[:_MAX_MARKS_PER_STATEMENT]
        if self._before_mark is not None:
            self._before_mark()
        try:
            with anyio.fail_after(max(timeout_s, 0.01)):
                await self._ledger.mark_batches_committed(keys)
        except (MlrunError, TimeoutError) as exc:
            self._failed_attempts += 1
            logger.warning("could not mark %d batches committed (%s); retrying", len(keys),
                           getattr(exc, "code", "timeout"))
            return False
        for key in keys:
            self._pending.pop(key, None)
        self._marked += len(keys)
        return True

