"""ClickHouse for the test session: the Debian `clickhouse-server` (18.16) as a child process,
and one shared chdb data directory.

Owns: writing the server's own config.xml and users.xml under a temp dir (loopback only, free
ports, every path and log file inside the temp dir, the `default` profile the README asks of an
18.16 server, a `mlrun` user with a password next to the password-less `default`), starting the
binary in the foreground, waiting with a deadline until it answers `SELECT 1` as that user, and
stopping it by PID. Tests may `stop()`/`start()` it (same port, same data) and
`freeze()`/`thaw()` it (SIGSTOP/SIGCONT) to exercise readiness and backpressure; whoever does
must restore it before the test ends.

Fixtures: `clickhouse_server` (session), `clickhouse_database` (a fresh database name per test),
`embedded_clickhouse_dir` (session: chdb serves one data directory per process, so every test
shares this one and isolates itself with a fresh database instead of a fresh directory).

Must not import the mlrun package: the fixtures stand apart from the code they test. A missing
clickhouse-server binary fails the tests that need it; it never skips them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from backends.children import terminate_child
from backends.ports import PORT_ATTEMPTS, address_was_in_use, free_port

_BINARY_CANDIDATES = ("/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server")
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0


def find_clickhouse_binary() -> str:
    """The clickhouse-server binary, or a failed test saying how to install it."""
    found = shutil.which("clickhouse-server")
    if found:
        return found
    for candidate in _BINARY_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "clickhouse-server is not installed; these tests need a real ClickHouse server:"
        " apt-get install -y clickhouse-server (Debian bookworm ships 18.16)",
        pytrace=False,
    )


class ClickHouseServer:
    """One clickhouse-server child process with its own config, data and logs under `root`."""

    host = "127.0.0.1"
    user = "mlrun"

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.binary = binary
        self.password = secrets.token_hex(8)
        self.port = 0  # HTTP interface
        self.tcp_port = 0  # native protocol: unused by mlrun, but the server always opens it
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False
        for name in ("data", "tmp", "user_files", "format_schemas", "log"):
            (root / name).mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("clickhouse-server is not running")
        return self._process.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Start (again) and wait until `/ping` answers. The first start picks free ports; a
        restart reuses them and the data directory."""
        if self.running:
            raise RuntimeError("clickhouse-server is already running")
        attempts = PORT_ATTEMPTS if self.port == 0 else 1
        for attempt in range(attempts):
            if self.port == 0 or attempt > 0:
                self.port, self.tcp_port = free_port(), free_port()
            self._write_config()
            if self._launch_and_wait(timeout_s):
                return
            if not address_was_in_use(self.log_tail()):
                break
        raise RuntimeError(f"clickhouse-server did not start:\n{self.log_tail()}")

    def stop(self, *, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """SIGTERM and wait; SIGKILL if it has not exited by the deadline."""
        process = self._process
        if process is None:
            return
        terminate_child(process, frozen=self._frozen, timeout_s=timeout_s)
        self._frozen = False
        self._process = None

    def freeze(self) -> None:
        """SIGSTOP: the port stays open and connections are accepted, but nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self._frozen = False

    def log_tail(self, max_chars: int = 4000) -> str:
        parts = []
        for name in ("stderr.log", "server.err.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-max_chars:])
        return "\n".join(parts)

    def _launch_and_wait(self, timeout_s: float) -> bool:
        log_dir = self.root / "log"
        with (log_dir / "stdout.log").open("ab") as out, (log_dir / "stderr.log").open("ab") as err:
            self._process = subprocess.Popen(
                [self.binary, f"--config-file={self.root / 'config.xml'}"],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # a Ctrl-C meant for pytest must not reach it first
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if self._ping():
                return True
            time.sleep(0.05)  # waiting for a child process to come up, bounded by the deadline
        self.stop()
        return False

    def _ping(self) -> bool:
        """Our server answers: a query as our own user, whose password only this server knows
        (a bare `/ping` would also be answered by another worker's server that took the port
        our start then failed to bind)."""
        query = urllib.parse.urlencode(
            {"user": self.user, "password": self.password, "query": "SELECT 1"})
        try:
            with urllib.request.urlopen(f"{self.url}/?{query}", timeout=1.0) as response:
                return bool(response.read().strip() == b"1")
        except (OSError, urllib.error.URLError):
            return False

    def _write_config(self) -> None:
        root = self.root
        # No interserver_http_port, https or TLS ports: only the two ports chosen above open.
        config = f"""<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{root}/log/server.log</log>
        <errorlog>{root}/log/server.err.log</errorlog>
        <size>10M</size>
        <count>1</count>
    </logger>
    <listen_host>{self.host}</listen_host>
    <http_port>{self.port}</http_port>
    <tcp_port>{self.tcp_port}</tcp_port>
    <max_connections>256</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>{root}/data/</path>
    <tmp_path>{root}/tmp/</tmp_path>
    <user_files_path>{root}/user_files/</user_files_path>
    <format_schema_path>{root}/format_schemas/</format_schema_path>
    <users_config>{root}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
"""
        users = f"""<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <allow_experimental_low_cardinality_type>1</allow_experimental_low_cardinality_type>
            <input_format_skip_unknown_fields>1</input_format_skip_unknown_fields>
            <output_format_json_quote_64bit_integers>0</output_format_json_quote_64bit_integers>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
        <{self.user}>
            <password>{escape(self.password)}</password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </{self.user}>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"""
        (root / "config.xml").write_text(config)
        (root / "users.xml").write_text(users)


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    """A ClickHouse 18.16 server on free loopback ports for the whole session."""
    server = ClickHouseServer(tmp_path_factory.mktemp("clickhouse"), find_clickhouse_binary())
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.stop()


@pytest.fixture
def clickhouse_database() -> str:
    """A database name no other test uses (created by whoever connects: ensure_database)."""
    return f"test_{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def embedded_clickhouse_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one chdb data directory of this test process (chdb refuses a second one while the
    first is open); tests isolate themselves with `clickhouse_database`."""
    return tmp_path_factory.mktemp("chdb")
