"""Test backends for PostgreSQL: a throwaway Debian PostgreSQL 15 cluster and the embedded pgserver.

Owns: creating, starting and stopping (by PID) a private cluster on a free loopback port for the
whole test session, a fresh empty database per test, and one embedded pgserver (PostgreSQL 16
from the wheel) under a reachable temp dir. Fixtures: `postgres_server`, `postgres_dsn` (a fresh
database on the cluster), `embedded_postgres_dsn`, and `pg_dsn`: a fresh database on the cluster,
or on each engine a module names with `pytestmark = pytest.mark.postgres_engines("debian",
"embedded")`.
Must not import the server's storage internals beyond `open_embedded_postgres` (the thing the
embedded fixture exists to exercise). Never mocks PostgreSQL.
Invariants: every process started here is stopped here, by its PID, with a deadline; a missing
Debian binary fails the session with a message saying what to install (never a skip). Under
pytest-xdist each worker has its own cluster (its own temp dir and port: a first start whose
port was taken meanwhile moves to another, see ports.py) and its own embedded server.

Why the directories look the way they do: as root, Debian's tools must run as the `postgres`
user, so the cluster's base dir is chowned to it; pgserver runs postgres as its own `pgserver`
user, so its temp dir is made mode 755 (mkdtemp's 700 would be unreachable for that user).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio.from_thread
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from mlrun.server.storage.postgres.embedded import open_embedded_postgres

from backends.ports import PORT_ATTEMPTS, address_was_in_use, free_port

PG_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
_START_TIMEOUT_S = 30
_STOP_TIMEOUT_S = 30.0
_CONNECT_TIMEOUT_S = 10


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Wait for a process that is not our child (the postmaster daemonises) to exit.

    A pidfd becomes readable when the process exits, so this waits on an event, not a poll.
    An exited process counts even while it is an unreaped zombie (PID 1 of some containers
    never reaps the daemonised postmaster)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(pidfd)


@dataclass
class PostgresCluster:
    """A private PostgreSQL 15 cluster: data under `base_dir/data`, TCP on 127.0.0.1:`port`."""

    base_dir: Path
    port: int
    host: str = "127.0.0.1"
    pid: int | None = field(default=None)
    _started_once: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def _as_postgres(self, *args: str, timeout_s: float) -> None:
        command = ["runuser", "-u", "postgres", "--", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            log = self.base_dir / "postgres.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:1])} failed: {result.stderr.strip()}\n{tail}")

    def initdb(self) -> None:
        self._as_postgres(
            str(PG_BIN_DIR / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
            "--auth=trust", "-E", "UTF8", "--no-sync", timeout_s=60,
        )

    def start(self) -> None:
        """Start and wait until it accepts connections. A first start whose port was taken
        meanwhile (tests/backends/ports.py) tries again on another; a restart keeps its port."""
        attempts = 1 if self._started_once else PORT_ATTEMPTS
        log = self.base_dir / "postgres.log"
        for attempt in range(attempts):
            if attempt > 0:
                self.port = free_port()
            log_offset = log.stat().st_size if log.exists() else 0
            try:
                self._start_on_port()
            except RuntimeError:
                this_start = log.read_bytes()[log_offset:] if log.exists() else b""
                if attempt + 1 < attempts and address_was_in_use(this_start.decode("latin-1")):
                    continue
                raise
            self._started_once = True
            return

    def _start_on_port(self) -> None:
        # fsync off: a test cluster trades crash safety for speed; a clean stop still writes all.
        options = (
            f"-c listen_addresses={self.host} -p {self.port} -k {self.base_dir}"
            " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        )
        self._as_postgres(
            str(PG_BIN_DIR / "pg_ctl"), "-D", str(self.data_dir),
            "-l", str(self.base_dir / "postgres.log"), "-w", "-t", str(_START_TIMEOUT_S),
            "-o", options, "start", timeout_s=_START_TIMEOUT_S + 10,
        )
        pid_line = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
        self.pid = int(pid_line)

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT), escalating to immediate (SIGQUIT), then SIGKILL."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        for sig, timeout_s in (
            (signal.SIGINT, _STOP_TIMEOUT_S),
            (signal.SIGQUIT, 10.0),
            (signal.SIGKILL, 10.0),
        ):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            if wait_for_exit(pid, timeout_s):
                return
        raise RuntimeError(f"postmaster {pid} did not exit")


@contextlib.contextmanager
def fresh_database(admin_dsn: str) -> Iterator[str]:
    """Create an empty database on the server of `admin_dsn`, yield its DSN, drop it after."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(
            admin_dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S
        ) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def pytest_configure(config: pytest.Config) -> None:
    """Registers the `postgres_engines` marker. Creates pgserver's system user before any
    pytest-xdist worker starts: as root, pgserver runs postgres as a user `pgserver` that it
    creates on first use with a bare `useradd`, outside its own lock, so workers starting
    embedded servers at the same moment race for it and the loser fails. The controller (or a
    lone pytest) creates it once."""
    config.addinivalue_line(
        "markers",
        "postgres_engines(*engines): run each test that uses `pg_dsn` once per engine named"
        " (\"debian\": the session's Debian cluster, \"embedded\": the session's pgserver)",
    )
    if os.geteuid() != 0 or hasattr(config, "workerinput"):
        return
    try:
        pwd.getpwnam("pgserver")
    except KeyError:
        from pgserver.utils import ensure_user_exists

        ensure_user_exists("pgserver")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresCluster]:
    needed = ("initdb", "pg_ctl", "postgres")
    missing = [name for name in needed if not (PG_BIN_DIR / name).exists()]
    if missing:
        pytest.fail(
            f"Debian PostgreSQL 15 binaries missing in {PG_BIN_DIR} ({', '.join(missing)}): "
            "run `apt-get install -y postgresql`",
            pytrace=False,
        )
    postgres_user = pwd.getpwnam("postgres")
    base_dir = Path(tempfile.mkdtemp(prefix="mlrun-test-pg-"))
    os.chown(base_dir, postgres_user.pw_uid, postgres_user.pw_gid)
    cluster = PostgresCluster(base_dir=base_dir, port=free_port())
    try:
        cluster.initdb()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresCluster) -> Iterator[str]:
    """A fresh, empty database on the Debian cluster."""
    with fresh_database(postgres_server.dsn()) as dsn:
        yield dsn


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`pytestmark = pytest.mark.postgres_engines("debian", "embedded")` in a module runs its
    PostgreSQL tests on both engines (test ids `[debian]` and `[embedded]`)."""
    marker = metafunc.definition.get_closest_marker("postgres_engines")
    if marker is not None and "postgres_engine" in metafunc.fixturenames:
        metafunc.parametrize("postgres_engine", marker.args)


@pytest.fixture
def postgres_engine() -> str:
    """The engine `pg_dsn` is on: the Debian cluster unless the module's `postgres_engines`
    marker parametrizes it."""
    return "debian"


@pytest.fixture
def pg_dsn(postgres_engine: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh empty database on the engine `postgres_engine` names (`postgres_dsn` is always
    on the Debian cluster)."""
    if postgres_engine == "embedded":
        admin_dsn: str = request.getfixturevalue("embedded_postgres_dsn")
    else:
        admin_dsn = request.getfixturevalue("postgres_server").dsn()
    with fresh_database(admin_dsn) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def embedded_postgres_dsn() -> Iterator[str]:
    """The embedded default (pgserver) run through `open_embedded_postgres` for the session.

    Session fixtures cannot be async under pytest-trio, so the async context manager runs in a
    blocking portal: a trio loop on its own thread for the whole session."""
    base_dir = Path(tempfile.mkdtemp(prefix="mlrun-test-embedded-pg-"))
    base_dir.chmod(0o755)
    try:
        with (
            anyio.from_thread.start_blocking_portal(backend="trio") as portal,
            portal.wrap_async_context_manager(open_embedded_postgres(base_dir)) as dsn,
        ):
            yield dsn
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
