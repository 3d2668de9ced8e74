"""Data lifecycle: deleting runs and projects, the purge jobs that remove what they left in
ClickHouse, the artifact store and the ledger, retention of metric points, and pruning (ledger
window, unfinalized uploads).

Owns `Lifecycle`: the delete / job use-cases the edges call, and `serve`, the housekeeper task
the supervisor runs in its task group until shutdown. Talks to `ports.lifecycle` (PostgreSQL and
ClickHouse sides) and `ports.objects` (the artifact store). Must not import storage, pipelines
or edges.

How a delete works (README "Data lifecycle"):
1. The DELETE request removes the run's (or the project's runs') `runs` rows in one transaction
   and creates a durable purge job: from that moment every read answers 404 and ingest into the
   run is refused (404 `run_not_found`); the run id stays reserved (409 `run_deleting`).
2. The job waits `settle_s` (batches admitted before the delete finish committing), then, one
   phase at a time, each resumable and idempotent: `objects` (abort multipart uploads, delete
   objects, in chunks), `clickhouse` (in queued ingest mode, first wait until the queue's
   entries admitted before this moment are committed; then one batch of mutations over every
   table, then wait until no row is left), `ledger` (chunked deletes). `done` frees the run
   id.

Invariants:
- One housekeeper per deployment: each round runs under `LifecycleStore.exclusive()` (a
  PostgreSQL session lock, released by a dead process's connection), so with N servers only
  one purges a given job, and a restarted server resumes a job at its recorded phase.
- Bounded load: jobs run one at a time; objects and ledger rows go in chunks with a pause
  between; ClickHouse gets one set of mutations at a time and nothing new while any of ours is
  still running.
- Waiting for a ClickHouse mutation is a bounded back-off poll (ClickHouse offers no event);
  a job whose mutation does not finish in `mutation_wait_s` records the error and is retried
  next round (mutations are idempotent).
- Errors of one round are logged and counted (`statistics()`, `/metrics`); cancellation is
  never caught.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial

import anyio
import anyio.abc

from mlrun.server.errors import BackendTimeout, MlrunError, NotFound
from mlrun.server.ports.artifact_rows import ArtifactRow
from mlrun.server.ports.keys import Principal
from mlrun.server.ports.lifecycle import LifecycleStore, MetricLifecycle, PurgeObject
from mlrun.server.ports.objects import ArtifactStore
from mlrun.server.ports.queue_backlog import QueueBacklog
from mlrun.server.usecases.artifacts import staging_key
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.lifecycle import PurgeJobInfo

logger = logging.getLogger("mlrun.lifecycle")

_DAY_S = 24 * 3600.0
# The shortest pause between rounds, also when a job is due at once (another process holds the
# housekeeping lock and works on it): rounds never spin.
_MIN_WAIT_S = 0.5
# Delete passes of one round over a job's runs in ClickHouse (see _delete_from_clickhouse).
_DELETE_PASSES = 3
# Runs per set of mutations: a project's or a month's runs go in sets of this many, each set
# finished before the next starts (its IN list stays far below ClickHouse's max_query_size).
_RUNS_PER_MUTATION = 1000


def _chunks(run_ids: list[str]) -> list[list[str]]:
    return [run_ids[i:i + _RUNS_PER_MUTATION] for i in range(0, len(run_ids), _RUNS_PER_MUTATION)]


@dataclass(frozen=True, slots=True)
class LifecycleSettings:
    # A job starts this long after its delete: longer than an ingest request may take
    # (9.5 s), so batches admitted before the delete have committed before ClickHouse is purged.
    settle_s: float = 30.0
    # How often the housekeeper looks for work when nothing wakes it.
    interval_s: float = 60.0
    # Metric points older than this many days go (whole UTC months); 0 keeps everything.
    retention_days: int = 0
    # Ledger rows live this long: a retry inside the window is recognised as a duplicate.
    ledger_retention_s: float = 7 * _DAY_S
    # Unfinalized uploads older than this are aborted (upload URLs expire after 1 h).
    upload_max_age_s: float = _DAY_S
    # Finished purge jobs stay readable (GET /api/v1/purge_jobs/{job_id}) this long.
    job_retention_s: float = 30 * _DAY_S
    object_chunk: int = 100
    ledger_chunk: int = 5000
    # Most ledger chunks one round prunes (the rest waits for the next round).
    ledger_chunks_per_round: int = 200
    chunk_pause_s: float = 0.01
    mutation_wait_s: float = 600.0
    # Queued ingest: how long a round waits for the processors to drain what the queue held
    # when a job's ClickHouse phase started (past it the job records the error and is retried
    # next round, so a stopped processor does not hold up retention and pruning).
    queue_wait_s: float = 60.0


@dataclass(slots=True)
class LifecycleStatistics:
    rounds: int = 0
    errors: int = 0
    jobs_finished: int = 0
    points_removed: int = 0
    objects_deleted: int = 0
    ledger_rows_purged: int = 0
    ledger_rows_pruned: int = 0
    uploads_aborted: int = 0
    partitions_dropped: int = 0
    runs_rebuilt: int = 0
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    last_round_ts_s: float = 0.0


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def month_before(now: datetime, retention_days: int) -> int:
    """The oldest month (YYYYMM) retention keeps: every partition of an earlier month ended
    before `now - retention_days` and goes."""
    cut = now - timedelta(days=retention_days)
    return cut.year * 100 + cut.month


class Lifecycle:
    def __init__(self, store: LifecycleStore, metrics: MetricLifecycle, objects: ArtifactStore,
                 *, settings: LifecycleSettings = LifecycleSettings(),
                 worker: str | None = None,
                 fault_point: Callable[[str], None] | None = None,
                 forget_keys: Callable[[Sequence[str]], None] | None = None,
                 queue_backlog: QueueBacklog | None = None) -> None:
        self._store = store
        # Queued ingest: batches admitted before a delete may still wait in the queue; the
        # ClickHouse phase waits for them (None in direct mode: every 200 was committed).
        self._queue_backlog = queue_backlog
        # Tests' fault injection: called with "purge_clickhouse_deletes_started" once a job's
        # ClickHouse deletes were started, "retention_partition_dropped" once a month's
        # partitions were dropped (before its runs' rollups were rebuilt).
        self._fault_point = fault_point
        # Drops keys from this process's key view at once (other processes: next reload).
        self._forget_keys = forget_keys
        self._metrics = metrics
        self._objects = objects
        self._settings = settings
        self._worker = worker or default_worker_name()
        self._wake = anyio.Event()
        self._stats = LifecycleStatistics()

    @property
    def settings(self) -> LifecycleSettings:
        return self._settings

    def statistics(self) -> LifecycleStatistics:
        return self._stats

    # --- the API's use-cases -------------------------------------------------------------------

    async def delete_run(self, principal: Principal, run_id: str) -> PurgeJobInfo:
        """Admin scope; a project-scoped admin only for its project's runs (another project's
        run is 404 `run_not_found`, as for reads)."""
        principal.require("admin")
        job = await self._store.delete_run(run_id, project=principal.project,
                                           settle_s=self._settings.settle_s)
        logger.info("run %s deleted; purge job %s", run_id, job.job_id)
        self._wake.set()
        return job

    async def delete_project(self, principal: Principal, project: str) -> PurgeJobInfo:
        principal.require("admin")
        principal.require_project(project)
        job, key_ids = await self._store.delete_project(project,
                                                        settle_s=self._settings.settle_s)
        if self._forget_keys is not None:
            self._forget_keys(key_ids)
        logger.info("project %s deleted (%d runs); purge job %s", project, job.runs, job.job_id)
        self._wake.set()
        return job

    async def get_job(self, principal: Principal, job_id: str) -> PurgeJobInfo:
        principal.require("admin")
        job = await self._store.get_job(job_id)
        if job is None or (principal.project is not None and job.project != principal.project):
            raise NotFound(f"purge job {job_id!r} not found", code=ErrorCode.PURGE_JOB_NOT_FOUND,
                           field="job_id")
        return job

    # --- the housekeeper -----------------------------------------------------------------------

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Run rounds until cancelled: at once when a delete on this process wakes it, else
        every `interval_s` (a timer: deletes on other servers and the passing of time produce
        no event here)."""
        task_status.started()
        while True:
            self._wake = anyio.Event()
            next_job_s = await self.run_round()
            wait_s = self._settings.interval_s
            if next_job_s is not None:  # a job settling: look again when it is due
                wait_s = min(wait_s, max(next_job_s, _MIN_WAIT_S))
            with anyio.move_on_after(wait_s):
                await self._wake.wait()

    async def run_round(self) -> float | None:
        """One round: purge jobs, retention, pruning — if this process is the housekeeper.
        Returns how long until the next purge job is due, when this process is the
        housekeeper and the round went well (None otherwise: wait the whole interval, so
        neither a failing job nor a lock held elsewhere makes rounds spin)."""
        self._stats.rounds += 1
        errors_before = self._stats.errors
        next_job_s: float | None = None
        try:
            async with self._store.exclusive() as held:
                if held:
                    await self._purge_due_jobs()
                    if self._settings.retention_days > 0:
                        await self._apply_retention()
                    await self._prune_ledger()
                    await self._abort_stale_uploads()
                    await self._store.prune_jobs(older_than_s=self._settings.job_retention_s,
                                                 limit=self._settings.ledger_chunk)
            self._stats.jobs_by_state = await self._store.job_counts()
            if held and self._stats.errors == errors_before:
                next_job_s = await self._store.seconds_until_next_job()
        except MlrunError as exc:
            self._stats.errors += 1
            logger.warning("housekeeping round failed: %s (%s); retrying next round",
                           exc.code, exc)
        self._stats.last_round_ts_s = datetime.now(UTC).timestamp()
        return next_job_s

    # --- purge jobs ----------------------------------------------------------------------------

    async def _purge_due_jobs(self) -> None:
        for job in await self._store.due_jobs(limit=100):
            try:
                await self._purge(job)
            except MlrunError as exc:
                self._stats.errors += 1
                logger.warning("purge job %s failed in phase %s: %s; retrying next round",
                               job.job_id, job.phase, exc.code)
                await self._store.record_error(job.job_id, f"{exc.code}: {exc}")

    async def _purge(self, job: PurgeJobInfo) -> None:
        settings = self._settings
        await self._store.start_job(job.job_id, worker=self._worker)
        phase = job.phase
        if phase == "objects":
            while objects := await self._store.next_objects(job.job_id,
                                                            limit=settings.object_chunk):
                for item in objects:
                    await self._delete_objects(item)
                await self._store.objects_deleted(job.job_id, [o.artifact_id for o in objects])
                self._stats.objects_deleted += len(objects)
                await anyio.sleep(settings.chunk_pause_s)
            await self._store.set_phase(job.job_id, "clickhouse")
            phase = "clickhouse"
        run_ids = await self._store.job_run_ids(job.job_id)
        if phase == "clickhouse":
            started = anyio.current_time()
            points = job.points_removed
            await self._wait_for_queue_backlog()
            if points is None:
                points = await self._metrics.count_points(run_ids)
                await self._store.set_phase(job.job_id, "clickhouse", points_removed=points)
            for chunk in _chunks(run_ids):  # one set of mutations at a time
                await self._delete_from_clickhouse(job.job_id, chunk)
            self._stats.points_removed += points
            await self._store.set_phase(job.job_id, "ledger",
                                        clickhouse_seconds=anyio.current_time() - started)
            phase = "ledger"
        if phase == "ledger":
            while (deleted := await self._store.delete_ledger_chunk(
                    job.job_id, limit=settings.ledger_chunk)) > 0:
                self._stats.ledger_rows_purged += deleted
                await anyio.sleep(settings.chunk_pause_s)
        await self._store.finish_job(job.job_id)
        self._stats.jobs_finished += 1
        logger.info("purge job %s done (%s %s)", job.job_id, job.kind, job.target)

    async def _wait_for_queue_backlog(self) -> None:
        """Queued ingest: every entry the queue held when the ClickHouse phase starts (among
        them any batch of these runs admitted before the delete) is committed first, or the
        processors would insert it after the deletes and it would stay behind."""
        backlog = self._queue_backlog
        if backlog is None:
            return
        mark = await backlog.newest()
        await self._wait_for(partial(backlog.left_up_to, mark),
                             "draining the queue's entries admitted before the delete",
                             backend="redis", within_s=self._settings.queue_wait_s)

    async def _delete_from_clickhouse(self, job_id: str, run_ids: list[str]) -> None:
        """Mutations on every table, then wait until they are done. Rows that arrive after a
        mutation started survive it (a batch admitted before the delete whose commit was held
        up, say): while any are left, the deletes run again, a few passes at most."""
        for _ in range(_DELETE_PASSES):
            await self._wait_for(self._metrics.busy_mutations, "earlier mutations")
            await self._metrics.delete_runs(run_ids)
            if self._fault_point is not None:
                self._fault_point("purge_clickhouse_deletes_started")
            await self._wait_for(self._metrics.busy_mutations,
                                 f"the delete mutations of {job_id}")
            if await self._metrics.remaining_rows(run_ids) == 0:
                return
        raise BackendTimeout(f"rows of {job_id}'s runs kept arriving in ClickHouse through"
                             f" {_DELETE_PASSES} delete passes", backend="clickhouse")

    async def _delete_objects(self, item: PurgeObject) -> None:
        """Every object an artifact may have: its multipart upload, its object, its staging
        object (single PUTs land there first). Each step is idempotent."""
        if item.upload_id is not None:
            try:
                await self._objects.abort_multipart(item.storage_key, item.upload_id)
            except MlrunError as exc:  # already completed or aborted: nothing left to abort
                logger.debug("abort of %s: %s", item.storage_key, exc.code)
        await self._objects.delete_object(item.storage_key)
        await self._objects.delete_object(staging_key(ArtifactRow(
            artifact_id=item.artifact_id, run_id="", name=item.name, type="", mime_type="",
            storage_key=item.storage_key, sha256=None, upload_id=item.upload_id,
            declared_size_bytes=None)))

    async def _wait_for(self, remaining: Callable[[], Awaitable[int]], what: str, *,
                        backend: str = "clickhouse", within_s: float | None = None) -> None:
        delay_s = 0.05
        within_s = self._settings.mutation_wait_s if within_s is None else within_s
        with anyio.move_on_after(within_s):
            while await remaining() > 0:
                await anyio.sleep(delay_s)  # a bounded back-off poll: see the module invariants
                delay_s = min(delay_s * 2, 2.0)
            return
        raise BackendTimeout(f"{backend} did not finish {what} within {within_s:g} s",
                             backend=backend)

    # --- retention -----------------------------------------------------------------------------

    async def _apply_retention(self) -> None:
        await self._rebuild_pending()  # what a crash left between a drop and its rebuild
        before = month_before(datetime.now(UTC), self._settings.retention_days)
        for month in await self._metrics.expired_partitions(before_month=before):
            run_ids = await self._metrics.runs_in_partition(month)
            # Recorded first: a crash from here on resumes with the rebuild.
            await self._store.add_rebuilds(run_ids)
            # Rollups go before their points: a read may briefly miss a summary, never show
            # one for points that are gone.
            for chunk in _chunks(run_ids):
                await self._delete_rollups(chunk, f"the rollup deletes of month {month}")
            await self._metrics.drop_partition(month)
            if self._fault_point is not None:
                self._fault_point("retention_partition_dropped")
            self._stats.partitions_dropped += 1
            for chunk in _chunks(run_ids):
                await self._metrics.rebuild_rollups(chunk)
                await self._store.rebuilds_done(chunk)
                self._stats.runs_rebuilt += len(chunk)
            logger.info("retention: dropped month %d (%d runs had points in it)", month,
                        len(run_ids))

    async def _rebuild_pending(self) -> None:
        """Runs recorded for a rebuild that a crash interrupted: their rollups may be deleted
        or not, so they are deleted (again) and rebuilt."""
        while run_ids := await self._store.pending_rebuilds(limit=_RUNS_PER_MUTATION):
            await self._delete_rollups(run_ids, "the rollup deletes of a resumed rebuild")
            await self._metrics.rebuild_rollups(run_ids)
            await self._store.rebuilds_done(run_ids)
            self._stats.runs_rebuilt += len(run_ids)

    async def _delete_rollups(self, run_ids: list[str], what: str) -> None:
        await self._wait_for(self._metrics.busy_mutations, "earlier mutations")
        await self._metrics.delete_rollups(run_ids)
        await self._wait_for(partial(self._metrics.remaining_rollups, run_ids), what)

    # --- pruning -------------------------------------------------------------------------------

    async def _prune_ledger(self) -> None:
        settings = self._settings
        for _ in range(settings.ledger_chunks_per_round):
            deleted = await self._store.prune_ledger(older_than_s=settings.ledger_retention_s,
                                                     limit=settings.ledger_chunk)
            self._stats.ledger_rows_pruned += deleted
            if deleted < settings.ledger_chunk:
                return
            await anyio.sleep(settings.chunk_pause_s)

    async def _abort_stale_uploads(self) -> None:
        uploads = await self._store.stale_uploads(older_than_s=self._settings.upload_max_age_s,
                                                  limit=self._settings.object_chunk)
        for item in uploads:
            await self._delete_objects(item)
        if uploads:
            await self._store.forget_uploads([u.artifact_id for u in uploads])
            self._stats.uploads_aborted += len(uploads)
            logger.info("aborted %d unfinalized uploads older than %g h", len(uploads),
                        self._settings.upload_max_age_s / 3600)

