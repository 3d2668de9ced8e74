"""Artifact records in PostgreSQL: `PostgresArtifactRows`, the `ArtifactRows` port of
`mlrun.server.usecases.artifacts` (`ArtifactRow`: pending while an upload URL is out, finalized
once the use-case verified the object).

Every method is one transaction (one `Postgres.run`), bounded by `timeout_s`. Must not import
the edges, the use-cases, ClickHouse or artifact storage.
"""

from __future__ import annotations

from typing import Any

import psycopg

from mlrun.server.ports.artifact_rows import ArtifactRow
from mlrun.server.storage.postgres.client import Postgres
from mlrun.server.storage.postgres.metadata import run_not_found, run_status, select_run_project


class PostgresArtifactRows:
    def __init__(self, pg: Postgres, *, timeout_s: float = 5.0) -> None:
        self._pg = pg
        self._timeout_s = timeout_s

    async def run_project(self, run_id: str) -> str:
        """The name of the run's project; 404 `run_not_found`."""
        return await self._pg.run_statement(lambda conn: select_run_project(conn, run_id),
                                            timeout_s=self._timeout_s)

    async def insert_artifact(self, row: ArtifactRow) -> ArtifactRow:
        """Record a pending artifact (an upload URL was handed out); 404 `run_not_found`."""

        def insert(conn: psycopg.Connection[Any]) -> ArtifactRow:
            inserted = conn.execute(
                "INSERT INTO artifacts (artifact_id, run_id, name, type, mime_type, sha256,"
                " storage_key, upload_id, declared_size_bytes, size_bytes, status)"
                " SELECT %s, run_id, %s, %s, %s, %s, %s, %s, %s, 0, 'pending'"
                " FROM runs WHERE run_id = %s"
                f" RETURNING {_ARTIFACT_COLUMNS}",
                (row.artifact_id, row.name, row.type, row.mime_type, row.sha256,
                 row.storage_key, row.upload_id, row.declared_size_bytes, row.run_id),
            ).fetchone()
            if inserted is None:
                raise run_not_found(row.run_id)
            return _artifact_row(inserted)

        return await self._pg.run(insert, timeout_s=self._timeout_s)

    async def get_artifact(self, run_id: str, artifact_id: str) -> ArtifactRow | None:
        def select(conn: psycopg.Connection[Any]) -> ArtifactRow | None:
            found = conn.execute(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts"
                " WHERE artifact_id = %s AND run_id = %s",
                (artifact_id, run_id),
            ).fetchone()
            return None if found is None else _artifact_row(found)

        return await self._pg.run(select, timeout_s=self._timeout_s)

    async def finalize_artifact(
        self, run_id: str, artifact_id: str, *, size_bytes: int
    ) -> ArtifactRow | None:
        """pending -> finalized with the verified size. An artifact finalized already is
        returned as it is; None when it does not exist (any more)."""

        def finalize(conn: psycopg.Connection[Any]) -> ArtifactRow | None:
            updated = conn.execute(
                "UPDATE artifacts SET status = 'finalized', finalized_at = now(),"
                " size_bytes = %s, upload_id = NULL"
                " WHERE artifact_id = %s AND run_id = %s AND status = 'pending'"
                f" RETURNING {_ARTIFACT_COLUMNS}",
                (size_bytes, artifact_id, run_id),
            ).fetchone()
            if updated is None:
                updated = conn.execute(
                    f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts"
                    " WHERE artifact_id = %s AND run_id = %s",
                    (artifact_id, run_id),
                ).fetchone()
            return None if updated is None else _artifact_row(updated)

        return await self._pg.run(finalize, timeout_s=self._timeout_s)

    async def delete_pending_artifact(self, run_id: str, artifact_id: str) -> bool:
        """Forget an artifact that was never finalized; False when no pending one exists."""

        def delete(conn: psycopg.Connection[Any]) -> bool:
            deleted = conn.execute(
                "DELETE FROM artifacts WHERE artifact_id = %s AND run_id = %s"
                " AND status = 'pending' RETURNING 1",
                (artifact_id, run_id),
            ).fetchone()
            return deleted is not None

        return await self._pg.run(delete, timeout_s=self._timeout_s)

    async def list_artifacts(self, run_id: str, *, limit: int) -> list[ArtifactRow]:
        """The run's finalized artifacts, oldest first; 404 `run_not_found`."""

        def select(conn: psycopg.Connection[Any]) -> list[ArtifactRow]:
            rows = conn.execute(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts"
                " WHERE run_id = %s AND status = 'finalized'"
                " ORDER BY created_at, artifact_id LIMIT %s",
                (run_id, limit),
            ).fetchall()
            if not rows:
                run_status(conn, run_id)  # 404 for an unknown run, [] for a known one
            return [_artifact_row(row) for row in rows]

        return await self._pg.run(select, timeout_s=self._timeout_s)


_ARTIFACT_COLUMNS = (
    "artifact_id, run_id, name, type, mime_type, storage_key, sha256, upload_id,"
    " declared_size_bytes, size_bytes, status, created_at, finalized_at"
)


def _artifact_row(row: tuple[Any, ...]) -> ArtifactRow:
    return ArtifactRow(*row)
