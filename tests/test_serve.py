"""`mlrun serve` end to end, as a user runs it: a child process on real backends.

Covers the foundation's must-shows: health and readiness over HTTP and gRPC, readiness that
follows a ClickHouse process going away and coming back without a restart, graceful shutdown
on trio and asyncio, two servers migrating the same databases at once, the embedded default
reusing its data dir, and start-up errors that name their cause in one line.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
import pytest

from mlrun.wire.proto.grpc.health.v1 import health_pb2

from server_process import ServerProcess

pytestmark = pytest.mark.timeout(180)


def grpc_health(target: str, service: str = "") -> int:
    """grpc.health.v1.Health/Check with the official grpcio client. The messages are our own
    generated ones: grpcio-health-checking's module registers the same protobuf names, and one
    process cannot load both."""
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        reply = check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


def wait_for_ready_status(
    base_url: str, expected: int, *, timeout_s: float = 15.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        last = httpx.get(f"{base_url}/ready", timeout=5)
        if last.status_code == expected:
            body: dict[str, Any] = last.json()
            return body
        time.sleep(0.2)  # bounded by the deadline; readiness is probed by the server per call
    raise AssertionError(f"/ready never answered {expected}; last: {last and last.text}")


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_server_mode_health_ready_grpc_and_graceful_stop(
    backend: str, server_env: dict[str, str], tmp_path: Path, servers: list[ServerProcess]
) -> None:
    server = ServerProcess(server_env, tmp_path / "server.log", backend=backend)
    servers.append(server)
    t0 = time.monotonic()
    server.start()

    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
    body = wait_for_ready_status(server.base_url, 200)
    print(f"server-mode start to ready ({backend}): {time.monotonic() - t0:.2f}s")
    assert body["status"] == "ready"
    assert {name for name, state in body["backends"].items() if state["ok"]} == {
        "postgres", "clickhouse", "artifacts"}
    assert grpc_health(server.grpc_target) == health_pb2.HealthCheckResponse.SERVING
    assert grpc_health(server.grpc_target, "mlrun.v1.IngestService") == (
        health_pb2.HealthCheckResponse.SERVING)

    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout_s=10) == 0
    print(f"SIGTERM to exit ({backend}): {time.monotonic() - started:.2f}s")
    assert time.monotonic() - started < 10
    log = server.log_text()
    assert "listeners stopped" in log and "Traceback" not in log


def test_ready_follows_clickhouse_going_away_and_coming_back(
    server_env: dict[str, str], clickhouse_server: Any, tmp_path: Path,
    servers: list[ServerProcess]
) -> None:
    server = ServerProcess(server_env, tmp_path / "server.log")
    servers.append(server)
    server.start()
    wait_for_ready_status(server.base_url, 200)

    clickhouse_server.stop()
    try:
        body = wait_for_ready_status(server.base_url, 503)
        assert body["status"] == "unavailable"
        assert body["backends"]["clickhouse"]["ok"] is False
        assert body["backends"]["clickhouse"]["code"] in ("backend_unavailable", "backend_timeout")
        assert body["backends"]["postgres"]["ok"] is True
        assert body["backends"]["artifacts"]["ok"] is True
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
        assert grpc_health(server.grpc_target) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        clickhouse_server.start()

    wait_for_ready_status(server.base_url, 200)
    assert grpc_health(server.grpc_target) == health_pb2.HealthCheckResponse.SERVING
    assert server.stop() == 0


def test_two_servers_starting_at_once_migrate_once(
    server_env: dict[str, str], postgres_dsn: str, clickhouse_server: Any,
    clickhouse_database: str, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    first = ServerProcess(server_env, tmp_path / "first.log")
    second = ServerProcess(server_env, tmp_path / "second.log")
    servers.extend([first, second])
    # Start both before waiting for either, so their migrations really overlap.
    errors: list[BaseException] = []

    def start(server: ServerProcess) -> None:
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not errors, errors
    for server in (first, second):
        wait_for_ready_status(server.base_url, 200)

    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute(
            "SELECT version, count(*) FROM schema_migrations GROUP BY version"
        ).fetchall()
    assert rows and all(count == 1 for _, count in rows)

    response = httpx.post(
        f"http://{clickhouse_server.host}:{clickhouse_server.port}/",
        params={"database": clickhouse_database},
        content="SELECT version, count() AS n FROM schema_migrations GROUP BY version "
        "FORMAT JSONEachRow",
        headers={"X-ClickHouse-User": clickhouse_server.user,
                 "X-ClickHouse-Key": clickhouse_server.password},
        timeout=10,
    )
    response.raise_for_status()
    counts = [line for line in response.text.splitlines() if line]
    assert counts and all('"n":1' in line for line in counts), counts
    for server in (first, second):
        assert server.stop() == 0


def test_embedded_default_starts_and_reuses_its_data_dir(
    reachable_tmp_dir: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    env = {
        "API_HOST": "127.0.0.1", "API_HTTP_PORT": "0", "API_GRPC_PORT": "0",
        "MLRUN_DATA_DIR": str(reachable_tmp_dir / "data"),
    }
    for name in ("DATABASE_URL", "CLICKHOUSE_HOST", "MINIO_ENDPOINT"):
        env[name] = ""
    first = ServerProcess(env, tmp_path / "first.log")
    servers.append(first)
    t0 = time.monotonic()
    first.start()
    body = wait_for_ready_status(first.base_url, 200)
    print(f"embedded cold start to ready: {time.monotonic() - t0:.2f}s")
    assert body["status"] == "ready"
    assert grpc_health(first.grpc_target) == health_pb2.HealthCheckResponse.SERVING
    assert "postgres=embedded" in first.log_text()
    # A fresh data dir: every schema version is applied, starting from 1.
    assert re.search(r"applied: postgres \[1(, \d+)*\], clickhouse \[1(, \d+)*\]",
                     first.log_text())
    assert first.stop() == 0

    second = ServerProcess(env, tmp_path / "second.log")
    servers.append(second)
    t0 = time.monotonic()
    second.start()
    wait_for_ready_status(second.base_url, 200)
    print(f"embedded warm start to ready: {time.monotonic() - t0:.2f}s")
    # The same data dir: the migration ledgers survived, so nothing is applied again.
    assert "applied: postgres none, clickhouse none" in second.log_text()
    assert second.stop() == 0
    assert (reachable_tmp_dir / "data" / "postgres").is_dir()


def test_malformed_setting_exits_nonzero_with_one_line_naming_it(tmp_path: Path) -> None:
    server = ServerProcess({"API_HTTP_PORT": "abc"}, tmp_path / "server.log")
    assert server.run_to_exit(timeout_s=30) == 2
    lines = [line for line in server.log_text().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "API_HTTP_PORT" in lines[0] and "'abc'" in lines[0]


def test_unreachable_backend_fails_start_up_with_a_clear_line(tmp_path: Path,
                                                              reachable_tmp_dir: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    server = ServerProcess(
        {
            "API_HTTP_PORT": "0", "API_GRPC_PORT": "0",
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed_port}/nope",
            "MLRUN_STARTUP_TIMEOUT_S": "2",
            "MLRUN_DATA_DIR": str(reachable_tmp_dir / "data"),
        },
        tmp_path / "server.log",
    )
    assert server.run_to_exit(timeout_s=60) == 1
    log = server.log_text()
    assert "start-up failed" in log and "postgres" in log
    assert "Traceback" not in log
    assert os.path.exists(tmp_path / "server.log")
