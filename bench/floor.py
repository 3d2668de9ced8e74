"""The `floor` workload: what one small request costs on one kept-alive connection.

For each request kind, over ONE kept-alive TCP connection, one request at a time:
latency p50/p99 (client-side wall time from the first byte sent to the last byte read) and the
server's CPU per request (utime+stime of the server process from /proc, all threads, over the
whole series, divided by the request count). Kinds:

- `health`: `GET /health`, public (the floor of any request: hypercorn + h11 + the app);
- `whoami`: `GET /api/v1/whoami`, authenticated, answered from the key view in memory (no
  backend: the floor of an authenticated request);
- `projects`: `GET /api/v1/projects`, authenticated, one PostgreSQL statement;
- `run`: `GET /api/v1/runs/{id}` of a run with metrics (PostgreSQL and ClickHouse summaries);
- `mlflow-exp`: MLflow `GET /api/2.0/mlflow/experiments/get-by-name`;
- `mlflow-run`: MLflow `GET /api/2.0/mlflow/runs/get` of a run with metrics.

The client is a raw socket (`TCP_NODELAY`) sending pre-built request bytes and reading the
answer by its `content-length`: a few µs per request, so the latency is the server's and the
loopback's. The same kinds are then measured through one `httpx.Client` (what the README's
earlier figures used) for continuity. The kinds are measured in rounds (every kind once per
round, round after round), so the noise of the shared box falls on all of them alike; each
kind reports its p50 per round and the spread over the rounds.

    python -m bench --workloads floor [--duration S] [--url URL --api-key KEY --server-pid PID]

Bounded: at most `_MAX_REQUESTS` requests per kind and round, and at most `duration / rounds /
kinds` seconds each. Must not import the server or anyio.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import statistics
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from bench.batches import BatchShape, http_body, make_batch
from bench.errors import BenchError
from bench.processes import cpu_seconds
from bench.targets import Target

_MAX_REQUESTS = 4000
_WARMUP_REQUESTS = 50
_ROUNDS = 5
_RECV_BYTES = 65536
_SOCKET_TIMEOUT_S = 10.0
_PROJECT = "bench-floor"


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    method: str
    path: str
    authenticated: bool = True


@dataclass(slots=True)
class KindResult:
    name: str
    client: str
    requests: int = 0
    p50_ms_by_round: list[float] = field(default_factory=list)
    p99_ms_by_round: list[float] = field(default_factory=list)
    server_cpu_us_by_round: list[float] = field(default_factory=list)
    client_cpu_us_by_round: list[float] = field(default_factory=list)


class RawConnection:
    """One kept-alive HTTP/1.1 connection over a plain socket: `send(raw)` returns the status
    and the body. Only what the server's answers need: `content-length` bodies."""

    def __init__(self, host: str, port: int) -> None:
        self._address = (host, port)
        self._sock = self._connect()
        self._buffer = b""
        # hypercorn closes a connection after `keep_alive_max_requests` answers (1000 by
        # default, like nginx); the connection is then reopened at once and counted here.
        self.reopened = 0

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self._address, timeout=_SOCKET_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def send(self, raw: bytes) -> tuple[int, bytes]:
        self._sock.sendall(raw)
        buffer = self._buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            buffer += self._recv()
        head = buffer[:end].decode("latin-1")
        status = int(head[9:12])
        length = 0
        closing = False
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection":
                closing = value.strip().lower() == "close"
        start = end + 4
        while len(buffer) < start + length:
            buffer += self._recv()
        self._buffer = buffer[start + length:]
        if closing:
            self._sock.close()
            self._sock = self._connect()
            self._buffer = b""
            self.reopened += 1
        return status, buffer[start:start + length]

    def _recv(self) -> bytes:
        chunk = self._sock.recv(_RECV_BYTES)
        if not chunk:
            raise BenchError("the server closed the kept-alive connection")
        return chunk

    def close(self) -> None:
        self._sock.close()


def raw_request(kind: Kind, host: str, api_key: str) -> bytes:
    lines = [f"{kind.method} {kind.path} HTTP/1.1", f"Host: {host}"]
    if kind.authenticated:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _percentile_ms(ordered: Sequence[float], q: float) -> float:
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


def _measure(send: Callable[[], int], *, requests: int, deadline_s: float, server_pid: int | None,
             result: KindResult) -> None:
    for _ in range(_WARMUP_REQUESTS):
        send()
    latencies: list[float] = []
    cpu_before = cpu_seconds(server_pid) if server_pid else None
    own_before = time.process_time()
    started = time.perf_counter()
    stop_at = started + deadline_s
    clock = time.perf_counter
    for _ in range(requests):
        t0 = clock()
        status = send()
        t1 = clock()
        if status != 200:
            raise BenchError(f"floor {result.name}: answered {status}")
        latencies.append(t1 - t0)
        if t1 > stop_at:
            break
    own = time.process_time() - own_before
    cpu_after = cpu_seconds(server_pid) if server_pid else None
    latencies.sort()
    n = len(latencies)
    result.requests += n
    result.p50_ms_by_round.append(_percentile_ms(latencies, 0.50))
    result.p99_ms_by_round.append(_percentile_ms(latencies, 0.99))
    result.client_cpu_us_by_round.append(round(own * 1e6 / n, 1))
    if cpu_before is not None and cpu_after is not None:
        result.server_cpu_us_by_round.append(round((cpu_after - cpu_before) * 1e6 / n, 1))


def _json(connection: http.client.HTTPConnection, method: str, path: str, api_key: str,
          payload: object | None = None, *, body: bytes | None = None) -> object:
    data = body if body is not None else (
        None if payload is None else msgspec.json.encode(payload))
    connection.request(method, path, body=data, headers={
        "Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    response = connection.getresponse()
    answer = response.read()
    if response.status not in (200, 201):
        raise BenchError(f"floor set-up: {method} {path} answered {response.status}: "
                         f"{answer[:200]!r}")
    return msgspec.json.decode(answer)


def _set_up(base_url: str, api_key: str, session: str) -> list[Kind]:
    """A run with metrics, an MLflow experiment and a run with metrics in it."""
    parts = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                            timeout=_SOCKET_TIMEOUT_S)
    try:
        run_id = f"floor-{session}"
        _json(connection, "POST", "/api/v1/runs", api_key,
              {"project": _PROJECT, "run_id": run_id, "name": run_id})
        shape = BatchShape.for_points(1000)
        _json(connection, "POST", "/api/v1/ingest/batch", api_key,
              body=http_body(make_batch(shape, run_id, 0)))
        experiment_name = f"floor-{session}"
        created = _json(connection, "POST", "/api/2.0/mlflow/experiments/create", api_key,
                        {"name": experiment_name})
        assert isinstance(created, dict)
        experiment_id = str(created["experiment_id"])
        run = _json(connection, "POST", "/api/2.0/mlflow/runs/create", api_key,
                    {"experiment_id": experiment_id, "run_name": "floor",
                     "start_time": int(time.time() * 1000)})
        assert isinstance(run, dict)
        mlflow_run_id = str(run["run"]["info"]["run_id"])
        now_ms = int(time.time() * 1000)
        _json(connection, "POST", "/api/2.0/mlflow/runs/log-batch", api_key, {
            "run_id": mlflow_run_id,
            "metrics": [{"key": f"m{i % 5}", "value": float(i), "timestamp": now_ms,
                         "step": i // 5} for i in range(500)],
            "params": [{"key": "lr", "value": "0.1"}],
            "tags": [{"key": "team", "value": "floor"}]})
    finally:
        connection.close()
    quoted = urllib.parse.quote(experiment_name)
    return [
        Kind("health", "GET", "/health", authenticated=False),
        Kind("whoami", "GET", "/api/v1/whoami"),
        Kind("projects", "GET", "/api/v1/projects"),
        Kind("run", "GET", f"/api/v1/runs/{run_id}"),
        Kind("mlflow-exp", "GET",
             f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={quoted}"),
        Kind("mlflow-run", "GET", f"/api/2.0/mlflow/runs/get?run_id={mlflow_run_id}"),
    ]


@dataclass(frozen=True, slots=True)
class FloorSettings:
    duration_s: float
    rounds: int = _ROUNDS
    requests: int = _MAX_REQUESTS
    httpx_rounds: int = 2


def run_floor(target: Target, settings: FloorSettings, session: str,
              progress: Callable[[str], None]) -> list[KindResult]:
    parts = urllib.parse.urlsplit(target.http_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    watched = target.watched.get("server")
    server_pid = watched.pid if watched is not None else None
    kinds = _set_up(target.http_url, target.api_key, session)
    per_kind_s = settings.duration_s / settings.rounds / len(kinds)
    raw_results = {kind.name: KindResult(kind.name, "raw socket") for kind in kinds}
    raws = {kind.name: raw_request(kind, f"{host}:{port}", target.api_key) for kind in kinds}
    connection = RawConnection(host, port)
    try:
        for round_index in range(settings.rounds):
            progress(f"floor: raw-socket round {round_index + 1}/{settings.rounds}")
            for kind in kinds:
                raw = raws[kind.name]

                def send(raw: bytes = raw) -> int:
                    return connection.send(raw)[0]

                _measure(send, requests=settings.requests, deadline_s=per_kind_s,
                         server_pid=server_pid, result=raw_results[kind.name])
    finally:
        connection.close()
    results = list(raw_results.values())
    with contextlib.suppress(ImportError):
        import httpx

        httpx_results = {kind.name: KindResult(kind.name, "httpx") for kind in kinds}
        with httpx.Client(base_url=target.http_url, timeout=_SOCKET_TIMEOUT_S) as client:
            for round_index in range(settings.httpx_rounds):
                progress(f"floor: httpx round {round_index + 1}/{settings.httpx_rounds}")
                for kind in kinds:
                    headers = ({"Authorization": f"Bearer {target.api_key}"}
                               if kind.authenticated else {})

                    def send_httpx(kind: Kind = kind, headers: dict[str, str] = headers) -> int:
                        return client.request(kind.method, kind.path, headers=headers).status_code

                    _measure(send_httpx, requests=settings.requests, deadline_s=per_kind_s,
                             server_pid=server_pid, result=httpx_results[kind.name])
        results.extend(httpx_results.values())
    return results


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def _spread_us(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def render(results: Sequence[KindResult]) -> str:
    lines = [
        "one kept-alive connection, one request at a time; median over rounds [min-max]",
        f"{'client':<11} {'kind':<11} {'n':>6}  {'p50 ms':<22} {'p99 ms':<22}"
        f" {'server cpu us/req':<18} {'client cpu us/req':<18}",
    ]
    for r in results:
        lines.append(
            f"{r.client:<11} {r.name:<11} {r.requests:>6}  {_spread(r.p50_ms_by_round):<22}"
            f" {_spread(r.p99_ms_by_round):<22} {_spread_us(r.server_cpu_us_by_round):<18}"
            f" {_spread_us(r.client_cpu_us_by_round):<18}")
    return "\n".join(lines)


def main_floor(target_factory: Callable[[], contextlib.AbstractContextManager[Target]],
               settings: FloorSettings, out_dir: Path, stem: str,
               progress: Callable[[str], None]) -> int:
    """Run the floor workload alone on its target; print the table, write the JSON."""
    try:
        with target_factory() as target:
            results = run_floor(target, settings, stem.removeprefix("bench-").lower(), progress)
            description = target.description
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}-floor.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(
        {"target": description, "results": results}), indent=2) + b"\n")
    print(f"target: {description}")
    print(render(results))
    print(f"\nreport: {path}")
    return 0
