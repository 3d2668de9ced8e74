"""The data-lifecycle ports: what run/project deletion, the purge jobs, retention and pruning
(`mlrun.server.usecases.lifecycle`) need from PostgreSQL (`LifecycleStore`, implemented by
`storage.postgres.lifecycle`) and from ClickHouse (`MetricLifecycle`, implemented by
`storage.clickhouse.lifecycle`), and the records that cross them.

Must not import storage, pipelines, edges or anything that does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from mlrun.wire.lifecycle import PurgeJobInfo, PurgePhase


@dataclass(frozen=True, slots=True)
class PurgeObject:
    """An artifact whose objects a purge (or the stale-upload pruning) deletes."""

    artifact_id: str
    name: str
    storage_key: str
    upload_id: str | None


class LifecycleStore(Protocol):
    """The PostgreSQL side. Every method is one bounded transaction."""

    async def delete_run(self, run_id: str, *, project: str | None, settle_s: float
                         ) -> PurgeJobInfo:
        """Remove the run's row (and its cascading rows) and create its purge job, in one
        transaction; 404 `run_not_found` (also for a run outside `project` when given)."""
        ...

    async def delete_project(self, name: str, *, settle_s: float
                             ) -> tuple[PurgeJobInfo, list[str]]:
        """Remove the project, its runs and its project-scoped keys, and create one purge job
        for all its runs; 404 `project_not_found`. Returns the job and the removed keys' ids."""
        ...

    async def get_job(self, job_id: str) -> PurgeJobInfo | None: ...

    async def due_jobs(self, *, limit: int) -> list[PurgeJobInfo]:
        """Jobs not done whose settle time has passed, oldest first."""
        ...

    async def seconds_until_next_job(self) -> float | None:
        """Until the earliest settle time of a job not done (<= 0: due now); None: no job."""
        ...

    async def job_counts(self) -> dict[str, int]:
        """Jobs by state."""
        ...

    async def start_job(self, job_id: str, *, worker: str) -> None: ...

    async def next_objects(self, job_id: str, *, limit: int) -> list[PurgeObject]: ...

    async def objects_deleted(self, job_id: str, artifact_ids: Sequence[str]) -> None: ...

    async def job_run_ids(self, job_id: str) -> list[str]: ...

    async def set_phase(self, job_id: str, phase: PurgePhase, *,
                        points_removed: int | None = None,
                        clickhouse_seconds: float | None = None) -> None: ...

    async def delete_ledger_chunk(self, job_id: str, *, limit: int) -> int:
        """Delete up to `limit` ledger rows of the job's runs; the number deleted."""
        ...

    async def finish_job(self, job_id: str) -> None:
        """Mark done and drop the job's tombstones (its run ids may be used again)."""
        ...

    async def record_error(self, job_id: str, message: str) -> None: ...

    async def prune_jobs(self, *, older_than_s: float, limit: int) -> int:
        """Delete up to `limit` jobs done more than `older_than_s` ago."""
        ...

    async def prune_ledger(self, *, older_than_s: float, limit: int) -> int:
        """Delete up to `limit` ledger rows created more than `older_than_s` ago."""
        ...

    async def stale_uploads(self, *, older_than_s: float, limit: int) -> list[PurgeObject]:
        """Unfinalized artifacts created more than `older_than_s` ago."""
        ...

    async def forget_uploads(self, artifact_ids: Sequence[str]) -> None:
        """Delete those artifacts' rows if they are still unfinalized."""
        ...

    async def add_rebuilds(self, run_ids: Sequence[str]) -> None: ...

    async def pending_rebuilds(self, *, limit: int) -> list[str]: ...

    async def rebuilds_done(self, run_ids: Sequence[str]) -> None: ...

    def exclusive(self) -> AbstractAsyncContextManager[bool]:
        """Enter as the one housekeeper of the deployment: yields True while this process holds
        the cluster-wide lock (released on exit, or when the process dies), False when another
        process holds it."""
        ...


class MetricLifecycle(Protocol):
    """The ClickHouse side: deleting by run, dropping expired partitions, rebuilding the
    summaries and block rollups of runs that lost part of their points."""

    async def count_points(self, run_ids: Sequence[str]) -> int:
        """Metric and system-metric rows of these runs."""
        ...

    async def delete_runs(self, run_ids: Sequence[str]) -> None:
        """Start deleting every row of these runs from every table (asynchronous mutations)."""
        ...

    async def remaining_rows(self, run_ids: Sequence[str]) -> int:
        """Rows of these runs still in any table (0 once `delete_runs` has finished)."""
        ...

    async def busy_mutations(self) -> int:
        """Mutations not finished yet on the tables this module mutates."""
        ...

    async def expired_partitions(self, *, before_month: int) -> list[int]:
        """Partitions (YYYYMM) of metrics or system metrics older than `before_month`."""
        ...

    async def runs_in_partition(self, month: int) -> list[str]:
        """Runs with metric points in that month's partition."""
        ...

    async def delete_rollups(self, run_ids: Sequence[str]) -> None:
        """Start deleting these runs' summaries and block rollups."""
        ...

    async def remaining_rollups(self, run_ids: Sequence[str]) -> int: ...

    async def drop_partition(self, month: int) -> None:
        """Drop the month's partition of metrics and system metrics (no-op when absent)."""
        ...

    async def rebuild_rollups(self, run_ids: Sequence[str]) -> None:
        """Recompute these runs' summaries and block rollups from their remaining points."""
        ...
