"""API keys in PostgreSQL: the `KeyDirectory` port of `mlrun.server.ports.keys` (`api_keys` table).

Owns: the SQL of key creation (with the cap on usable keys), listing, revocation, the load of
the usable keys that every server process holds in memory, and last-used bookkeeping. Each
method is one `Postgres.run` call (one worker-thread hop, one transaction), bounded by
`timeout_s`.

Must not import: trio or asyncio, the HTTP/gRPC edges, the use-cases, ClickHouse or artifact
storage. The key records come from the port (`ports.keys`), the listing payload from
`mlrun.wire.keys`.

Invariants:
- Only the SHA-256 digest of a key is stored (`key_hash`), with a short display prefix; no
  statement here ever sees the raw key.
- Timestamps come from the database clock (`now()`); expiry is stored as `expires_at`, and
  handed to the key view as epoch seconds.
- The cap on usable keys is exact across processes: creation takes a transaction-level
  advisory lock, counts, then inserts.
- A key's project is created on first use (as `init_run` does), so a key can be minted for a
  project before its first run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import psycopg

from mlrun.server import errors
from mlrun.server.ports.keys import (
    EXPIRED_KEY_MEMORY_S,
    NewKeyRecord,
    Principal,
    StoredKey,
    UsableKey,
)
from mlrun.server.storage.postgres.client import Postgres
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.keys import KeyInfo
from mlrun.wire.timestamps import iso_utc

# pg_advisory_xact_lock key serialising key creation ("mlrunKEY" in ASCII).
KEY_CREATION_LOCK_KEY = 0x6D6C72756E4B4559

_KEY_COLUMNS = (
    "k.key_id, k.name, k.display_prefix, k.scopes, p.name, k.created_at, k.expires_at,"
    " k.last_used_at, k.revoked_at, now()"
)

# The predicate of "still in every process's key view", shared by the load and the cap.
_USABLE = (
    "k.revoked_at IS NULL AND (k.expires_at IS NULL"
    f" OR k.expires_at > now() - interval '{EXPIRED_KEY_MEMORY_S} seconds')"
)


class PostgresKeyDirectory:
    """API keys on PostgreSQL; see the module docstring."""

    def __init__(self, pg: Postgres, *, timeout_s: float = 5.0) -> None:
        self._pg = pg
        self._timeout_s = timeout_s

    async def load_usable(self) -> list[UsableKey]:
        def load(conn: psycopg.Connection[Any]) -> list[UsableKey]:
            rows = conn.execute(
                "SELECT k.key_id, k.key_hash, k.scopes, p.name,"
                " extract(epoch FROM k.expires_at)::float8"
                f" FROM api_keys k LEFT JOIN projects p ON p.id = k.project_id WHERE {_USABLE}"
            ).fetchall()
            return [
                UsableKey(
                    digest=bytes(key_hash),
                    principal=Principal(key_id, frozenset(scopes), project),
                    expires_at_s=expires_at_s,
                )
                for key_id, key_hash, scopes, project, expires_at_s in rows
            ]

        return await self._pg.run(load, timeout_s=self._timeout_s)

    async def insert(self, record: NewKeyRecord, *, max_usable: int) -> StoredKey:
        def insert(conn: psycopg.Connection[Any]) -> StoredKey:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (KEY_CREATION_LOCK_KEY,))
            row = conn.execute(f"SELECT count(*) FROM api_keys k WHERE {_USABLE}").fetchone()
            assert row is not None
            if row[0] >= max_usable:
                raise errors.Conflict(
                    f"there are already {max_usable} usable API keys; revoke some first",
                    code=ErrorCode.TOO_MANY_KEYS,
                )
            project_id = _project_id(conn, record.project) if record.project else None
            row = conn.execute(
                "INSERT INTO api_keys"
                " (key_id, name, display_prefix, key_hash, scopes, project_id, expires_at)"
                " VALUES (%s, %s, %s, %s, %s, %s,"
                "  now() + make_interval(secs => %s::float8))"
                " RETURNING extract(epoch FROM expires_at)::float8",
                (
                    record.key_id,
                    record.name,
                    record.display_prefix,
                    record.digest,
                    list(record.scopes),
                    project_id,
                    record.expires_in_s,
                ),
            ).fetchone()
            assert row is not None
            info = _select_key(conn, record.key_id)
            assert info is not None
            return StoredKey(info=info, expires_at_s=row[0])

        return await self._pg.run(insert, timeout_s=self._timeout_s)

    async def list_keys(self, *, project: str | None) -> list[KeyInfo]:
        def select(conn: psycopg.Connection[Any]) -> list[KeyInfo]:
            rows = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys k LEFT JOIN projects p"
                " ON p.id = k.project_id WHERE %(project)s::text IS NULL OR p.name = %(project)s"
                " ORDER BY k.created_at DESC, k.key_id",
                {"project": project},
            ).fetchall()
            return [_key_info(row) for row in rows]

        return await self._pg.run(select, timeout_s=self._timeout_s)

    async def revoke(self, key_id: str, *, project: str | None) -> KeyInfo:
        def revoke(conn: psycopg.Connection[Any]) -> KeyInfo:
            conn.execute(
                "UPDATE api_keys SET revoked_at = now()"
                " WHERE key_id = %(key_id)s AND revoked_at IS NULL AND (%(project)s::text IS NULL"
                "  OR project_id = (SELECT id FROM projects WHERE name = %(project)s))",
                {"key_id": key_id, "project": project},
            )
            info = _select_key(conn, key_id)
            if info is None or (project is not None and info.project != project):
                raise errors.NotFound(
                    f"API key {key_id!r} not found", code=ErrorCode.KEY_NOT_FOUND, field="key_id"
                )
            return info

        return await self._pg.run(revoke, timeout_s=self._timeout_s)

    async def record_last_used(self, used: Mapping[str, float]) -> None:
        if not used:
            return
        key_ids = sorted(used)

        def record(conn: psycopg.Connection[Any]) -> None:
            # Sorted ids: concurrent writers from several processes lock rows in one order.
            conn.execute(
                "UPDATE api_keys k SET last_used_at = u.at"
                " FROM (SELECT unnest(%s::text[]) AS key_id,"
                "       to_timestamp(unnest(%s::float8[])) AS at) AS u"
                " WHERE k.key_id = u.key_id"
                " AND (k.last_used_at IS NULL OR k.last_used_at < u.at)",
                (key_ids, [used[key_id] for key_id in key_ids]),
            )

        await self._pg.run(record, timeout_s=self._timeout_s)


def _select_key(conn: psycopg.Connection[Any], key_id: str) -> KeyInfo | None:
    row = conn.execute(
        f"SELECT {_KEY_COLUMNS} FROM api_keys k LEFT JOIN projects p ON p.id = k.project_id"
        " WHERE k.key_id = %s",
        (key_id,),
    ).fetchone()
    return None if row is None else _key_info(row)


def _key_info(row: tuple[Any, ...]) -> KeyInfo:
    key_id, name, prefix, scopes, project, created, expires, last_used, revoked, now = row
    status: Literal["active", "expired", "revoked"]
    if revoked is not None:
        status = "revoked"
    elif expires is not None and expires <= now:
        status = "expired"
    else:
        status = "active"
    return KeyInfo(
        key_id=key_id,
        name=name,
        display_prefix=prefix,
        scopes=list(scopes),
        project=project,
        created_at=iso_utc(created),
        expires_at=iso_utc(expires) if expires is not None else None,
        last_used_at=iso_utc(last_used) if last_used is not None else None,
        revoked_at=iso_utc(revoked) if revoked is not None else None,
        status=status,
    )



def _project_id(conn: psycopg.Connection[Any], name: str) -> int:
    """A key is scoped to a project that exists: a typo must not create a project silently
    (404 `project_not_found`; create the project first)."""
    row = conn.execute("SELECT id FROM projects WHERE name = %s", (name,)).fetchone()
    if row is None:
        raise errors.NotFound(f"project {name!r} does not exist; create it first",
                              code=ErrorCode.PROJECT_NOT_FOUND, field="project")
    project_id: int = row[0]
    return project_id
