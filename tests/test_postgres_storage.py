"""Storage tests for PostgreSQL: pooled client, migrations, advisory locks, embedded pgserver.

Most tests run twice, against the Debian PostgreSQL 15 cluster and the embedded pgserver
(PostgreSQL 16), each time on a fresh database (fixture `pg_dsn`). Tests that stop a server use
the Debian cluster, whose stop/start keeps its port. No mocks: faults are real (stopped server,
terminated backends, cancelled statements).
"""

from __future__ import annotations

import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import psycopg
import psycopg.errors
import pytest

from mlrun.server import errors
from mlrun.server.storage.migrations import load_migrations
from mlrun.server.storage.postgres.client import Postgres, apply_postgres_migrations, open_postgres
from mlrun.server.storage.postgres.embedded import open_embedded_postgres

from backends.postgres import PostgresCluster, wait_for_exit

pytestmark = [pytest.mark.timeout(120), pytest.mark.postgres_engines("debian", "embedded")]

EXPECTED_VERSIONS = [m.version for m in load_migrations("postgres")]
LOCK_KEY = 0x7E57_0001
EXPECTED_TABLES = {
    "projects", "runs", "run_params", "run_tags", "project_tag_keys", "run_metric_names",
    "artifacts", "api_keys", "ingest_batches", "schema_migrations",
    "purge_jobs", "purge_runs", "purge_objects", "retention_rebuilds",
    "mlflow_experiments", "mlflow_experiment_tags", "mlflow_runs", "mlflow_run_inputs",
    "mlflow_step0_origins", "run_imports",
}


async def _scalar(pg: Postgres, query: str, params: tuple[Any, ...] = ()) -> Any:
    def fetch(conn: psycopg.Connection[Any]) -> Any:
        row = conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]

    return await pg.run(fetch, timeout_s=10)


async def _active_statements(pg: Postgres, marker: str) -> int:
    """Statements of other sessions currently running whose text contains `marker`."""
    count: int = await _scalar(
        pg,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE state = 'active' AND pid <> pg_backend_pid() AND datname = current_database()"
        " AND strpos(query, %s) > 0",
        (marker,),
    )
    return count


async def _wait_until_active(pg: Postgres, marker: str) -> None:
    # Bounded poll: the server offers no event for "a statement started running".
    for _ in range(200):
        if await _active_statements(pg, marker) > 0:
            return
        await anyio.sleep(0.05)
    pytest.fail(f"no statement containing {marker!r} started")


def _execute(statement: str) -> Callable[[psycopg.Connection[Any]], object]:
    return lambda conn: conn.execute(statement)


async def _create_table(pg: Postgres) -> None:
    await pg.run(lambda conn: conn.execute("CREATE TABLE t (x int PRIMARY KEY)"))


async def _values(pg: Postgres) -> list[int]:
    def fetch(conn: psycopg.Connection[Any]) -> list[int]:
        return [row[0] for row in conn.execute("SELECT x FROM t ORDER BY x")]

    return await pg.run(fetch)


# --- migrations -------------------------------------------------------------------------------


async def test_migrations_apply_to_empty_database_then_noop(pg_dsn: str) -> None:
    with anyio.fail_after(60):
        async with open_postgres(pg_dsn) as pg:
            assert await apply_postgres_migrations(pg) == EXPECTED_VERSIONS
            assert await apply_postgres_migrations(pg) == []

            def tables(conn: psycopg.Connection[Any]) -> set[str]:
                rows = conn.execute(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = 'public'"
                )
                return {row[0] for row in rows}

            assert await pg.run(tables) == EXPECTED_TABLES

            def ledger(conn: psycopg.Connection[Any]) -> list[tuple[int, str]]:
                rows = conn.execute("SELECT version, checksum FROM schema_migrations ORDER BY 1")
                return [(row[0], row[1]) for row in rows]

            expected = [(m.version, m.checksum) for m in load_migrations("postgres")]
            assert await pg.run(ledger) == expected


async def test_concurrent_appliers_apply_each_version_once(pg_dsn: str) -> None:
    results: list[list[int]] = []

    async def apply() -> None:
        async with open_postgres(pg_dsn, max_connections=2) as pg:
            results.append(await apply_postgres_migrations(pg))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(apply)
            tg.start_soon(apply)
        assert sorted(results, key=len) == [[], EXPECTED_VERSIONS]
        async with open_postgres(pg_dsn) as pg:
            per_version = await pg.run(
                lambda conn: conn.execute(
                    "SELECT version, count(*) FROM schema_migrations GROUP BY version ORDER BY 1"
                ).fetchall()
            )
            assert per_version == [(version, 1) for version in EXPECTED_VERSIONS]


async def test_changed_schema_file_is_a_clear_error(pg_dsn: str) -> None:
    with anyio.fail_after(60):
        async with open_postgres(pg_dsn) as pg:
            await apply_postgres_migrations(pg)
            # Simulate an edited, already released file: the ledger no longer matches it.
            await pg.run(
                lambda conn: conn.execute(
                    "UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = 1"
                )
            )
            with pytest.raises(errors.ConfigError) as caught:
                await apply_postgres_migrations(pg)
            message = str(caught.value)
            assert "0001_initial.sql" in message and "\n" not in message


async def test_schema_enforces_its_invariants(pg_dsn: str) -> None:
    with anyio.fail_after(60):
        async with open_postgres(pg_dsn) as pg:
            await apply_postgres_migrations(pg)

            def populate(conn: psycopg.Connection[Any]) -> int:
                row = conn.execute(
                    "INSERT INTO projects (name) VALUES ('p') RETURNING id"
                ).fetchone()
                assert row is not None
                project_id: int = row[0]
                for i, created in enumerate(["2024-01-01", "2024-01-02", "2024-01-02"]):
                    conn.execute(
                        "INSERT INTO runs (run_id, project_id, name, created_at)"
                        " VALUES (%s, %s, %s, %s)",
                        (f"r{i}", project_id, f"Run {i}", created),
                    )
                conn.execute("INSERT INTO run_params VALUES ('r0', 'lr', '0.1')")
                conn.execute("INSERT INTO run_tags VALUES ('r0', 'env', 'prod')")
                conn.execute("INSERT INTO run_metric_names VALUES ('r0', 'loss')")
                conn.execute(
                    "INSERT INTO ingest_batches (run_id, batch_id, payload_hash, points)"
                    " VALUES ('r0', 'b1', '\\x00', 3)"
                )
                conn.execute(
                    "INSERT INTO artifacts (artifact_id, run_id, name, storage_key)"
                    " VALUES ('a1', 'r0', 'model.pt', 'k/a1')"
                )
                return project_id

            project_id = await pg.run(populate)

            # Keyset pagination over (created_at DESC, run_id DESC): page 2 after ('01-02', r2).
            def page(conn: psycopg.Connection[Any]) -> list[str]:
                rows = conn.execute(
                    "SELECT run_id FROM runs WHERE project_id = %s"
                    " AND (created_at, run_id) < ('2024-01-02'::timestamptz, 'r2')"
                    " ORDER BY created_at DESC, run_id DESC LIMIT 10",
                    (project_id,),
                )
                return [row[0] for row in rows]

            assert await pg.run(page) == ["r1", "r0"]

            bad_statements = [
                "UPDATE runs SET status = 'bogus', finished_at = now() WHERE run_id = 'r0'",
                "UPDATE runs SET status = 'finished' WHERE run_id = 'r0'",  # no finished_at
                "UPDATE artifacts SET status = 'finalized' WHERE artifact_id = 'a1'",
                "INSERT INTO run_params VALUES ('r1', 'k', repeat('x', 32001))",
            ]
            for statement in bad_statements:
                with pytest.raises(errors.BackendError) as caught:
                    await pg.run(_execute(statement))
                assert isinstance(caught.value.__cause__, psycopg.errors.CheckViolation)

            # Deleting a run takes its params, tags, metric names and artifacts along; its
            # ledger rows stay for the purge job to delete in chunks (0010_lifecycle.sql).
            await pg.run(lambda conn: conn.execute("DELETE FROM runs WHERE run_id = 'r0'"))
            for table in ("run_params", "run_tags", "run_metric_names", "artifacts"):
                assert await _scalar(pg, f"SELECT count(*) FROM {table}") == 0
            assert await _scalar(pg, "SELECT count(*) FROM ingest_batches") == 1
            # ... but a project with runs cannot be deleted.
            with pytest.raises(errors.BackendError) as caught:
                await pg.run(lambda conn: conn.execute("DELETE FROM projects"))
            assert isinstance(caught.value.__cause__, psycopg.errors.ForeignKeyViolation)


# --- run(): transactions and errors -----------------------------------------------------------


async def test_run_commits_on_return_and_rolls_back_on_error(pg_dsn: str) -> None:
    with anyio.fail_after(30):
        async with open_postgres(pg_dsn) as pg:
            await _create_table(pg)
            await pg.run(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))

            def insert_then_fail(conn: psycopg.Connection[Any]) -> None:
                conn.execute("INSERT INTO t VALUES (2)")
                raise errors.NotFound("no such run")

            with pytest.raises(errors.NotFound):  # our own errors pass through unchanged
                await pg.run(insert_then_fail)
            assert await _values(pg) == [1]


async def test_unique_violation_surfaces_as_backend_error_or_is_caught_in_fn(pg_dsn: str) -> None:
    with anyio.fail_after(30):
        async with open_postgres(pg_dsn) as pg:
            await _create_table(pg)
            await pg.run(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))

            def insert_duplicate(conn: psycopg.Connection[Any]) -> None:
                conn.execute("INSERT INTO t VALUES (5)")
                conn.execute("INSERT INTO t VALUES (1)")

            with pytest.raises(errors.BackendError) as caught:
                await pg.run(insert_duplicate)
            assert isinstance(caught.value.__cause__, psycopg.errors.UniqueViolation)
            assert caught.value.detail.startswith("23505")
            assert "duplicate" not in caught.value.message  # driver text stays in `detail`
            assert await _values(pg) == [1]

            def insert_if_absent(conn: psycopg.Connection[Any]) -> str:
                conn.execute("INSERT INTO t VALUES (6)")
                try:
                    with conn.transaction():  # a savepoint: the outer transaction survives
                        conn.execute("INSERT INTO t VALUES (1)")
                except psycopg.errors.UniqueViolation:
                    return "exists"
                return "inserted"

            assert await pg.run(insert_if_absent) == "exists"
            assert await _values(pg) == [1, 6]

            def swallow_without_savepoint(conn: psycopg.Connection[Any]) -> str:
                conn.execute("INSERT INTO t VALUES (8)")
                try:
                    conn.execute("INSERT INTO t VALUES (1)")
                except psycopg.errors.UniqueViolation:
                    return "exists"  # but the transaction is aborted: nothing can commit
                return "inserted"

            with pytest.raises(errors.BackendError):
                await pg.run(swallow_without_savepoint)
            assert await _values(pg) == [1, 6]


# --- cancellation and deadlines ---------------------------------------------------------------


async def test_cancelled_running_query_stops_on_server_and_rolls_back(pg_dsn: str) -> None:
    marker = "mlrun-test-cancel-running"
    with anyio.fail_after(30):
        async with open_postgres(pg_dsn) as pg:
            await _create_table(pg)
            scope = anyio.CancelScope()

            def insert_then_sleep(conn: psycopg.Connection[Any]) -> None:
                conn.execute("INSERT INTO t VALUES (7)")
                conn.execute(f"SELECT pg_sleep(600) /* {marker} */")

            async def sleeper() -> None:
                with scope:
                    await pg.run(insert_then_sleep, timeout_s=600)
                    pytest.fail("run() returned although cancelled")

            async with anyio.create_task_group() as tg:
                tg.start_soon(sleeper)
                await _wait_until_active(pg, marker)
                scope.cancel()
            assert scope.cancelled_caught
            # run() re-raised only after its worker thread finished: the statement is gone.
            assert await _active_statements(pg, marker) == 0
            assert await _values(pg) == []


async def test_cancel_landing_between_statements_still_stops_the_query(pg_dsn: str) -> None:
    """A cancel request that reaches PostgreSQL before the statement starts is ignored by the
    server; run() must keep cancelling until its thread is done (else this hits fail_after)."""
    marker = "mlrun-test-cancel-early"
    with anyio.fail_after(30):
        async with open_postgres(pg_dsn) as pg:
            started = anyio.Event()
            scope = anyio.CancelScope()

            def signal_then_sleep(conn: psycopg.Connection[Any]) -> None:
                anyio.from_thread.run_sync(started.set)
                # Python work between statements: the first cancel request arrives meanwhile,
                # while the session is idle in its transaction.
                time.sleep(0.3)
                conn.execute(f"SELECT pg_sleep(600) /* {marker} */")

            async def sleeper() -> None:
                with scope:
                    await pg.run(signal_then_sleep, timeout_s=600)

            async with anyio.create_task_group() as tg:
                tg.start_soon(sleeper)
                await started.wait()
                scope.cancel()
            assert scope.cancelled_caught
            assert await _active_statements(pg, marker) == 0


async def test_deadline_cancels_statement_and_raises_backend_timeout(pg_dsn: str) -> None:
    marker = "mlrun-test-deadline"
    with anyio.fail_after(30):
        async with open_postgres(pg_dsn) as pg:
            with pytest.raises(errors.BackendTimeout) as caught:
                await pg.run(
                    lambda conn: conn.execute(f"SELECT pg_sleep(600) /* {marker} */"),
                    timeout_s=1,
                )
            assert isinstance(caught.value.__cause__, psycopg.errors.QueryCanceled)
            assert caught.value.backend == "postgres" and caught.value.retryable
            assert await _active_statements(pg, marker) == 0


async def test_run_statement_deadline_cancels_statement_and_raises_backend_timeout(
    pg_dsn: str,
) -> None:
    marker = "mlrun-test-statement-deadline"
    with anyio.fail_after(30):
        async with open_postgres(pg_dsn) as pg:
            with pytest.raises(errors.BackendTimeout) as caught:
                await pg.run_statement(
                    lambda conn: conn.execute(f"SELECT pg_sleep(600) /* {marker} */"),
                    timeout_s=1,
                )
            assert isinstance(caught.value.__cause__, psycopg.errors.QueryCanceled)
            assert await _active_statements(pg, marker) == 0


async def test_run_statement_keeps_each_connections_statement_timeout_current(
    pg_dsn: str,
) -> None:
    """One round trip: autocommit, and the session's statement_timeout follows each call's
    `timeout_s`; a transaction's SET LOCAL does not outlive it."""

    def show(conn: psycopg.Connection[Any]) -> tuple[str, str]:
        row = conn.execute("SELECT current_setting('statement_timeout')").fetchone()
        assert row is not None
        # IDLE after the statement: autocommit, no transaction was opened; INTRANS in `run`.
        return str(row[0]), str(conn.info.transaction_status.name)

    with anyio.fail_after(30):
        async with open_postgres(pg_dsn, max_connections=1) as pg:
            assert await pg.run_statement(show, timeout_s=0.5) == ("500ms", "IDLE")
            assert (await pg.run_statement(show, timeout_s=3))[0] == "3s"
            # Server side too: a statement longer than the last call's timeout would have been
            # cancelled; this one is within its own.
            await pg.run_statement(lambda conn: conn.execute("SELECT pg_sleep(0.8)"),
                                   timeout_s=3)
            in_transaction = await pg.run(show, timeout_s=2)
            assert in_transaction[1] == "INTRANS"
            assert in_transaction[0] != "3s"  # SET LOCAL, from the transaction's deadline
            assert (await pg.run_statement(show, timeout_s=3))[0] == "3s"
            await _create_table(pg)
            await pg.run_statement(_execute("INSERT INTO t VALUES (5)"), timeout_s=3)
            assert await _values(pg) == [5]  # autocommit: committed without a COMMIT


# --- availability -----------------------------------------------------------------------------


async def test_ping_on_stopped_server_is_unavailable_then_pool_recovers(
    postgres_server: PostgresCluster, postgres_dsn: str
) -> None:
    with anyio.fail_after(90):
        async with open_postgres(postgres_dsn) as pg:
            await pg.ping(timeout_s=5)
            await anyio.to_thread.run_sync(postgres_server.stop)
            try:
                for _ in range(2):  # the stale pooled connection, then no connection at all
                    with anyio.fail_after(10):
                        with pytest.raises(errors.BackendUnavailable) as caught:
                            await pg.ping(timeout_s=2)
                    assert caught.value.retryable
            finally:
                await anyio.to_thread.run_sync(postgres_server.start)
            # Same pool, not reopened: it reconnects by itself.
            await pg.ping(timeout_s=15)
            assert await _scalar(pg, "SELECT 41 + 1") == 42


async def test_terminated_backends_are_replaced_without_errors(postgres_dsn: str) -> None:
    with anyio.fail_after(30):
        async with open_postgres(postgres_dsn, max_connections=4) as pg:
            # Make the pool hold several idle connections.
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(pg.run, lambda conn: conn.execute("SELECT pg_sleep(0.2)"))
            with psycopg.connect(postgres_dsn, autocommit=True) as admin:
                # With a timeout, pg_terminate_backend waits until the backends are gone.
                terminated = admin.execute(
                    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                    " WHERE application_name = 'mlrun-server' AND datname = current_database()"
                ).fetchone()
            assert terminated is not None and terminated[0] >= 2
            for _ in range(4):
                assert await _scalar(pg, "SELECT 1") == 1


async def test_open_does_not_wait_for_an_unreachable_server(
    postgres_server: PostgresCluster,
) -> None:
    # A loopback port with nothing listening (bound, then released).
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    with anyio.fail_after(20):
        async with open_postgres(dsn, connect_timeout_s=1) as pg:
            with pytest.raises(errors.BackendUnavailable):
                await pg.ping(timeout_s=1)


async def test_invalid_dsn_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError):
        async with open_postgres("host=x port"):
            pass


# --- advisory locks ---------------------------------------------------------------------------


async def _advisory_locks_held(pg: Postgres) -> int:
    count: int = await _scalar(
        pg,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    return count


async def test_advisory_lock_excludes_a_second_holder(pg_dsn: str) -> None:
    with anyio.fail_after(30):
        async with open_postgres(pg_dsn) as pg, open_postgres(pg_dsn) as other_server:
            async with pg.advisory_lock(LOCK_KEY, timeout_s=5):
                assert await _advisory_locks_held(pg) == 1
                with pytest.raises(errors.BackendTimeout):
                    async with other_server.advisory_lock(LOCK_KEY, timeout_s=0.5):
                        pytest.fail("second holder got the lock")
            assert await _advisory_locks_held(pg) == 0
            async with other_server.advisory_lock(LOCK_KEY, timeout_s=5):
                assert await _advisory_locks_held(pg) == 1
            assert await _advisory_locks_held(pg) == 0
            assert pg.statistics().pool_size == pg.statistics().pool_available


async def test_advisory_lock_released_on_cancellation(pg_dsn: str) -> None:
    marker = "pg_advisory_lock"
    with anyio.fail_after(30):
        async with open_postgres(pg_dsn) as pg:
            # Cancelled while holding the lock.
            holding = anyio.Event()
            holder_scope = anyio.CancelScope()

            async def hold() -> None:
                with holder_scope:
                    async with pg.advisory_lock(LOCK_KEY, timeout_s=5):
                        holding.set()
                        await anyio.sleep_forever()

            async with anyio.create_task_group() as tg:
                tg.start_soon(hold)
                await holding.wait()
                holder_scope.cancel()
            assert await _advisory_locks_held(pg) == 0

            # Cancelled while waiting for it: the wait stops and the lock is not taken later.
            waiter_scope = anyio.CancelScope()

            async def wait_for_lock() -> None:
                with waiter_scope:
                    async with pg.advisory_lock(LOCK_KEY, timeout_s=60):
                        pytest.fail("waiter got a lock that is held")

            async with pg.advisory_lock(LOCK_KEY, timeout_s=5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_for_lock)
                    await _wait_until_active(pg, marker)
                    waiter_scope.cancel()
                assert await _active_statements(pg, marker) == 0
            assert await _advisory_locks_held(pg) == 0
            stats = pg.statistics()
            assert stats.pool_size == stats.pool_available  # every connection went back


# --- embedded PostgreSQL ----------------------------------------------------------------------


async def test_embedded_data_survives_stop_and_start(reachable_tmp_dir: Path) -> None:
    data_dir = reachable_tmp_dir / "mlrun-data"
    with anyio.fail_after(90):
        async with open_embedded_postgres(data_dir) as dsn:
            async with open_postgres(dsn) as pg:
                assert await apply_postgres_migrations(pg) == EXPECTED_VERSIONS
                await pg.run(_execute("INSERT INTO projects (name) VALUES ('kept')"))
            pid_file = data_dir / "postgres" / "postmaster.pid"
            postmaster_pid = int(pid_file.read_text().splitlines()[0])
        # Stopped on exit (already exited: no wait), data kept.
        assert wait_for_exit(postmaster_pid, timeout_s=0)
        assert (data_dir / "postgres" / "PG_VERSION").exists()

        async with open_embedded_postgres(data_dir) as dsn, open_postgres(dsn) as pg:
            assert await apply_postgres_migrations(pg) == []
            assert await _scalar(pg, "SELECT name FROM projects") == "kept"


async def test_embedded_refuses_a_data_dir_other_users_cannot_reach() -> None:
    private = Path(tempfile.mkdtemp(prefix="mlrun-test-private-"))  # mode 700
    try:
        with anyio.fail_after(30), pytest.raises(errors.ConfigError) as caught:
            async with open_embedded_postgres(private / "data"):
                pytest.fail("started under a mode-700 directory")
        message = str(caught.value)
        assert "MLRUN_DATA_DIR" in message and str(private) in message and "\n" not in message
        # Refused before pgserver could widen the directory's permissions.
        assert stat.S_IMODE((await anyio.Path(private).stat()).st_mode) == 0o700
        assert not await anyio.Path(private / "data").exists()
    finally:
        shutil.rmtree(private, ignore_errors=True)


# --- asyncio ----------------------------------------------------------------------------------


def test_run_and_cancellation_work_on_asyncio(postgres_dsn: str) -> None:
    async def main() -> None:
        with anyio.fail_after(30):
            async with open_postgres(postgres_dsn) as pg:
                assert await _scalar(pg, "SELECT 2 * 21") == 42
                with anyio.move_on_after(0.5) as scope:
                    await pg.run(lambda conn: conn.execute("SELECT pg_sleep(600)"), timeout_s=600)
                assert scope.cancelled_caught
                assert await _active_statements(pg, "pg_sleep(600)") == 0

    anyio.run(main, backend="asyncio")
