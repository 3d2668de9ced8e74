"""The SDK end to end against a real `mlrun serve` on real PostgreSQL and ClickHouse.

Every exactly-once claim is checked in ClickHouse itself (tests/readback.py), never through
the server or the SDK's own statistics: raw rows (a replayed batch stored twice would show up
here), distinct (metric, step), and `FINAL`.

Covered: a million log() calls over HTTP and over gRPC; the server answering 429 (and 503
commit timeouts) while ClickHouse is frozen; the server down for 30 s mid-run (spool, probe,
replay); kill -9 of the training process after a flush, then `mlrun sync`; kill -9 of the
server mid-stream.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mlrun
from mlrun.sdk.settings import Settings
from mlrun.sdk.sync_command import sync_command

from readback import ClickHouseReader
from server_process import TEST_API_KEY, ServerProcess

pytestmark = pytest.mark.timeout(600)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    process = ServerProcess(server_env, tmp_path / "server.log")
    servers.append(process)
    process.start()
    yield process
    process.stop()


def sdk_settings(server: ServerProcess, spool_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "server_url": server.base_url, "grpc_target": server.grpc_target,
        "api_key": TEST_API_KEY, "spool_dir": spool_dir, "offline_after_s": 2.0,
        "backoff_max_s": 1.0, "finish_timeout_s": 120.0, **overrides,
    }
    return Settings.load(environ={}, **values)


def restart_on_same_ports(old: ServerProcess, env: dict[str, str], log: Path,
                          servers: list[ServerProcess]) -> ServerProcess:
    process = ServerProcess({**env, "API_HTTP_PORT": str(old.http_port),
                             "API_GRPC_PORT": str(old.grpc_port)}, log)
    servers.append(process)
    return process.start()


def stored(reader: ClickHouseReader, run_id: str) -> tuple[int, int, int]:
    """(raw rows, distinct (metric, step), rows FINAL) of a run's metrics in ClickHouse."""
    where = f"WHERE run_id = '{run_id}'"
    raw = reader.scalar(f"SELECT count() FROM metrics {where}")
    distinct = reader.scalar(
        f"SELECT count() FROM (SELECT name, step FROM metrics {where} GROUP BY name, step)")
    final = reader.scalar(f"SELECT count() FROM metrics FINAL {where}")
    return int(raw), int(distinct), int(final)


def assert_clean(run: mlrun.Run) -> None:
    stats = run.statistics()
    assert stats.pending_operations == 0, stats
    assert stats.dead_lettered == 0 and stats.dropped_batches == 0 and stats.invalid_points == 0


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_million_log_calls_arrive_exactly_once(
    transport: str, server: ServerProcess, clickhouse_reader: ClickHouseReader, tmp_path: Path
) -> None:
    run = mlrun.init("e2e", config={"lr": 0.01},
                     settings=sdk_settings(server, tmp_path, transport=transport))
    for step in range(1_000_000):
        run.log({"loss": step * 1e-6}, step=step)
    run.finish(timeout_s=300)
    assert_clean(run)
    assert run.statistics().points_delivered == 1_000_000
    assert stored(clickhouse_reader, run.run_id) == (1_000_000, 1_000_000, 1_000_000)
    last = clickhouse_reader.scalar(
        f"SELECT value FROM metrics WHERE run_id = '{run.run_id}' AND step = 999999")
    assert last == pytest.approx(0.999999)


def test_429_while_clickhouse_is_frozen_then_everything_once(
    server_env: dict[str, str], clickhouse_server: Any, clickhouse_reader: ClickHouseReader,
    tmp_path: Path, servers: list[ServerProcess],
) -> None:
    """Several runs share a small pipeline while ClickHouse is frozen (SIGSTOP): admitted
    batches cannot commit (503 commit_timeout, retried), the pipeline stays full, and the next
    requests get 429 + Retry-After. After SIGCONT every point is stored exactly once."""
    server_env["MLRUN_PIPELINE_MAX_ROWS"] = "20000"  # four 5000-point batches fill it
    server = ServerProcess(server_env, tmp_path / "server.log")
    servers.append(server)
    server.start()
    runs = [mlrun.init("e2e", settings=sdk_settings(server, tmp_path / "spool",
                                                    max_batch_points=5000))
            for _ in range(6)]
    steps = 30_000

    def train(run: mlrun.Run, first: int, last: int) -> None:
        for step in range(first, last):
            run.log({"loss": float(step)}, step=step)

    clickhouse_server.freeze()
    try:
        trainers = [threading.Thread(target=train, args=(run, 0, steps // 2)) for run in runs]
        for thread in trainers:
            thread.start()
        for thread in trainers:
            thread.join(60)
        deadline = time.monotonic() + 60
        while (sum(run.statistics().overloaded_responses for run in runs) == 0
               and time.monotonic() < deadline):
            time.sleep(0.1)  # bounded: waiting for the server to push back
    finally:
        clickhouse_server.thaw()
    for run in runs:
        train(run, steps // 2, steps)
    for run in runs:
        run.finish(timeout_s=300)
    assert sum(run.statistics().overloaded_responses for run in runs) > 0
    for run in runs:
        assert_clean(run)
        assert stored(clickhouse_reader, run.run_id) == (steps, steps, steps)
    server.stop()


def test_server_down_30s_mid_run_spools_then_replays_once(
    server: ServerProcess, server_env: dict[str, str], clickhouse_reader: ClickHouseReader,
    tmp_path: Path, servers: list[ServerProcess],
) -> None:
    run = mlrun.init("e2e", settings=sdk_settings(server, tmp_path / "spool"))
    step = 0

    def log_for(seconds: float) -> None:
        nonlocal step
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            for _ in range(500):
                run.log({"loss": step * 0.5, "acc": 0.1}, step=step)
                step += 1
            time.sleep(0.05)  # a training loop does work between logs (~10k steps/s)

    log_for(3)
    assert server.stop() == 0
    log_for(30)  # the server is down: the run goes offline and spools
    assert run.statistics().offline and run.statistics().spooled_operations > 0
    restarted = restart_on_same_ports(server, server_env, tmp_path / "server2.log", servers)
    log_for(3)
    run.finish(timeout_s=300)
    assert_clean(run)
    assert run.statistics().spilled_batches > 0
    assert stored(clickhouse_reader, run.run_id) == (2 * step, 2 * step, 2 * step)
    restarted.stop()


def test_kill_9_after_a_flush_then_mlrun_sync_replays_exactly_once(
    server: ServerProcess, server_env: dict[str, str], clickhouse_reader: ClickHouseReader,
    tmp_path: Path, servers: list[ServerProcess],
) -> None:
    spool_root = tmp_path / "spool"
    script = textwrap.dedent(f"""
        import sys, time
        import mlrun
        run = mlrun.init("e2e", run_id="killed-run", server_url={server.base_url!r},
                         api_key={TEST_API_KEY!r}, spool_dir={str(spool_root)!r},
                         offline_after_s=1.0, backoff_max_s=0.5)
        for step in range(50_000):
            run.log({{"loss": float(step)}}, step=step)
        assert run.flush(60)
        print("delivered", flush=True)
        sys.stdin.readline()  # the test stops the server now
        for step in range(50_000, 120_000):
            run.log({{"loss": float(step)}}, step=step)
        run.flush(5)  # the server is down: durable in the spool at the deadline
        print("flushed", flush=True)
        time.sleep(600)  # killed here, before finish
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLRUN_")}
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout is not None and trainer.stdin is not None
        assert trainer.stdout.readline().strip() == "delivered"
        assert server.stop() == 0
        trainer.stdin.write("go\n")
        trainer.stdin.flush()
        assert trainer.stdout.readline().strip() == "flushed"
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(30)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(30)
    backup = tmp_path / "backup"
    shutil.copytree(spool_root, backup)
    restarted = restart_on_same_ports(server, server_env, tmp_path / "server2.log", servers)
    settings = sdk_settings(restarted, spool_root)
    assert sync_command(spool_root, settings=settings) == 0
    assert not any(spool_root.iterdir())
    assert stored(clickhouse_reader, "killed-run") == (120_000, 120_000, 120_000)
    # Replaying the same spool again (a sync that died before deleting its files) stores
    # nothing twice.
    assert sync_command(backup, settings=settings) == 0
    assert stored(clickhouse_reader, "killed-run") == (120_000, 120_000, 120_000)
    restarted.stop()


def test_kill_9_of_the_server_mid_stream_loses_nothing(
    server: ServerProcess, server_env: dict[str, str], clickhouse_reader: ClickHouseReader,
    tmp_path: Path, servers: list[ServerProcess],
) -> None:
    run = mlrun.init("e2e", settings=sdk_settings(server, tmp_path / "spool",
                                                  max_batch_points=2000))
    steps = 300_000
    killed = threading.Event()

    def kill_when_streaming() -> None:
        while run.statistics().batches_delivered < 10:
            time.sleep(0.01)  # bounded by the test's timeout; the run is streaming
        os.kill(server.pid, signal.SIGKILL)
        killed.set()

    killer = threading.Thread(target=kill_when_streaming, daemon=True)
    killer.start()
    for step in range(steps):
        run.log({"loss": float(step)}, step=step)
        if step % 1000 == 0:
            time.sleep(0.002)
    assert killed.wait(60)
    assert server.process is not None
    server.process.wait(10)
    restarted = restart_on_same_ports(server, server_env, tmp_path / "server2.log", servers)
    run.finish(timeout_s=300)
    assert_clean(run)
    assert run.statistics().transient_errors > 0
    assert stored(clickhouse_reader, run.run_id) == (steps, steps, steps)
    restarted.stop()
