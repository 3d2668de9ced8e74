"""PostgreSQL side of export and import (`ports.run_archive.RunArchiveRows`): a run's fields,
params, tags, metric names and finalized artifacts read as export records, and written back
by import in one transaction together with the `run_imports` row (sql/postgres/0014).

Must not import ClickHouse, the edges or the use-cases. Every method is one `Postgres.run`
(one transaction), bounded by `timeout_s`.

Invariants: import writes the run's rows exactly as exported (timestamps, status, ids), never
through the write path's defaults; a run id already present is never written over (the
caller learns it from `existing_runs`, and `commit_run` re-checks inside its transaction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from mlrun.server.ports.run_archive import ExistingRun
from mlrun.server.protocols.export_file import Artifact, RunFields
from mlrun.server.storage.postgres.client import Postgres
from mlrun.server.storage.postgres.metadata import ensure_project

_ARTIFACT_COLUMNS = (
    "artifact_id, run_id, name, type, size_bytes, sha256, mime_type, storage_key,"
    " declared_size_bytes, created_at, finalized_at"
)


class PostgresRunArchive:
    def __init__(self, pg: Postgres, *, timeout_s: float = 60.0) -> None:
        self._pg = pg
        self._timeout_s = timeout_s

    async def run_fields(self, run_id: str) -> RunFields | None:
        def select(conn: psycopg.Connection[Any]) -> RunFields | None:
            row = conn.execute(
                "SELECT r.run_id, p.name, p.description, r.name, r.status, r.created_at,"
                " r.updated_at, r.finished_at, r.last_heartbeat_at"
                " FROM runs r JOIN projects p ON p.id = r.project_id WHERE r.run_id = %s",
                (run_id,),
            ).fetchone()
            if row is None:
                return None
            params = dict(conn.execute(
                "SELECT key, value FROM run_params WHERE run_id = %s ORDER BY key", (run_id,)
            ).fetchall())
            tags = dict(conn.execute(
                "SELECT key, value FROM run_tags WHERE run_id = %s ORDER BY key", (run_id,)
            ).fetchall())
            names = [name for (name,) in conn.execute(
                "SELECT name FROM run_metric_names WHERE run_id = %s ORDER BY name", (run_id,)
            ).fetchall()]
            return RunFields(run_id=row[0], project=row[1], project_description=row[2],
                             name=row[3], status=row[4], created_at=row[5], updated_at=row[6],
                             finished_at=row[7], last_heartbeat_at=row[8], params=params,
                             tags=tags, metric_names=names)

        return await self._pg.run(select, timeout_s=self._timeout_s)

    async def artifacts(self, run_id: str) -> list[Artifact]:
        def select(conn: psycopg.Connection[Any]) -> list[Artifact]:
            rows = conn.execute(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts"
                " WHERE run_id = %s AND status = 'finalized' ORDER BY created_at, artifact_id",
                (run_id,),
            ).fetchall()
            return [Artifact(artifact_id=r[0], run_id=r[1], name=r[2], type=r[3],
                             size_bytes=r[4], sha256=r[5], mime_type=r[6], storage_key=r[7],
                             declared_size_bytes=r[8], created_at=r[9], finalized_at=r[10])
                    for r in rows]

        return await self._pg.run(select, timeout_s=self._timeout_s)

    async def existing_runs(self, run_ids: Sequence[str]) -> dict[str, ExistingRun]:
        wanted = list(run_ids)

        def select(conn: psycopg.Connection[Any]) -> dict[str, ExistingRun]:
            found = {run_id: ExistingRun("absent") for run_id in wanted}
            for run_id, digest in conn.execute(
                "SELECT r.run_id, i.content_sha256 FROM runs r"
                " LEFT JOIN run_imports i ON i.run_id = r.run_id WHERE r.run_id = ANY(%s)",
                (wanted,),
            ):
                found[run_id] = (ExistingRun("other") if digest is None
                                 else ExistingRun("imported", digest))
            # A run being deleted (its purge job's tombstone, sql/postgres/0010): its id is
            # not free until the purge is done, or the purge would remove imported points.
            for (run_id,) in conn.execute(
                    "SELECT run_id FROM purge_runs WHERE run_id = ANY(%s)", (wanted,)):
                found[run_id] = ExistingRun("other")
            return found

        return await self._pg.run(select, timeout_s=self._timeout_s)

    async def commit_run(self, run: RunFields, artifacts: Sequence[Artifact], *,
                         digest: str) -> bool:
        def insert(conn: psycopg.Connection[Any]) -> bool:
            if conn.execute("SELECT 1 FROM purge_runs WHERE run_id = %s",
                            (run.run_id,)).fetchone() is not None:
                return False  # deleted meanwhile: its id is not free until the purge is done
            project_id = ensure_project(conn, run.project)
            if run.project_description:
                conn.execute("UPDATE projects SET description = %s"
                             " WHERE id = %s AND description = ''",
                             (run.project_description, project_id))
            created = conn.execute(
                "INSERT INTO runs (run_id, project_id, name, status, created_at, updated_at,"
                " finished_at, last_heartbeat_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (run_id) DO NOTHING RETURNING run_id",
                (run.run_id, project_id, run.name, run.status, run.created_at, run.updated_at,
                 run.finished_at, run.last_heartbeat_at),
            ).fetchone()
            if created is None:
                return False
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO run_params (run_id, key, value) VALUES (%s, %s, %s)",
                    [(run.run_id, key, value) for key, value in run.params.items()])
                cursor.executemany(
                    "INSERT INTO run_tags (run_id, key, value) VALUES (%s, %s, %s)",
                    [(run.run_id, key, value) for key, value in run.tags.items()])
                cursor.executemany(
                    "INSERT INTO project_tag_keys (project_id, key) VALUES (%s, %s)"
                    " ON CONFLICT DO NOTHING",
                    [(project_id, key) for key in run.tags])
                cursor.executemany(
                    "INSERT INTO run_metric_names (run_id, name) VALUES (%s, %s)",
                    [(run.run_id, name) for name in run.metric_names])
                cursor.executemany(
                    "INSERT INTO artifacts (artifact_id, run_id, name, type, size_bytes, sha256,"
                    " mime_type, storage_key, declared_size_bytes, created_at, finalized_at,"
                    " status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'finalized')",
                    [(a.artifact_id, a.run_id, a.name, a.type, a.size_bytes, a.sha256,
                      a.mime_type, a.storage_key, a.declared_size_bytes, a.created_at,
                      a.finalized_at) for a in artifacts])
            conn.execute("INSERT INTO run_imports (run_id, content_sha256) VALUES (%s, %s)",
                         (run.run_id, digest))
            return True

        return await self._pg.run(insert, timeout_s=self._timeout_s)
