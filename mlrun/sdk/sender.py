"""The sender: delivers the outbox's operations in order, acting on each attempt's `Outcome`
(see `mlrun.sdk.retry` for the table).

A live run's sender has `max_batches_in_flight` lanes (threads sharing the transport's one
connection pool / channel): while the server keeps up, a lane starts the next metric batch
before the previous ones are acknowledged, when the outbox says their order cannot matter
(disjoint steps, no params or tags: see `mlrun.sdk.outbox`), so one process is not limited to
one batch per round trip. Run creation, finish, and everything while offline go one at a time.
How many lanes may hold a batch is a window, as in TCP's slow start: it starts at one, opens by
one with each batch the server acknowledges (up to the lanes), and closes to one on any
overloaded or unavailable answer, so several batches are in flight only while the server shows
it takes them.

- Delivered: settle (delete the spool file if it was spooled); log the server's warnings once
  per code.
- Overloaded (429 / RESOURCE_EXHAUSTED): wait the server's delay plus jitter and send the SAME
  operation again, as long as it takes; meanwhile the batcher keeps forming batches and the
  outbox spills them to disk when memory is full.
- Unavailable: exponential backoff with jitter, capped. Once the failures have lasted
  `offline_after_s`, the outbox goes offline (everything to disk) and each retry first probes
  the server's health endpoint; the first success switches back — no permanent offline latch —
  and the spool drains in order before anything newer.
- Rejected: not retried; reported once per (status, code) with logging.warning and kept as a
  dead letter. A finish refused with 409 means the run is already finished: settled.

Runs in its own daemon thread for a live run (`start`/`stop`), or in the caller's thread for
`mlrun sync` (`drain`, which gives up instead of going offline). Waits are on a
`threading.Event`, so `stop()` interrupts any backoff at once; an attempt in progress ends
within the transport's request deadline.

Must not import httpx, grpc or `mlrun.server`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from mlrun.sdk.ops import BatchOp, DeadLetter, FinishOp, InitOp, Op, op_kind
from mlrun.sdk.outbox import Outbox
from mlrun.sdk.retry import Backoff, Delivered, Overloaded, Rejected, Unavailable
from mlrun.sdk.settings import Settings
from mlrun.sdk.statistics import Counters
from mlrun.sdk.transport import Transport

logger = logging.getLogger("mlrun.sdk")


class Sender:
    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        *,
        settings: Settings,
        counters: Counters,
        run_id: str | None = None,
        spool_dir: str = "",
        rng: random.Random | None = None,
    ) -> None:
        self._outbox = outbox
        self._transport = transport
        self._counters = counters
        self._run_id = run_id
        self._spool_dir = spool_dir
        self._backoff = Backoff(base_s=settings.backoff_base_s, max_s=settings.backoff_max_s,
                                rng=rng)
        self._offline_after_s = settings.offline_after_s
        self._heartbeat_interval_s = settings.heartbeat_interval_s
        self._stop = threading.Event()
        self._reported: set[tuple[str, str]] = set()
        self.init_outcome: Delivered | Rejected | None = None
        # Set when the run's creation is answered, or when the run goes offline (no answer is
        # coming soon): `Run` waits on it at init.
        self.init_resolved = threading.Event()
        self._lanes = max(1, settings.max_batches_in_flight)
        self._window = 1
        if self._lanes > 1:
            outbox.set_window(self._window)
        # Counters, reports, the window and the offline switch are shared by the lanes.
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(lane,), daemon=True,
                             name=f"mlrun-sender-{(run_id or 'sync')[:8]}-{lane}")
            for lane in range(self._lanes)
        ]

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._outbox.close()

    def join(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _run(self, lane: int) -> None:
        try:
            while not self._stop.is_set():
                op = self._outbox.take(timeout_s=self._heartbeat_interval_s,
                                       max_in_flight=self._lanes)
                if op is None:
                    if lane == 0:
                        self._heartbeat()
                    continue
                self._deliver(op, give_up_when_offline=False)
        except Exception:
            logger.exception("mlrun: the sending thread failed; data stays in memory and spool "
                             "(%s) for `mlrun sync`", self._spool_dir)

    def drain(self, on_settled: Callable[[Op], None] = lambda op: None) -> bool:
        """Deliver everything pending, in this thread; False if the server stayed unreachable
        for `offline_after_s` (what is left stays in the spool)."""
        while not self._stop.is_set():
            op = self._outbox.take(timeout_s=0)
            if op is None:
                return True
            if not self._deliver(op, give_up_when_offline=True):
                return False
            on_settled(op)
        return False

    # --- one operation ---------------------------------------------------------------------

    def _deliver(self, op: Op, *, give_up_when_offline: bool) -> bool:
        """Deliver or dead-letter `op`; False if stopped (or given up) first."""
        attempt = 0
        failing_since: float | None = None
        while not self._stop.is_set():
            if self._outbox.offline and not self._transport.probe():
                # Offline: probe cheaply before re-sending a whole batch.
                if not self._sleep(self._backoff.unavailable_delay_s(attempt)):
                    return False
                attempt += 1
                continue
            outcome = self._transport.deliver(op)
            if isinstance(outcome, Delivered):
                self._delivered(op, outcome)
                return True
            if isinstance(outcome, Rejected):
                self._rejected(op, outcome)
                return True
            with self._lock:
                self._counters.retries += 1
                self._set_window(1)
                if isinstance(outcome, Overloaded):
                    self._counters.overloaded_responses += 1
                else:
                    self._counters.transient_errors += 1
            if isinstance(outcome, Overloaded):
                failing_since = None  # the server is up and talking: never a reason to spool
                delay_s = self._backoff.overloaded_delay_s(outcome.retry_after_s)
            else:
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= self._offline_after_s and not self._outbox.offline:
                    if give_up_when_offline:
                        logger.warning("mlrun: the server is unreachable (%s)", outcome.reason)
                        return False
                    self._go_offline(outcome)
                delay_s = self._backoff.unavailable_delay_s(attempt)
                attempt += 1
            if not self._sleep(delay_s):
                return False
        return False

    def _delivered(self, op: Op, outcome: Delivered) -> None:
        with self._lock:
            if self._outbox.offline:
                self._outbox.set_offline(False)
                logger.warning("mlrun: the server answers again; replaying the spool in order")
            if isinstance(op, BatchOp):
                self._set_window(self._window + 1)
                self._counters.batches_delivered += 1
                self._counters.points_delivered += op.points
                self._counters.duplicate_batches += int(outcome.duplicate)
            for code, message in outcome.warnings:
                self._counters.server_warnings += 1
                self._report_once(("warning", code), "mlrun: server warning %s: %s", code,
                                  message)
        self._outbox.settle(op)
        if isinstance(op, InitOp):
            self.init_outcome = outcome
            self.init_resolved.set()

    def _rejected(self, op: Op, outcome: Rejected) -> None:
        if isinstance(op, FinishOp) and outcome.status in ("HTTP 409", "gRPC FAILED_PRECONDITION"):
            self._outbox.settle(op)  # already finished (a replay, or finished elsewhere)
            return
        letter = DeadLetter(op=op, status=outcome.status, code=outcome.code,
                            message=outcome.message, at_ms=int(time.time() * 1000))
        with self._lock:
            self._report_once(
                (outcome.status, outcome.code),
                "mlrun: the server refused a %s (%s %s: %s); it is not retried and is kept in "
                "%s/dead/ (reported once per code, counted in statistics().dead_lettered)",
                op_kind(op), outcome.status, outcome.code, outcome.message, self._spool_dir,
            )
            self._outbox.dead_letter(op, letter)
        if isinstance(op, InitOp):
            self.init_outcome = outcome
            self.init_resolved.set()

    def _go_offline(self, outcome: Unavailable) -> None:
        with self._lock:
            if self._outbox.offline:
                return  # another lane switched already
            self._outbox.set_offline(True)
        logger.warning(
            "mlrun: the server has been unreachable for %g s (%s); spooling to %s and probing "
            "until it is back", self._offline_after_s, outcome.reason, self._spool_dir)
        self.init_resolved.set()

    def _heartbeat(self) -> None:
        if self._run_id is None or self._outbox.offline or self.init_outcome is None:
            return
        if isinstance(self.init_outcome, Delivered) and not self._stop.is_set():
            outcome = self._transport.heartbeat(self._run_id)
            if not isinstance(outcome, Delivered):
                logger.debug("mlrun: heartbeat not acknowledged: %s", outcome)

    def _set_window(self, window: int) -> None:
        """(Caller holds `_lock`.) Batches the lanes may have in flight, 1 to the lanes."""
        window = max(1, min(self._lanes, window))
        if window != self._window:
            self._window = window
            self._outbox.set_window(window)

    def _report_once(self, key: tuple[str, str], message: str, *args: object) -> None:
        """Log `message` once per `key` (callers hold `_lock` or run in one thread)."""
        if key not in self._reported:
            self._reported.add(key)
            logger.warning(message, *args)

    def _sleep(self, delay_s: float) -> bool:
        """Wait `delay_s`; False if stopped meanwhile."""
        return not self._stop.wait(delay_s)
