""""Acknowledged ⇒ a resend is a duplicate", when the ledger update did not land.

Two ways the ledger row of a committed batch can stay 'pending', both on real backends:
- the server is killed (SIGKILL, injected on cue by MLRUN_FAULT_INJECTION) between the
  ClickHouse commit and the ledger update: the resend, over HTTP and over gRPC, must answer
  `duplicate: true` and store nothing again;
- PostgreSQL freezes (SIGSTOP of its every process) under many writers, so ledger updates time
  out while ClickHouse commits go on: after it thaws, every acknowledged batch resent must
  answer `duplicate: true`, and the server must have answered every request within its bound.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psycopg
import pytest

from mlrun.wire.proto.mlrun.v1 import ingest_pb2

from backends.ports import free_port
from backends.postgres import PostgresCluster
from ingest_load import (
    ANSWER_BOUND_S,
    AUTH,
    LoadStats,
    assert_exactly_once,
    batch_body,
    start_writers,
)
from readback import ClickHouseReader
from server_process import TEST_API_KEY, ServerProcess

pytestmark = pytest.mark.timeout(300)


def ledger_state(database_url: str, run_id: str, batch_id: str) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT state FROM ingest_batches WHERE run_id = %s AND batch_id = %s",
                           (run_id, batch_id)).fetchone()
    assert row is not None
    state: str = row[0]
    return state


def create_run(base_url: str, run_id: str) -> None:
    response = httpx.post(f"{base_url}/api/v1/runs", headers=AUTH, timeout=10,
                          json={"project": "idempotency", "run_id": run_id})
    assert response.status_code in (200, 201), response.text


def grpc_log_batch(target: str, request: ingest_pb2.LogBatchRequest) -> ingest_pb2.LogBatchResponse:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/mlrun.v1.IngestService/LogBatch",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=ingest_pb2.LogBatchResponse.FromString)
        reply: ingest_pb2.LogBatchResponse = call(
            request, metadata=(("authorization", f"Bearer {TEST_API_KEY}"),), timeout=10)
        return reply


@pytest.fixture
def fixed_port_env(server_env: dict[str, str]) -> dict[str, str]:
    """A restart must come back on the same address, as a real deployment would."""
    server_env["API_HTTP_PORT"] = str(free_port())
    server_env["API_GRPC_PORT"] = str(free_port())
    return server_env


def test_kill_between_clickhouse_commit_and_ledger_update_resend_is_a_duplicate(
    fixed_port_env: dict[str, str], tmp_path: Path, servers: list[ServerProcess],
    clickhouse_reader: ClickHouseReader,
) -> None:
    run_id, points = "killed-before-mark", 500
    faulty = ServerProcess({**fixed_port_env, "MLRUN_FAULT_INJECTION": "kill_before_ledger_mark"},
                           tmp_path / "faulty.log")
    servers.append(faulty)
    faulty.start()
    create_run(faulty.base_url, run_id)
    body = batch_body(run_id, 0, 0, 1, points)
    # The answer races the kill: either outcome is fine, the resend is what is tested.
    with contextlib.suppress(httpx.TransportError):
        httpx.post(f"{faulty.base_url}/api/v1/ingest/batch", headers=AUTH, content=body,
                   timeout=10)
    assert faulty.process is not None
    assert faulty.process.wait(timeout=30) == -signal.SIGKILL
    count = f"SELECT count() FROM metrics WHERE run_id = '{run_id}'"
    # The fault struck where intended: the rows are committed, the ledger still says pending.
    assert clickhouse_reader.scalar(count) == points
    assert ledger_state(fixed_port_env["DATABASE_URL"], run_id, "w0-b0") == "pending"

    healthy = ServerProcess(fixed_port_env, tmp_path / "healthy.log")
    servers.append(healthy)
    healthy.start()
    answers = []
    for _ in range(2):
        resent = httpx.post(f"{healthy.base_url}/api/v1/ingest/batch", headers=AUTH,
                            content=body, timeout=10)
        assert resent.status_code == 200, resent.text
        answers.append(resent.json())
    assert [(a["duplicate"], a["accepted"]) for a in answers] == [(True, 0), (True, 0)]
    # The same batch over gRPC hashes the same, so it is the same duplicate.
    reply = grpc_log_batch(healthy.grpc_target, ingest_pb2.LogBatchRequest(
        run_id=run_id, batch_id="w0-b0",
        metric_columns=[ingest_pb2.MetricColumn(
            name="loss", steps=list(range(points)), values=[s / 7 for s in range(points)])]))
    assert (reply.duplicate, reply.accepted) == (True, 0)
    # The resends wrote the same rows again (a repair of views a crash may have cut short):
    # no read counts a point twice.
    final = f"SELECT count() FROM metrics FINAL WHERE run_id = '{run_id}'"
    assert clickhouse_reader.scalar(final) == points
    assert clickhouse_reader.block_step_counts(f"run_id = '{run_id}'") == {"loss": points}
    assert ledger_state(fixed_port_env["DATABASE_URL"], run_id, "w0-b0") == "committed"
    assert healthy.stop() == 0


@pytest.fixture
def frozen_postgres(reachable_tmp_dir: Path) -> Iterator[PostgresCluster]:
    """A cluster of this test's own, since the test freezes it."""
    base = reachable_tmp_dir / "pg"
    base.mkdir()
    postgres_user = pwd.getpwnam("postgres")  # initdb runs as the postgres user
    os.chown(base, postgres_user.pw_uid, postgres_user.pw_gid)
    cluster = PostgresCluster(base_dir=base, port=free_port())
    cluster.initdb()
    cluster.start()
    try:
        yield cluster
    finally:
        thaw(cluster)
        cluster.stop()


def cluster_pids(cluster: PostgresCluster) -> list[int]:
    assert cluster.pid is not None
    children = subprocess.run(["pgrep", "-P", str(cluster.pid)], capture_output=True,
                              text=True, check=False).stdout.split()
    return [cluster.pid, *map(int, children)]


def freeze(cluster: PostgresCluster) -> None:
    for pid in cluster_pids(cluster):
        os.kill(pid, signal.SIGSTOP)


def thaw(cluster: PostgresCluster) -> None:
    if cluster.pid is None:
        return
    for pid in cluster_pids(cluster):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def server_answer_max_s(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    match = re.search(r'^mlrun_http_request_duration_max_seconds\{[^}]*route="/api/v1/ingest/batch"'
                      r'[^}]*\} (\S+)$', text, re.MULTILINE)
    assert match is not None, "no ingest latency gauge"
    return float(match.group(1))


def test_ledger_timeouts_under_load_never_turn_an_acknowledged_batch_into_new_data(
    server_env: dict[str, str], tmp_path: Path, servers: list[ServerProcess],
    clickhouse_reader: ClickHouseReader, frozen_postgres: PostgresCluster,
) -> None:
    run_id = "frozen-ledger"
    env = {**server_env, "DATABASE_URL": frozen_postgres.dsn()}
    server = ServerProcess(env, tmp_path / "server.log")
    servers.append(server)
    server.start()
    create_run(server.base_url, run_id)
    stats = LoadStats()
    writers, batches, points = 16, 12, 5000
    threads = start_writers(lambda: server.base_url, run_id, writers, batches, points, stats,
                            budget_s=150)
    deadline = time.monotonic() + 60
    while stats.acked_points < writers * batches * points // 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # under way, with batches in every stage of the write path
    # A freeze catches a ledger mark in flight only if some batch was between its ClickHouse
    # commit and its mark at that moment; if none was (all writers waiting on their claims),
    # freeze again while the load lasts, a few times at most.
    for _ in range(4):
        freeze(frozen_postgres)
        time.sleep(4.0)  # longer than the ledger-mark deadline, shorter than the answer bound
        thaw(frozen_postgres)
        if "could not mark" in server.log_text():
            break
        time.sleep(0.5)  # let the writers' retries fill the write path again
    for thread in threads:
        thread.join(timeout=200)
    assert not stats.failures, stats.failures[:5]
    assert stats.acked_points == writers * batches * points
    assert stats.max_latency_s < ANSWER_BOUND_S + 1, stats.max_latency_s  # the client's clock
    assert server_answer_max_s(server.base_url) < ANSWER_BOUND_S  # the server's own clock

    duplicates = {True: 0, False: 0}
    with httpx.Client(headers=AUTH, timeout=ANSWER_BOUND_S + 5) as http:
        for worker, index in sorted(stats.acked_batches):
            answer = http.post(f"{server.base_url}/api/v1/ingest/batch",
                               content=batch_body(run_id, worker, index, batches, points))
            assert answer.status_code == 200, answer.text
            duplicates[answer.json()["duplicate"]] += 1
    print(f"\nresends: {duplicates}; statuses during load: {stats.statuses} {stats.codes}; "
          f"client max {stats.max_latency_s:.2f}s, server max "
          f"{server_answer_max_s(server.base_url):.2f}s")
    # The freeze did what it was for: some ledger update failed after its ClickHouse commit.
    assert "could not mark" in server.log_text()
    assert duplicates == {True: writers * batches, False: 0}
    assert_exactly_once(clickhouse_reader, run_id, stats.acked_steps)
    assert server.stop() == 0, server.log_text()[-3000:]
