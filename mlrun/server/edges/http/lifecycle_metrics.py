"""Prometheus families of the data lifecycle, added to `GET /metrics`: purge jobs by state,
points / objects / ledger rows removed, retention and pruning counters, housekeeping rounds
and errors. Read from `Lifecycle.statistics()` at scrape time (rendering never awaits); the
job counts are as of this process's last housekeeping round.

Must not import storage or pipelines.
"""

from __future__ import annotations

from mlrun.server.edges.http.prometheus import ExtraFamilies
from mlrun.server.telemetry import Exposition
from mlrun.server.usecases.lifecycle import Lifecycle

_COUNTERS: tuple[tuple[str, str, str], ...] = (
    # (metric name, LifecycleStatistics field, help)
    ("mlrun_housekeeping_rounds_total", "rounds", "Housekeeping rounds started."),
    ("mlrun_housekeeping_errors_total", "errors",
     "Housekeeping rounds or purge jobs that failed (retried next round)."),
    ("mlrun_purge_jobs_finished_total", "jobs_finished", "Purge jobs this process finished."),
    ("mlrun_purge_points_removed_total", "points_removed",
     "Metric and system-metric points removed from ClickHouse by purge jobs."),
    ("mlrun_purge_objects_deleted_total", "objects_deleted",
     "Artifacts whose objects purge jobs deleted."),
    ("mlrun_purge_ledger_rows_deleted_total", "ledger_rows_purged",
     "Ledger rows of deleted runs removed."),
    ("mlrun_ledger_rows_pruned_total", "ledger_rows_pruned",
     "Ledger rows removed for being older than the ledger window."),
    ("mlrun_uploads_aborted_total", "uploads_aborted",
     "Unfinalized artifact uploads aborted for their age."),
    ("mlrun_retention_partitions_dropped_total", "partitions_dropped",
     "Monthly partitions of metric points dropped by retention."),
    ("mlrun_retention_runs_rebuilt_total", "runs_rebuilt",
     "Runs whose summaries and block rollups retention rebuilt."),
)


def lifecycle_families(lifecycle: Lifecycle) -> ExtraFamilies:
    def add(exposition: Exposition) -> None:
        stats = lifecycle.statistics()
        for name, attribute, help_text in _COUNTERS:
            exposition.family(name, "counter", help_text, [((), getattr(stats, attribute))])
        exposition.family(
            "mlrun_purge_jobs", "gauge", "Purge jobs by state (as of the last round).",
            [((("state", state),), count)
             for state, count in sorted(stats.jobs_by_state.items())])
        exposition.family(
            "mlrun_housekeeping_last_round_timestamp_seconds", "gauge",
            "When this process last ran a housekeeping round (epoch seconds).",
            [((), stats.last_round_ts_s)])

    return add
