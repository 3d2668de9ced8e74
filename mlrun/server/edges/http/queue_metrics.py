"""Prometheus families of queued ingest, added to `GET /metrics` (`edges.http.prometheus`).

Three sources, each read at scrape time (rendering never awaits):
- the queue as the process last saw it (a `QueueMonitor`): stream length, bytes, pending
  entries, consumer lag, consumers, dead letters, drained entries and rows and their rates,
  and what all processors added to the processing hash (redeliveries, the insert-latency
  histogram), Redis memory — on servers and processors alike;
- a server's admission (`RedisWritePath.statistics()`): batches admitted and refused (queue
  full / unreachable), the bound;
- a processor (`StreamProcessor.statistics()` and its ledger marker): entries read and
  committed, rows, inserts and their latency, redeliveries, dead letters.

Must not import pipelines or storage: it reads whatever has the shapes below (records whose
fields are named in the tables).
"""

from __future__ import annotations

from typing import Protocol

from mlrun.server.edges.http.prometheus import ExtraFamilies
from mlrun.server.telemetry import Exposition, Histogram


class Snapshot(Protocol):
    """A `QueueSnapshot`; the gauges are read by name from `_QUEUE_FAMILIES`."""

    @property
    def reachable(self) -> bool: ...

    def insert_latency(self) -> Histogram: ...


class QueueView(Protocol):
    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def drain_rate_entries_per_s(self) -> float: ...

    @property
    def drain_rate_rows_per_s(self) -> float: ...


class Admission(Protocol):
    @property
    def admitted_entries(self) -> int: ...

    @property
    def rejected_full(self) -> int: ...

    @property
    def rejected_unreachable(self) -> int: ...

    @property
    def max_entries(self) -> int: ...

    @property
    def max_bytes(self) -> int: ...


class AdmissionView(Protocol):
    def statistics(self) -> tuple[object, Admission]: ...


class Marks(Protocol):
    @property
    def marked(self) -> int: ...

    @property
    def pending(self) -> int: ...


class Marker(Protocol):
    def statistics(self) -> Marks: ...


class Processing(Protocol):
    """A `ProcessorStatistics`; the counters are read by name from `_PROCESSOR_FAMILIES`."""

    @property
    def consumer(self) -> str: ...


class ProcessorView(Protocol):
    @property
    def insert_latency(self) -> Histogram: ...

    @property
    def marker(self) -> Marker: ...

    def statistics(self) -> Processing: ...


_QUEUE_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    # (metric name, type, QueueSnapshot field, help)
    ("mlrun_queue_entries", "gauge", "entries",
     "Batches in the Redis streams that no processor has committed yet (stream length)."),
    ("mlrun_queue_bytes", "gauge", "bytes", "Payload bytes of those batches."),
    ("mlrun_queue_pending_entries", "gauge", "pending",
     "Batches delivered to a processor and not yet acknowledged."),
    ("mlrun_queue_lag_entries", "gauge", "lag",
     "Batches not yet delivered to any processor (consumer group lag)."),
    ("mlrun_queue_consumers", "gauge", "consumers", "Consumers known to the group."),
    ("mlrun_queue_dead_letter_entries", "gauge", "dead_letters",
     "Entries set aside in the dead-letter stream (malformed, foreign or rejected)."),
    ("mlrun_queue_drained_entries_total", "counter", "drained_total",
     "Batches processors have committed and acknowledged, by all processors."),
    ("mlrun_queue_drained_rows_total", "counter", "drained_rows_total",
     "Metric rows of those batches (all processors)."),
    ("mlrun_queue_redeliveries_total", "counter", "redelivered_total",
     "Entries processors took over from idle (dead) consumers or re-read after a restart "
     "(all processors)."),
    ("mlrun_redis_used_memory_bytes", "gauge", "used_memory_bytes", "Redis used_memory."),
    ("mlrun_redis_max_memory_bytes", "gauge", "max_memory_bytes",
     "Redis maxmemory (0: none set)."),
)

_PROCESSOR_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    # (metric name, type, ProcessorStatistics field, help)
    ("mlrun_processor_entries_read_total", "counter", "entries_read",
     "Stream entries read (new, claimed from idle consumers, or re-read)."),
    ("mlrun_processor_entries_committed_total", "counter", "entries_committed",
     "Batches inserted into ClickHouse and acknowledged."),
    ("mlrun_processor_rows_committed_total", "counter", "rows_committed",
     "Metric rows inserted into ClickHouse."),
    ("mlrun_processor_rows_per_second", "gauge", "rows_per_s",
     "Rows committed per second over the last ten seconds."),
    ("mlrun_processor_inserts_total", "counter", "inserts", "Successful ClickHouse inserts."),
    ("mlrun_processor_insert_failures_total", "counter", "insert_failures",
     "Failed ClickHouse insert attempts (outages are retried, rejections split per entry)."),
    ("mlrun_processor_redeliveries_total", "counter", "redelivered",
     "Entries taken over from idle (dead) consumers or re-read after a restart."),
    ("mlrun_processor_dead_lettered_total", "counter", "dead_lettered",
     "Entries this processor moved to the dead-letter stream."),
    ("mlrun_processor_redis_failures_total", "counter", "redis_failures",
     "Redis calls that failed (retried with back-off)."),
)


def queue_families(view: QueueView) -> ExtraFamilies:
    def add(exposition: Exposition) -> None:
        snapshot = view.snapshot
        exposition.family("mlrun_queue_reachable", "gauge",
                          "1 when the last look at Redis succeeded, else 0.",
                          [((), int(bool(snapshot.reachable)))])
        for name, kind, attribute, help_text in _QUEUE_FAMILIES:
            exposition.family(name, kind, help_text, [((), getattr(snapshot, attribute))])
        exposition.family("mlrun_queue_drain_rate_entries_per_second", "gauge",
                          "Batches the processors acknowledge per second (smoothed); "
                          "Retry-After of a full queue is derived from it.",
                          [((), round(view.drain_rate_entries_per_s, 3))])
        exposition.family("mlrun_queue_drain_rate_rows_per_second", "gauge",
                          "Metric rows the processors insert and acknowledge per second "
                          "(all processors, smoothed).",
                          [((), round(view.drain_rate_rows_per_s, 1))])
        exposition.histogram("mlrun_queue_insert_duration_seconds",
                             "Duration of the processors' ClickHouse inserts (all processors).",
                             [((), snapshot.insert_latency())])

    return add


def admission_families(view: AdmissionView) -> ExtraFamilies:
    def add(exposition: Exposition) -> None:
        _, admission = view.statistics()
        exposition.family("mlrun_queue_admitted_total", "counter",
                          "Batches this server admitted to the queue.",
                          [((), admission.admitted_entries)])
        exposition.family("mlrun_queue_rejected_total", "counter",
                          "Batches this server refused: the queue was full (429) or Redis "
                          "unreachable (503).",
                          [((("reason", "full"),), admission.rejected_full),
                           ((("reason", "unreachable"),),
                            admission.rejected_unreachable)])
        exposition.family("mlrun_queue_capacity_entries", "gauge", "The queue's bound in batches.",
                          [((), admission.max_entries)])
        exposition.family("mlrun_queue_capacity_bytes", "gauge", "The queue's bound in bytes.",
                          [((), admission.max_bytes)])

    return add


def processor_families(view: ProcessorView) -> ExtraFamilies:
    def add(exposition: Exposition) -> None:
        statistics = view.statistics()
        consumer = (("consumer", statistics.consumer),)
        for name, kind, attribute, help_text in _PROCESSOR_FAMILIES:
            exposition.family(name, kind, help_text,
                              [(consumer, getattr(statistics, attribute))])
        exposition.histogram("mlrun_processor_insert_duration_seconds",
                             "Duration of successful ClickHouse inserts.",
                             [(consumer, view.insert_latency)])
        marks = view.marker.statistics()
        exposition.family("mlrun_processor_ledger_marks_total", "counter",
                          "Ledger rows marked committed.", [((), marks.marked)])
        exposition.family("mlrun_processor_ledger_marks_pending", "gauge",
                          "Ledger marks waiting to be written.", [((), marks.pending)])

    return add
