"""The counters of one run, and the frozen record `Run.statistics()` returns.

Each counter has one writer (noted per field: the batcher thread, the sender thread, or the
outbox under its lock), so plain integer attributes suffice; readers may see a value a moment
old, never a torn one.

Must not import anything beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass


class Counters:
    __slots__ = (
        "batches_delivered",
        "batches_formed",
        "coalesced_points",
        "dead_lettered",
        "dropped_batches",
        "dropped_points",
        "duplicate_batches",
        "invalid_points",
        "log_stalls",
        "logged_points",
        "overloaded_responses",
        "points_delivered",
        "retries",
        "server_warnings",
        "spilled_batches",
        "transient_errors",
    )

    def __init__(self) -> None:
        # batcher thread
        self.logged_points = 0
        self.coalesced_points = 0
        self.invalid_points = 0
        self.batches_formed = 0
        # log() callers (only on the slow path)
        self.log_stalls = 0
        # sender thread
        self.batches_delivered = 0
        self.points_delivered = 0
        self.duplicate_batches = 0
        self.retries = 0
        self.overloaded_responses = 0
        self.transient_errors = 0
        self.server_warnings = 0
        # outbox, under its lock
        self.spilled_batches = 0
        self.dead_lettered = 0
        self.dropped_batches = 0
        self.dropped_points = 0


@dataclass(frozen=True, slots=True)
class RunStatistics:
    """A snapshot of a run's delivery. Nothing is ever lost silently: every point handed to
    `log()` ends up delivered, pending (memory or spool), invalid, dead-lettered or dropped,
    and each of those is counted here."""

    logged_points: int  # metric and system points handed to log() and seen by the batcher
    coalesced_points: int  # a repeated (metric, step) in one batch: only the last value is sent
    invalid_points: int  # refused locally: bad name, non-numeric or non-finite value, bad step
    batches_formed: int
    batches_delivered: int  # acknowledged by the server (duplicates included)
    points_delivered: int
    duplicate_batches: int  # acknowledged as already stored (a retry or replay of it)
    retries: int
    overloaded_responses: int  # 429 / RESOURCE_EXHAUSTED answers
    transient_errors: int  # 5xx, timeouts, connection errors
    server_warnings: int  # structured warnings in the server's answers (logged once per code)
    spilled_batches: int  # written to the spool: memory queue full, server unreachable, or flush
    pending_operations: int  # not yet acknowledged: in memory, in flight or in the spool
    spooled_operations: int  # of which on disk
    dead_lettered: int  # refused by the server for good; kept under <spool>/dead/
    dropped_batches: int  # spool cap reached with the memory queue full: refused, counted
    dropped_points: int
    log_stalls: int  # log() calls that waited for the batcher to catch up (memory bound)
    offline: bool  # the server is unreachable: operations go to the spool until a probe succeeds
    spool_dir: str
