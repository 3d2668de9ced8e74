"""Redis for the tests: the Debian `redis-server` (7.0) as a child process with AOF on.

Owns: starting `redis-server` on a free loopback port with its data (the append-only file)
under a temp dir, waiting with a deadline until it answers PING, and stopping it by PID. Tests
may `kill()` it (SIGKILL, as a crash would) and `start()` it again on the same port with the
same data: the AOF is replayed. The default `appendfsync everysec` is the production default:
Redis has written every acknowledged command to the file (the OS page cache) before it
answers, so a killed process loses nothing; only a power loss could cost the last second.
`freeze()`/`thaw()` send SIGSTOP/SIGCONT; whoever freezes or stops it must restore it before
the test ends.

Fixture: `redis_server`, one fresh server per test (it starts in ~0.05 s; a test that kills
it must not disturb another's streams).

Must not import the mlrun package: the fixtures stand apart from the code they test. A missing
redis-server binary fails the tests that need it; it never skips them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.children import terminate_child
from backends.ports import PORT_ATTEMPTS, address_was_in_use, free_port

_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0


def find_redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None)
    if found is None:
        pytest.fail("redis-server is not installed; the queued-ingest tests need a real Redis: "
                    "apt-get install -y redis-server", pytrace=False)
    return found


class RedisServer:
    host = "127.0.0.1"

    def __init__(self, root: Path, binary: str, *, appendfsync: str = "everysec",
                 password: str | None = None) -> None:
        self.root = root
        self.binary = binary
        self.appendfsync = appendfsync
        self.password = password
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("redis-server is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Start (again: same port, same AOF) and wait until PING answers."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        attempts = PORT_ATTEMPTS if self.port == 0 else 1
        for attempt in range(attempts):
            if self.port == 0 or attempt > 0:
                self.port = free_port()
            if self._launch_and_wait(timeout_s):
                return
            if not address_was_in_use(self.log_tail()):
                break
        raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash. Acknowledged writes survive as far as `appendfsync` promises."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait(timeout=_STOP_TIMEOUT_S)
        self._process = None
        self._frozen = False

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        terminate_child(process, frozen=self._frozen, timeout_s=_STOP_TIMEOUT_S)
        self._process = None
        self._frozen = False

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self._frozen = False

    def log_tail(self, max_chars: int = 3000) -> str:
        path = self.root / "redis.log"
        return path.read_text(errors="replace")[-max_chars:] if path.exists() else ""

    def command(self, *args: str) -> str:
        """One command through `redis-cli` (Debian's redis-tools, not the code under test);
        its reply as redis-cli prints it, stripped."""
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        auth = ["--no-auth-warning", "-a", self.password] if self.password else []
        result = subprocess.run([cli, "-h", self.host, "-p", str(self.port), *auth, *args],
                                capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            raise OSError(result.stderr.strip() or f"redis-cli exited {result.returncode}")
        return result.stdout.strip()

    def _launch_and_wait(self, timeout_s: float) -> bool:
        args = [self.binary, "--bind", self.host, "--port", str(self.port),
                "--dir", str(self.root), "--save", "", "--appendonly", "yes",
                "--appendfsync", self.appendfsync, "--logfile", str(self.root / "redis.log"),
                "--daemonize", "no", "--protected-mode", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self._process = subprocess.Popen(args, cwd=self.root, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if self._ping():
                return True
            time.sleep(0.02)  # waiting for a child process to come up, bounded by the deadline
        self.kill()
        return False

    def _ping(self) -> bool:
        try:
            return self.command("PING") == "PONG"
        except (OSError, subprocess.TimeoutExpired):
            return False


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), find_redis_binary())
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.stop()
