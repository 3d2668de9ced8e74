"""`python -m bench.purge` (from the repository root): how fast a deleted run's data leaves
ClickHouse (issue 19), and whether ingest into other runs stalls meanwhile.

    python -m bench.purge                   own server on real backends, a 10M-point run
    python -m bench.purge --points 2000000  a smaller run
    python -m bench.purge --embedded        own server on the embedded default (chdb)

Seeds one run of `--points` metric points (5 series) straight into the server's ClickHouse
(`INSERT ... SELECT` from `system.numbers`: the views fill the summaries and block rollups as
ingest would), plus `--points / 100` system-metric points and a few batches through the API
(ledger rows); then deletes the run over HTTP and polls its purge job until done, while one
writer keeps sending 1000-point batches to another run. Reports the job's ClickHouse phase
(points removed / seconds, the points/s figure), the whole purge, the CPU ClickHouse and the
server spent, and the writer's batch latency before and during the purge. Counts the deleted
run's rows in ClickHouse afterwards (must be 0) and the other run's (must be all there).

Owns only this workload; targets come from `bench.targets`. Must not import anyio. The box may
be shared: compare CPU seconds, and latencies before/during within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec

from bench.errors import BenchError
from bench.metrics_store import count_points
from bench.processes import UsageProbe
from bench.report import LatencyMs, latency_summary
from bench.targets import Target, own_server_embedded, own_server_on_real_backends

_SERIES = 5
_TIMEOUT_S = 60.0
_JOB_DEADLINE_S = 1800.0
_WRITER_BATCH = 1000
_BASELINE_S = 5.0
# The server starts a job this long after its delete; the housekeeper looks every so often.
_SERVER_ENV = {"MLRUN_PURGE_SETTLE_S": "1", "MLRUN_HOUSEKEEPING_INTERVAL_S": "1"}


class PurgeReport(msgspec.Struct, frozen=True, kw_only=True):
    started_at: str
    target: str
    points: int
    system_points: int
    seed_s: float
    delete_request_ms: float
    clickhouse_phase_s: float
    points_per_s: float
    delete_to_done_s: float
    cpu_s: dict[str, float | None]
    writer_before: LatencyMs
    writer_during: LatencyMs
    writer_errors: int
    left_in_clickhouse: int
    other_run_points: int
    problems: list[str]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.purge", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--points", type=int, default=10_000_000,
                        help="metric points of the deleted run (default 10,000,000)")
    parser.add_argument("--embedded", action="store_true",
                        help="own server on the embedded default (pgserver, chdb)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    return parser.parse_args(argv)


@contextlib.contextmanager
def _target(args: argparse.Namespace, log_dir: Path) -> Iterator[Target]:
    if args.embedded:
        with own_server_embedded(_SERVER_ENV, keep_log_in=log_dir) as target:
            yield target
    else:
        with own_server_on_real_backends(_SERVER_ENV, keep_log_in=log_dir) as target:
            yield target


def _new_run(http: httpx.Client, project: str) -> str:
    response = http.post("/api/v1/runs", json={"project": project})
    response.raise_for_status()
    run_id: str = response.json()["run_id"]
    return run_id


def _batch(run_id: str, first_step: int, count: int) -> dict[str, Any]:
    steps = list(range(first_step, first_step + count))
    return {"run_id": run_id, "batch_id": uuid.uuid4().hex,
            "series": [{"name": "writer", "steps": steps, "values": [0.5] * count}]}


def _seed(target: Target, http: httpx.Client, run_id: str, points: int) -> int:
    """Bulk rows straight into ClickHouse, and 10 API batches for ledger rows."""
    if target.store is None:
        raise BenchError("seeding needs the server's ClickHouse (not available for this target)")
    per_series = points // _SERIES
    now_ms = int(time.time() * 1000)
    connection = target.store.connect()
    try:
        for series in range(_SERIES):
            connection.execute(
                "INSERT INTO metrics (run_id, name, step, value, timestamp_ms, version)"
                f" SELECT '{run_id}', 'series-{series}', number, toFloat64(number % 1000),"
                f" {now_ms} + intDiv(number, 100), number + 1"
                f" FROM system.numbers LIMIT {per_series}")
        system_points = points // 100
        connection.execute(
            "INSERT INTO system_metrics (run_id, name, step, value, timestamp_ms, version)"
            f" SELECT '{run_id}', 'cpu', number, 1.0, {now_ms} + number, number + 1"
            f" FROM system.numbers LIMIT {system_points}")
    finally:
        connection.close()
    for i in range(10):
        http.post("/api/v1/ingest/batch",
                  json=_batch(run_id, 10**12 + i * 100, 100)).raise_for_status()
    return system_points


def _writer(http: httpx.Client, run_id: str, stop: threading.Event,
            latencies: list[tuple[float, float]], errors: list[int]) -> None:
    step = 0
    while not stop.is_set():
        started = time.monotonic()
        response = http.post("/api/v1/ingest/batch", json=_batch(run_id, step, _WRITER_BATCH))
        latencies.append((started, time.monotonic() - started))
        if response.status_code != 200:
            errors.append(response.status_code)
        step += _WRITER_BATCH


def run(args: argparse.Namespace, log_dir: Path) -> PurgeReport:
    problems: list[str] = []
    with _target(args, log_dir) as target, httpx.Client(
            base_url=target.http_url, timeout=_TIMEOUT_S,
            headers={"Authorization": f"Bearer {target.api_key}"}) as http:
        victim, other = _new_run(http, "bench-purge"), _new_run(http, "bench-purge")
        seeded = time.monotonic()
        system_points = _seed(target, http, victim, args.points)
        seed_s = time.monotonic() - seeded
        print(f"seeded {args.points:,} points in {seed_s:.1f}s", file=sys.stderr)

        stop = threading.Event()
        latencies: list[tuple[float, float]] = []
        errors: list[int] = []
        with httpx.Client(base_url=target.http_url, timeout=_TIMEOUT_S,
                          headers={"Authorization": f"Bearer {target.api_key}"}) as writer_http:
            writer = threading.Thread(target=_writer,
                                      args=(writer_http, other, stop, latencies, errors))
            writer.start()
            try:
                time.sleep(_BASELINE_S)  # the writer's latency before the delete
                probe = UsageProbe(target.watched)
                deleted_at = time.monotonic()
                response = http.delete(f"/api/v1/runs/{victim}")
                delete_ms = (time.monotonic() - deleted_at) * 1000
                response.raise_for_status()
                job_id = response.json()["job_id"]
                deadline = deleted_at + _JOB_DEADLINE_S
                while True:
                    job = http.get(f"/api/v1/purge_jobs/{job_id}").json()
                    if job["state"] == "done" or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)  # polling the job over HTTP, bounded by the deadline
                done_s = time.monotonic() - deleted_at
                usage, _, _ = probe.finish()
            finally:
                stop.set()
                writer.join(timeout=_TIMEOUT_S)
        if job["state"] != "done":
            problems.append(f"purge job not done after {_JOB_DEADLINE_S:g}s: {job}")
        assert target.store is not None
        connection = target.store.connect()
        try:
            left = sum(count_points(connection, [victim], table).rows
                       for table in ("metrics", "system_metrics"))
            other_points = count_points(connection, [other]).distinct_points
        finally:
            connection.close()
        written = len(latencies) * _WRITER_BATCH
        if left:
            problems.append(f"{left} rows of the deleted run left in ClickHouse")
        if other_points != written - len(errors) * _WRITER_BATCH:
            problems.append(f"the other run holds {other_points} points, {written} were sent")
        before = [s for at, s in latencies if at < deleted_at]
        during = [s for at, s in latencies if deleted_at <= at <= deleted_at + done_s]
        ch_seconds = float(job.get("clickhouse_seconds") or 0.0)
        removed = int(job.get("points_removed") or 0)
        return PurgeReport(
            started_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            target=target.description, points=args.points, system_points=system_points,
            seed_s=round(seed_s, 2), delete_request_ms=round(delete_ms, 1),
            clickhouse_phase_s=round(ch_seconds, 2),
            points_per_s=round(removed / ch_seconds) if ch_seconds else 0.0,
            delete_to_done_s=round(done_s, 2),
            cpu_s={name: (u.cpu_s if u is not None else None) for name, u in usage.items()},
            writer_before=latency_summary(before), writer_during=latency_summary(during),
            writer_errors=len(errors), left_in_clickhouse=left,
            other_run_points=other_points, problems=problems)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    try:
        report = run(args, args.out / f"purge-{stamp}")
    except BenchError as exc:
        print(f"bench.purge: {exc}", file=sys.stderr)
        return 1
    path = args.out / f"purge-{stamp}.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    print(f"target: {report.target}")
    print(f"deleted run: {report.points:,} metric + {report.system_points:,} system points")
    print(f"DELETE answered in {report.delete_request_ms:.1f} ms; job done after"
          f" {report.delete_to_done_s:.1f} s (settle 1 s included)")
    print(f"ClickHouse phase: {report.clickhouse_phase_s:.2f} s ="
          f" {report.points_per_s:,.0f} points/s removed")
    print(f"CPU seconds during the purge: {report.cpu_s}")
    print(f"writer batch latency ms before: p50 {report.writer_before.p50}"
          f" p99 {report.writer_before.p99}; during: p50 {report.writer_during.p50}"
          f" p99 {report.writer_during.p99} ({report.writer_errors} errors)")
    print(f"left in ClickHouse: {report.left_in_clickhouse}; other run:"
          f" {report.other_run_points:,} points")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print(f"report: {path}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
