"""`mlrun serve` as a child process, the way a user runs it, for end-to-end tests.

Owns: starting the server with a given environment on port 0, learning its real ports from
its start-up log lines, and stopping it by PID with a deadline. Output goes to a log file so a
failing test can show it. Used by tests only; must not import the server package.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# The bootstrap admin key every test server is started with.
TEST_API_KEY = "mlrun_test-bootstrap-key-0123456789abcdef0123456789"

def real_backend_env(*, database_url: str, clickhouse: Any, clickhouse_database: str,
                     s3: Any, bucket: str) -> dict[str, str]:
    """The backend variables of a server on the test session's real PostgreSQL, ClickHouse
    (`clickhouse`: host, port, user, password) and S3 (`s3`: endpoint, access/secret key)."""
    return {
        "DATABASE_URL": database_url,
        "CLICKHOUSE_HOST": clickhouse.host,
        "CLICKHOUSE_PORT": str(clickhouse.port),
        "CLICKHOUSE_USER": clickhouse.user,
        "CLICKHOUSE_PASSWORD": clickhouse.password,
        "CLICKHOUSE_DATABASE": clickhouse_database,
        "MINIO_ENDPOINT": s3.endpoint,
        "MINIO_ACCESS_KEY": s3.access_key,
        "MINIO_SECRET_KEY": s3.secret_key,
        "MINIO_BUCKET": bucket,
    }


_HTTP_LINE = re.compile(r"HTTP listening on http://(?P<host>[^\s]+):(?P<port>\d+)")
_GRPC_LINE = re.compile(r"gRPC listening on (?P<host>[^\s]+):(?P<port>\d+)")


class ServerProcess:
    def __init__(self, env: Mapping[str, str], log_path: Path, *, backend: str = "trio",
                 command: str = "serve") -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.backend = backend
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None
        self.http_port = 0
        self.grpc_port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, *, timeout_s: float = 60.0) -> ServerProcess:
        """Start and wait until both listeners have logged their bound ports."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlrun", self.command, "--backend", self.backend],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_text()[offset:]
            http = list(_HTTP_LINE.finditer(text))
            grpc = list(_GRPC_LINE.finditer(text))
            if http and grpc:
                self.http_port = int(http[-1]["port"])
                self.grpc_port = int(grpc[-1]["port"])
                return self
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlrun serve exited with {self.process.returncode} during start-up:\n"
                    + self.log_text()[-4000:]
                )
            time.sleep(0.05)  # waiting for a child process to come up: bounded by the deadline
        self.kill()
        raise TimeoutError(f"mlrun serve did not start in {timeout_s}s:\n{self.log_text()[-4000:]}")

    def run_to_exit(self, *, timeout_s: float = 60.0) -> int:
        """Start and wait for the process to exit by itself (for start-up failures)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlrun", self.command, "--backend", self.backend],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self.process.wait(timeout=timeout_s)

    def stop(self, sig: int = signal.SIGTERM, *, timeout_s: float = 15.0) -> int:
        """Send `sig` and wait for exit; SIGKILL after the deadline (and then fail loudly)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


_PROCESSOR_LINE = re.compile(r"processor HTTP listening on http://(?P<host>[^\s]+):(?P<port>\d+)")


class ProcessorProcess(ServerProcess):
    """`mlrun process` (queued ingest): started like a server, ready once its HTTP port (for
    /health, /ready, /metrics) is in the log; `http_port` is that port."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, backend: str = "trio") -> None:
        super().__init__(env, log_path, backend=backend, command="process")

    def start(self, *, timeout_s: float = 60.0) -> ProcessorProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlrun", "process", "--backend", self.backend],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = list(_PROCESSOR_LINE.finditer(self.log_text()[offset:]))
            if found:
                self.http_port = int(found[-1]["port"])
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"mlrun process exited with {self.process.returncode} "
                                   "during start-up:\n" + self.log_text()[-4000:])
            time.sleep(0.05)  # waiting for a child process to come up: bounded by the deadline
        self.kill()
        raise TimeoutError(f"mlrun process did not start in {timeout_s}s:\n"
                           + self.log_text()[-4000:])


def wait_for_exit(process: subprocess.Popen[bytes], *, timeout_s: float) -> int:
    """Wait for a child to exit; kill it (and fail) if it does not within the deadline."""
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        raise


@contextlib.contextmanager
def clean_server(env: Mapping[str, str], log_path: Path,
                 servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    """A started server (registered in `servers`, the conftest fixture that stops leftovers)
    that must stop cleanly after the `with`: exit status 0 and no traceback in its log."""
    process = ServerProcess(env, log_path)
    servers.append(process)
    process.start()
    yield process
    assert process.stop() == 0, process.log_text()[-3000:]
    assert "Traceback" not in process.log_text()
