"""Faults on the write path: the server killed mid-stream, ClickHouse frozen or down under load.

The promise under test: every acknowledged point is stored exactly once; every request gets an
answer within a bounded time (429 with Retry-After when the pipeline is full, a retryable 503
when admitted work could not commit in time); memory stays bounded; a client that retries the
same batch_id never causes a double count.

Clients here are plain retrying loops in threads (honouring Retry-After, capped at 2 s to keep
the suite short); stored points are counted back from ClickHouse directly.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.ports import free_port
from ingest_load import (
    ANSWER_BOUND_S,
    AUTH,
    LoadStats,
    assert_exactly_once,
    server_rss_kib,
    start_writers,
)
from readback import ClickHouseReader
from server_process import ServerProcess

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def fixed_port_env(server_env: dict[str, str]) -> dict[str, str]:
    """A restart must come back on the same address, as a real deployment would."""
    server_env["API_HTTP_PORT"] = str(free_port())
    server_env["API_GRPC_PORT"] = str(free_port())
    return server_env


def create_run(base_url: str, run_id: str) -> None:
    response = httpx.post(f"{base_url}/api/v1/runs", headers=AUTH, timeout=10,
                          json={"project": "faults", "run_id": run_id})
    assert response.status_code in (200, 201), response.text


def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(
    fixed_port_env: dict[str, str], tmp_path: Path, servers: list[ServerProcess],
    clickhouse_reader: ClickHouseReader,
) -> None:
    first = ServerProcess(fixed_port_env, tmp_path / "first.log")
    servers.append(first)
    first.start()
    create_run(first.base_url, "crash-run")
    stats = LoadStats()
    writers, batches, points = 4, 40, 500
    threads = start_writers(lambda: first.base_url, "crash-run", writers, batches, points, stats,
                            budget_s=120)
    deadline = time.monotonic() + 30
    while stats.acked_points < writers * batches * points // 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # wait for the stream to be well under way
    assert stats.acked_points > 0
    first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    first.process.wait(timeout=10)  # type: ignore[union-attr]
    acked_at_kill = stats.acked_points

    second = ServerProcess(fixed_port_env, tmp_path / "second.log")
    servers.append(second)
    second.start()
    for thread in threads:
        thread.join(timeout=150)
    assert not stats.failures, stats.failures[:5]
    assert stats.connection_errors > 0, "the kill should have interrupted some requests"
    assert acked_at_kill < writers * batches * points
    assert stats.acked_points == writers * batches * points
    assert_exactly_once(clickhouse_reader, "crash-run", stats.acked_steps)
    assert second.stop() == 0


def test_duplicate_is_still_recognised_after_a_restart(
    fixed_port_env: dict[str, str], tmp_path: Path, servers: list[ServerProcess],
    clickhouse_reader: ClickHouseReader,
) -> None:
    body = {"run_id": "restart-run", "batch_id": "b-1",
            "metrics": [{"name": "loss", "value": 1.0, "step": s} for s in range(20)]}
    first = ServerProcess(fixed_port_env, tmp_path / "first.log")
    servers.append(first)
    first.start()
    create_run(first.base_url, "restart-run")
    assert httpx.post(f"{first.base_url}/api/v1/ingest/batch", headers=AUTH, json=body,
                      timeout=10).json()["duplicate"] is False
    assert first.stop() == 0
    second = ServerProcess(fixed_port_env, tmp_path / "second.log")
    servers.append(second)
    second.start()
    again = httpx.post(f"{second.base_url}/api/v1/ingest/batch", headers=AUTH, json=body,
                       timeout=10)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert clickhouse_reader.scalar(
        "SELECT count() FROM metrics WHERE run_id = 'restart-run'") == 20
    assert second.stop() == 0


@pytest.fixture
def small_pipeline_server(server_env: dict[str, str], tmp_path: Path,
                          servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    # A pipeline of 20 batches' worth of rows, so dozens of writers fill it within seconds.
    server_env["MLRUN_PIPELINE_MAX_ROWS"] = "4000"
    server = ServerProcess(server_env, tmp_path / "server.log")
    servers.append(server)
    server.start()
    yield server
    assert server.stop() == 0, server.log_text()[-3000:]


@pytest.mark.parametrize("fault", ["frozen", "down"])
def test_clickhouse_fault_under_load_gives_bounded_answers_and_loses_nothing(
    fault: str, small_pipeline_server: ServerProcess, clickhouse_server: Any,
    clickhouse_reader: ClickHouseReader,
) -> None:
    server = small_pipeline_server
    run_id = f"pressure-{fault}"
    create_run(server.base_url, run_id)
    stats = LoadStats()
    # Writers run until told to stop (at most `batches` each): load before, during and after.
    writers, batches, points = 32, 2000, 200
    threads = start_writers(lambda: server.base_url, run_id, writers, batches, points, stats,
                            budget_s=150)
    time.sleep(1.0)  # let the load reach a steady state first
    rss_before, _ = server_rss_kib(server.pid)
    if fault == "frozen":
        clickhouse_server.freeze()
    else:
        clickhouse_server.stop(timeout_s=1.0)  # under load SIGTERM lingers; then SIGKILL
    try:
        time.sleep(12)  # > the commit deadline: admitted requests must time out as 503s
        rss_during, _ = server_rss_kib(server.pid)
        ready = httpx.get(f"{server.base_url}/ready", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["backends"]["clickhouse"]["ok"] is False
    finally:
        if fault == "frozen":
            clickhouse_server.thaw()
        else:
            clickhouse_server.start()
    time.sleep(3)  # load goes on after recovery; then writers finish their current batch
    stats.stop.set()
    for thread in threads:
        thread.join(timeout=160)

    _, rss_peak = server_rss_kib(server.pid)
    print(f"\n{fault}: statuses={stats.statuses} codes={stats.codes} "
          f"max_latency={stats.max_latency_s:.2f}s retry_after={sorted(stats.retry_after_values)} "
          f"rss_before={rss_before // 1024}MiB during={rss_during // 1024}MiB "
          f"peak={rss_peak // 1024}MiB")
    assert not stats.failures, stats.failures[:5]
    assert stats.max_latency_s < ANSWER_BOUND_S
    assert stats.statuses.get(429, 0) > 0, "the pipeline should have filled up"
    assert all(value.isdigit() and int(value) >= 1 for value in stats.retry_after_values)
    assert stats.codes.get("commit_timeout", 0) > 0, "admitted work should have timed out"
    assert set(stats.codes) <= {"overloaded", "commit_timeout"}
    # Bounded memory: the stall may not grow the server by more than the pipeline's worth.
    assert rss_peak < 400 * 1024, f"peak RSS {rss_peak // 1024} MiB"
    assert stats.acked_points == len(stats.acked_steps) > 0
    assert_exactly_once(clickhouse_reader, run_id, stats.acked_steps)
