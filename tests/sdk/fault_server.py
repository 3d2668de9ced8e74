"""A tiny loopback HTTP server that speaks the SDK's routes just enough to record what arrives,
and injects faults on cue: 429 with Retry-After, 503, a dropped connection before or after the
batch was recorded, or a request that hangs. It exists ONLY to produce faults a real server
cannot be made to produce on demand; what the SDK stores end to end is tested against the real
`mlrun serve` (tests/sdk/test_sdk_e2e.py).

Its idempotency ledger mirrors the real server's contract (a batch_id seen before answers
`duplicate: true` and is not recorded again), so a test can tell a retry of the same batch from
a new batch. Runs in a thread; `stop()` shuts it down and closes its socket.

Must not import the mlrun package.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Fault:
    """What the server does instead of answering a batch normally.

    kind: "status" (answer `status` with `headers`), "drop_before" (close without reading the
    request's effect), "drop_after" (record the batch, then close without answering),
    "hang" (wait `seconds`, then answer normally)."""

    kind: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def overloaded(retry_after_s: int = 1) -> Fault:
    return Fault("status", 429, {"retry-after": str(retry_after_s)})


def unavailable() -> Fault:
    return Fault("status", 503)


def rejected(status: int, code: str) -> Fault:
    return Fault("status", status, {"x-error-code": code})


class FaultServer:
    def __init__(self, port: int = 0) -> None:
        self.lock = threading.Lock()
        self.faults: deque[Fault] = deque()
        self.accepted: list[dict[str, Any]] = []  # batches recorded, in order
        self.attempts: list[tuple[str, float]] = []  # (batch_id, monotonic arrival) per try
        self.init_status: int | None = None  # answer run creation with this error status
        self.ledger: set[tuple[str, str]] = set()
        self.runs: dict[str, dict[str, Any]] = {}
        self.finished: dict[str, str] = {}
        self.heartbeats = 0
        self.release = threading.Event()  # ends "hang" faults early
        self.connections: set[socket.socket] = set()  # closed by stop(): a real outage
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # http.server writes headers and body separately: without NODELAY, Nagle plus
                # the client's delayed ACK add ~40 ms to every answer.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with server.lock:
                    server.connections.add(self.connection)

            def finish(self) -> None:
                with server.lock:
                    server.connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._answer(200, {"status": "ok"})
                else:
                    self._answer(404, _error("not_found", "no route"))

            def do_POST(self) -> None:
                body = self._body()
                if self.path == "/api/v1/ingest/batch":
                    server._batch(self, body)
                elif self.path == "/api/v1/runs" and server.init_status is not None:
                    self._answer(server.init_status, _error("unauthenticated", "bad key"))
                elif self.path == "/api/v1/runs":
                    with server.lock:
                        server.runs.setdefault(body["run_id"], body)
                    self._answer(201, {"run_id": body["run_id"], "project": body["project"],
                                       "name": body.get("name") or "auto-name",
                                       "status": "running", "created": True})
                elif self.path.endswith("/finish"):
                    run_id = self.path.split("/")[-2]
                    with server.lock:
                        server.finished[run_id] = body.get("status", "finished")
                    self._answer(200, {"run_id": run_id, "status": body.get("status")})
                elif self.path.endswith("/heartbeat"):
                    with server.lock:
                        server.heartbeats += 1
                    self._answer(200, {"run_id": self.path.split("/")[-2], "status": "running"})
                else:
                    self._answer(404, _error("not_found", "no route"))

            def _body(self) -> Any:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    raw = gzip.decompress(raw)
                return json.loads(raw) if raw else {}

            def _answer(self, status: int, payload: Any,
                        headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _drop(self) -> None:
                self.close_connection = True  # the handler returns without answering

        self._handler = Handler
        self.http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.http.daemon_threads = True
        self.port: int = self.http.server_address[1]
        self._thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open keep-alive connection, as a dying server would."""
        self.release.set()
        self.http.shutdown()
        self.http.server_close()
        with self.lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)

    def inject(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def points(self) -> int:
        with self.lock:
            return sum(len(s["steps"]) for b in self.accepted for s in b.get("series", [])) + sum(
                len(b.get("system_metrics", [])) for b in self.accepted)

    def _batch(self, handler: Any, body: dict[str, Any]) -> None:
        with self.lock:
            self.attempts.append((body.get("batch_id", ""), time.monotonic()))
            fault = self.faults.popleft() if self.faults else None
        if fault is not None and fault.kind == "status":
            code = fault.headers.get("x-error-code", "overloaded" if fault.status == 429
                                     else "backend_unavailable")
            handler._answer(fault.status, _error(code, f"injected {fault.status}"),
                            fault.headers)
            return
        if fault is not None and fault.kind == "drop_before":
            handler._drop()
            return
        if fault is not None and fault.kind == "hang":
            self.release.wait(fault.seconds)
        key = (body["run_id"], body["batch_id"])
        with self.lock:
            duplicate = key in self.ledger
            if not duplicate:
                self.ledger.add(key)
                self.accepted.append(body)
        if fault is not None and fault.kind == "drop_after":
            handler._drop()  # stored, but the client never hears it: it must retry the same id
            return
        accepted = sum(len(s["steps"]) for s in body.get("series", []))
        handler._answer(200, {"status": "ok", "accepted": accepted, "duplicate": duplicate,
                              "warnings": []})


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": None}}


def closed_port_url() -> str:
    """A loopback URL nothing listens on (a port bound and released again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    """Bounded wait for a condition another thread brings about (test helper)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)
