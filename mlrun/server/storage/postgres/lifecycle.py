"""The PostgreSQL side of the data lifecycle: deleting runs and projects (and creating their
purge jobs), the jobs' durable state, ledger and stale-upload pruning, the retention rebuild
list, and the cluster-wide housekeeping lock. Implements `ports.lifecycle.LifecycleStore`.

Schema: sql/postgres/0010_lifecycle.sql. Every method is one transaction (one `Postgres.run`),
bounded by `timeout_s`; chunked deletes take at most `limit` rows per transaction, so a big purge
never holds locks or a pool connection for long.

Must not import the edges, the use-cases, ClickHouse or artifact storage.

Invariants:
- A delete is one transaction: the `runs` row (with params, tags, metric names and artifact rows,
  by ON DELETE CASCADE) goes, and the purge job, its tombstones (`purge_runs`) and the artifact
  objects to delete (`purge_objects`) appear, together. Readers see the run or none of it.
- A tombstone keeps the run id from being reused (metadata.init_run answers 409 run_deleting)
  until `finish_job`, when nothing of the run is left anywhere.
- The housekeeping lock is a session advisory lock on a dedicated connection: a process that
  dies releases it with its connection, so a restarted (or another) server takes over at once.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import psycopg

from mlrun.server import errors
from mlrun.server.ports.lifecycle import PurgeObject
from mlrun.server.storage.postgres.client import Postgres
from mlrun.server.storage.postgres.metadata import run_not_found
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.lifecycle import PurgeJobInfo, PurgePhase
from mlrun.wire.timestamps import iso_utc

# pg_advisory_lock key of the housekeeper ("mlrunHK1" in ASCII, recognisable in pg_locks).
HOUSEKEEPING_LOCK_KEY = 0x6D6C72756E484B31
# How long trying the lock may take: another holder means "not us this round".
_LOCK_TRY_S = 0.5
# A project delete removes all its runs in one transaction: give it longer than a request's.
_PROJECT_DELETE_TIMEOUT_S = 60.0

_JOB_COLUMNS = (
    "job_id, kind, target, project, state, phase, runs, objects_total, objects_deleted,"
    " points_removed, clickhouse_seconds, ledger_rows_deleted, attempts, last_error,"
    " created_at, not_before, updated_at, finished_at"
)


def _job(row: tuple[Any, ...]) -> PurgeJobInfo:
    (job_id, kind, target, project, state, phase, runs, objects_total, objects_deleted,
     points_removed, clickhouse_seconds, ledger_rows_deleted, attempts, last_error,
     created_at, not_before, updated_at, finished_at) = row
    return PurgeJobInfo(
        job_id=job_id, kind=kind, target=target, project=project, state=state, phase=phase,
        runs=runs, objects_total=objects_total, objects_deleted=objects_deleted,
        points_removed=points_removed, clickhouse_seconds=clickhouse_seconds,
        ledger_rows_deleted=ledger_rows_deleted, attempts=attempts, last_error=last_error,
        created_at=iso_utc(created_at), not_before=iso_utc(not_before),
        updated_at=iso_utc(updated_at),
        finished_at=None if finished_at is None else iso_utc(finished_at))


def _new_job(conn: psycopg.Connection[Any], *, kind: str, target: str, project: str,
             run_ids: Sequence[str], settle_s: float) -> PurgeJobInfo:
    """Create the job, its tombstones and its object list, then delete the runs' rows."""
    job_id = f"purge_{uuid.uuid4().hex[:20]}"
    conn.execute(
        "INSERT INTO purge_jobs (job_id, kind, target, project, runs, not_before)"
        " VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s))",
        (job_id, kind, target, project, len(run_ids), settle_s))
    conn.execute(
        "INSERT INTO purge_runs (run_id, job_id) SELECT unnest(%s::text[]), %s",
        (list(run_ids), job_id))
    conn.execute(
        "INSERT INTO purge_objects (job_id, artifact_id, name, storage_key, upload_id)"
        " SELECT %s, artifact_id, name, storage_key, upload_id FROM artifacts"
        " WHERE run_id = ANY(%s::text[])",
        (job_id, list(run_ids)))
    conn.execute(
        "UPDATE purge_jobs SET objects_total ="
        " (SELECT count(*) FROM purge_objects WHERE job_id = %s) WHERE job_id = %s",
        (job_id, job_id))
    conn.execute("DELETE FROM runs WHERE run_id = ANY(%s::text[])", (list(run_ids),))
    row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM purge_jobs WHERE job_id = %s",
                       (job_id,)).fetchone()
    assert row is not None
    return _job(row)


class PostgresLifecycle:
    def __init__(self, pg: Postgres, *, timeout_s: float = 10.0) -> None:
        self._pg = pg
        self._timeout_s = timeout_s

    async def _run(self, fn: Any, timeout_s: float | None = None) -> Any:
        return await self._pg.run(fn, timeout_s=timeout_s or self._timeout_s)

    # --- deletes ---------------------------------------------------------------------------

    async def delete_run(self, run_id: str, *, project: str | None, settle_s: float
                         ) -> PurgeJobInfo:
        def delete(conn: psycopg.Connection[Any]) -> PurgeJobInfo:
            row = conn.execute(
                "SELECT p.name FROM runs r JOIN projects p ON p.id = r.project_id"
                " WHERE r.run_id = %s FOR UPDATE OF r", (run_id,)).fetchone()
            if row is None or (project is not None and row[0] != project):
                raise run_not_found(run_id)
            return _new_job(conn, kind="run", target=run_id, project=row[0], run_ids=[run_id],
                            settle_s=settle_s)

        job: PurgeJobInfo = await self._run(delete)
        return job

    async def delete_project(self, name: str, *, settle_s: float
                             ) -> tuple[PurgeJobInfo, list[str]]:
        def delete(conn: psycopg.Connection[Any]) -> tuple[PurgeJobInfo, list[str]]:
            row = conn.execute("SELECT id FROM projects WHERE name = %s FOR UPDATE",
                               (name,)).fetchone()
            if row is None:
                raise errors.NotFound(f"project {name!r} not found",
                                      code=ErrorCode.PROJECT_NOT_FOUND, field="project")
            project_id = row[0]
            run_ids = [r for (r,) in conn.execute(
                "SELECT run_id FROM runs WHERE project_id = %s ORDER BY run_id FOR UPDATE",
                (project_id,))]
            job = _new_job(conn, kind="project", target=name, project=name, run_ids=run_ids,
                           settle_s=settle_s)
            key_ids = [k for (k,) in conn.execute(
                "SELECT key_id FROM api_keys WHERE project_id = %s", (project_id,))]
            # Project-scoped keys and the project's tag keys go with it (ON DELETE CASCADE).
            conn.execute("DELETE FROM projects WHERE id = %s", (project_id,))
            return job, key_ids

        deleted: tuple[PurgeJobInfo, list[str]] = await self._run(delete,
                                                                  _PROJECT_DELETE_TIMEOUT_S)
        return deleted

    # --- jobs --------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> PurgeJobInfo | None:
        def select(conn: psycopg.Connection[Any]) -> PurgeJobInfo | None:
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM purge_jobs WHERE job_id = %s",
                               (job_id,)).fetchone()
            return None if row is None else _job(row)

        job: PurgeJobInfo | None = await self._run(select)
        return job

    async def due_jobs(self, *, limit: int) -> list[PurgeJobInfo]:
        def select(conn: psycopg.Connection[Any]) -> list[PurgeJobInfo]:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM purge_jobs WHERE state <> 'done'"
                " AND not_before <= now() ORDER BY created_at, job_id LIMIT %s",
                (limit,)).fetchall()
            return [_job(r) for r in rows]

        jobs: list[PurgeJobInfo] = await self._run(select)
        return jobs

    async def seconds_until_next_job(self) -> float | None:
        def select(conn: psycopg.Connection[Any]) -> float | None:
            row = conn.execute(
                "SELECT extract(epoch FROM min(not_before) - now())::float8 FROM purge_jobs"
                " WHERE state <> 'done'").fetchone()
            return None if row is None or row[0] is None else float(row[0])

        seconds: float | None = await self._run(select)
        return seconds

    async def job_counts(self) -> dict[str, int]:
        def select(conn: psycopg.Connection[Any]) -> dict[str, int]:
            counts = {"pending": 0, "running": 0, "done": 0}
            for state, count in conn.execute(
                    "SELECT state, count(*) FROM purge_jobs GROUP BY state"):
                counts[state] = count
            return counts

        counts: dict[str, int] = await self._run(select)
        return counts

    async def start_job(self, job_id: str, *, worker: str) -> None:
        await self._run(lambda conn: conn.execute(
            "UPDATE purge_jobs SET state = 'running', worker = %s, attempts = attempts + 1,"
            " updated_at = now() WHERE job_id = %s AND state <> 'done'", (worker, job_id)))

    async def next_objects(self, job_id: str, *, limit: int) -> list[PurgeObject]:
        def select(conn: psycopg.Connection[Any]) -> list[PurgeObject]:
            rows = conn.execute(
                "SELECT artifact_id, name, storage_key, upload_id FROM purge_objects"
                " WHERE job_id = %s ORDER BY artifact_id LIMIT %s", (job_id, limit)).fetchall()
            return [PurgeObject(*r) for r in rows]

        objects: list[PurgeObject] = await self._run(select)
        return objects

    async def objects_deleted(self, job_id: str, artifact_ids: Sequence[str]) -> None:
        def delete(conn: psycopg.Connection[Any]) -> None:
            done = conn.execute(
                "DELETE FROM purge_objects WHERE job_id = %s AND artifact_id = ANY(%s::text[])",
                (job_id, list(artifact_ids))).rowcount
            conn.execute(
                "UPDATE purge_jobs SET objects_deleted = objects_deleted + %s,"
                " updated_at = now() WHERE job_id = %s", (done, job_id))

        await self._run(delete)

    async def job_run_ids(self, job_id: str) -> list[str]:
        def select(conn: psycopg.Connection[Any]) -> list[str]:
            return [r for (r,) in conn.execute(
                "SELECT run_id FROM purge_runs WHERE job_id = %s ORDER BY run_id", (job_id,))]

        run_ids: list[str] = await self._run(select)
        return run_ids

    async def set_phase(self, job_id: str, phase: PurgePhase, *,
                        points_removed: int | None = None,
                        clickhouse_seconds: float | None = None) -> None:
        await self._run(lambda conn: conn.execute(
            "UPDATE purge_jobs SET phase = %s,"
            " points_removed = coalesce(%s, points_removed),"
            " clickhouse_seconds = coalesce(%s, clickhouse_seconds),"
            " last_error = NULL, updated_at = now() WHERE job_id = %s",
            (phase, points_removed, clickhouse_seconds, job_id)))

    async def delete_ledger_chunk(self, job_id: str, *, limit: int) -> int:
        def delete(conn: psycopg.Connection[Any]) -> int:
            deleted = conn.execute(
                "DELETE FROM ingest_batches WHERE ctid = ANY(ARRAY("
                " SELECT b.ctid FROM ingest_batches b JOIN purge_runs p ON p.run_id = b.run_id"
                " WHERE p.job_id = %s LIMIT %s))", (job_id, limit)).rowcount
            conn.execute(
                "UPDATE purge_jobs SET ledger_rows_deleted = ledger_rows_deleted + %s,"
                " updated_at = now() WHERE job_id = %s", (deleted, job_id))
            return int(deleted)

        deleted: int = await self._run(delete)
        return deleted

    async def finish_job(self, job_id: str) -> None:
        def finish(conn: psycopg.Connection[Any]) -> None:
            conn.execute("DELETE FROM purge_runs WHERE job_id = %s", (job_id,))
            conn.execute(
                "UPDATE purge_jobs SET state = 'done', phase = 'done', last_error = NULL,"
                " finished_at = now(), updated_at = now() WHERE job_id = %s", (job_id,))

        await self._run(finish)

    async def record_error(self, job_id: str, message: str) -> None:
        await self._run(lambda conn: conn.execute(
            "UPDATE purge_jobs SET last_error = %s, updated_at = now() WHERE job_id = %s",
            (message[:1000], job_id)))

    # --- pruning -------------------------------------------------------------------------------

    async def prune_jobs(self, *, older_than_s: float, limit: int) -> int:
        def delete(conn: psycopg.Connection[Any]) -> int:
            return int(conn.execute(
                "DELETE FROM purge_jobs WHERE job_id = ANY(ARRAY("
                " SELECT job_id FROM purge_jobs WHERE state = 'done'"
                " AND finished_at < now() - make_interval(secs => %s) LIMIT %s))",
                (older_than_s, limit)).rowcount)

        deleted: int = await self._run(delete)
        return deleted

    async def prune_ledger(self, *, older_than_s: float, limit: int) -> int:
        def delete(conn: psycopg.Connection[Any]) -> int:
            # ingest_batches_created_idx finds the oldest rows; ctid deletes exactly those.
            return int(conn.execute(
                "DELETE FROM ingest_batches WHERE ctid = ANY(ARRAY("
                " SELECT ctid FROM ingest_batches"
                " WHERE created_at < now() - make_interval(secs => %s) LIMIT %s))",
                (older_than_s, limit)).rowcount)

        deleted: int = await self._run(delete)
        return deleted

    async def stale_uploads(self, *, older_than_s: float, limit: int) -> list[PurgeObject]:
        def select(conn: psycopg.Connection[Any]) -> list[PurgeObject]:
            rows = conn.execute(
                "SELECT artifact_id, name, storage_key, upload_id FROM artifacts"
                " WHERE status = 'pending' AND created_at < now() - make_interval(secs => %s)"
                " ORDER BY created_at LIMIT %s", (older_than_s, limit)).fetchall()
            return [PurgeObject(*r) for r in rows]

        uploads: list[PurgeObject] = await self._run(select)
        return uploads

    async def forget_uploads(self, artifact_ids: Sequence[str]) -> None:
        await self._run(lambda conn: conn.execute(
            "DELETE FROM artifacts WHERE artifact_id = ANY(%s::text[]) AND status = 'pending'",
            (list(artifact_ids),)))

    # --- retention -----------------------------------------------------------------------------

    async def add_rebuilds(self, run_ids: Sequence[str]) -> None:
        await self._run(lambda conn: conn.execute(
            "INSERT INTO retention_rebuilds (run_id) SELECT unnest(%s::text[])"
            " ON CONFLICT (run_id) DO NOTHING", (list(run_ids),)))

    async def pending_rebuilds(self, *, limit: int) -> list[str]:
        def select(conn: psycopg.Connection[Any]) -> list[str]:
            return [r for (r,) in conn.execute(
                "SELECT run_id FROM retention_rebuilds ORDER BY run_id LIMIT %s", (limit,))]

        run_ids: list[str] = await self._run(select)
        return run_ids

    async def rebuilds_done(self, run_ids: Sequence[str]) -> None:
        await self._run(lambda conn: conn.execute(
            "DELETE FROM retention_rebuilds WHERE run_id = ANY(%s::text[])", (list(run_ids),)))

    # --- the housekeeper's lock ---------------------------------------------------------------

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[bool]:
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(
                    self._pg.advisory_lock(HOUSEKEEPING_LOCK_KEY, timeout_s=_LOCK_TRY_S))
            except errors.BackendTimeout:
                held = False  # another process holds it (or PostgreSQL is slow: next round)
            else:
                held = True
            yield held
