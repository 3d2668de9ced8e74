"""ClickHouse schema migrations: `apply_clickhouse_migrations` applies the
`sql/clickhouse/NNNN_*.sql` files (found by `storage.migrations`) that the database's
`schema_migrations` ledger lacks, in order, over any `ClickHouse` transport.

Must not import a transport (it takes the `ClickHouse` protocol), the edges, or other storages.

Invariants: a version is recorded only after all its statements succeeded (they are IF NOT
EXISTS, so a crash mid-version re-runs it safely); a recorded version whose file changed stops
start-up with ConfigError (files are forward-only).
"""

from __future__ import annotations

import contextlib
import time
from typing import Final

from mlrun.server.errors import ConfigError
from mlrun.server.protocols.clickhouse import quote_list
from mlrun.server.storage.clickhouse.client import ClickHouse
from mlrun.server.storage.migrations import load_migrations

_MIGRATION_TIMEOUT_S: Final = 60.0
_LEDGER_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS schema_migrations"
    " (version UInt32, name String, checksum String, applied_at_ms Int64)"
    " ENGINE = MergeTree ORDER BY version"
)


async def apply_clickhouse_migrations(
    ch: ClickHouse, *, lock: contextlib.AbstractAsyncContextManager[None] | None = None
) -> list[int]:
    """Create `ch.database` if needed, apply the schema versions its ledger lacks, in order, and
    return them. Each version is recorded right after all its statements succeeded, so a crash
    mid-version re-runs that version (its statements are IF NOT EXISTS). `lock` (a PostgreSQL
    advisory lock in the server) serialises servers starting at once.

    Raises ConfigError when a recorded version's checksum differs from its file: released schema
    files never change; a change goes into a new NNNN file.
    """
    migrations = load_migrations("clickhouse")
    async with lock if lock is not None else contextlib.nullcontext():
        await ch.ensure_database(timeout_s=_MIGRATION_TIMEOUT_S)
        await ch.execute(_LEDGER_DDL, timeout_s=_MIGRATION_TIMEOUT_S)
        rows = await ch.query_rows(
            "SELECT version, checksum FROM schema_migrations", timeout_s=_MIGRATION_TIMEOUT_S
        )
        recorded: dict[int, set[str]] = {}
        for row in rows:
            recorded.setdefault(int(row["version"]), set()).add(str(row["checksum"]))
        applied: list[int] = []
        for migration in migrations:
            checksums = recorded.get(migration.version)
            if checksums is not None:
                if checksums != {migration.checksum}:
                    raise ConfigError(
                        f"clickhouse schema {migration.version:04d}_{migration.name}.sql changed"
                        f" after it was applied to database {ch.database!r} (recorded checksum"
                        f" {sorted(checksums)[0][:12]}, file {migration.checksum[:12]}); schema"
                        " files are forward-only: put the change in a new file"
                    )
                continue
            for statement in migration.statements:
                await ch.execute(statement, timeout_s=_MIGRATION_TIMEOUT_S)
            ledger_row = quote_list(
                [migration.version, migration.name, migration.checksum, time.time_ns() // 1_000_000]
            )
            await ch.execute(
                "INSERT INTO schema_migrations (version, name, checksum, applied_at_ms)"
                f" VALUES {ledger_row}",
                timeout_s=_MIGRATION_TIMEOUT_S,
            )
            applied.append(migration.version)
        return applied
