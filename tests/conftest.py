"""Session-wide test wiring: real backends started on free loopback ports (see tests/backends/),
and the environment for an `mlrun serve` child process on fresh databases of those backends.

Each backend module starts its server under a temp dir on a free port and stops it by PID at
session end. Under pytest-xdist (scripts/test.sh runs `-n auto`) every worker is a session of its
own, with backends of its own; nothing here may assume one process runs the whole suite.
Never mock a database here; fakes belong only where a fault is injected on cue.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from mlrun.server.storage.postgres.client import Postgres, apply_postgres_migrations, open_postgres

from readback import ClickHouseReader
from server_process import TEST_API_KEY, ServerProcess, real_backend_env

_MIGRATION_DEADLINE_S = 60

pytest_plugins = [
    "backends.postgres",
    "backends.clickhouse",
    "backends.s3",
    "backends.redis",
]


@pytest.fixture
def server_env(
    postgres_dsn: str, clickhouse_server: Any, clickhouse_database: str, s3_server: Any,
    tmp_path: Path,
) -> dict[str, str]:
    """Environment for a server on the session's real backends, with fresh databases; its
    data dir (the bootstrap key file) in the test's pytest temp dir."""
    return {
        "API_HOST": "127.0.0.1",
        "API_HTTP_PORT": "0",
        "API_GRPC_PORT": "0",
        "MLRUN_API_KEY": TEST_API_KEY,
        **real_backend_env(database_url=postgres_dsn, clickhouse=clickhouse_server,
                           clickhouse_database=clickhouse_database, s3=s3_server,
                           bucket=f"test-{uuid.uuid4().hex[:12]}"),
        "MLRUN_STARTUP_TIMEOUT_S": "20",
        "MLRUN_DATA_DIR": str(tmp_path / "mlrun-data"),
    }


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Collects started servers and stops any a test left running (by PID): SIGTERM first, so
    an embedded PostgreSQL the server started is shut down with it, SIGKILL only if that hangs."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.process is not None and server.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # stop() killed it then
                server.stop(timeout_s=10)


@pytest.fixture
def reachable_tmp_dir() -> Iterator[Path]:
    """A temp dir the embedded PostgreSQL's system user can reach (pytest's tmp_path sits
    under a mode-700 directory when run as root)."""
    path = Path(tempfile.mkdtemp(prefix="mlrun-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        # An embedded server's data (~40 MB of PostgreSQL cluster) must not pile up in /tmp.
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clickhouse_reader(clickhouse_server: Any, clickhouse_database: str) -> ClickHouseReader:
    return ClickHouseReader(clickhouse_server, clickhouse_database)


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[Postgres]:
    """`pg_dsn` opened with the migrations applied."""
    async with open_postgres(pg_dsn, max_connections=4) as opened:
        with anyio.fail_after(_MIGRATION_DEADLINE_S):
            await apply_postgres_migrations(opened)
        yield opened
