"""Smoke test of the load generator: `python -m bench --quick` end to end, the way a user runs it.

The bench starts its own server on real backends (Debian PostgreSQL, clickhouse-server,
rclone serve s3 on free loopback ports), runs a 1-writer baseline and 1-writer ingest workloads
(`TRANSPORTS`) for 2 s each, then the two direct-insert references, stops everything by PID, and
writes its JSON report. What is checked is the report's contract (the keys tools read) and its
correctness verdict: every acknowledged point was counted back from ClickHouse exactly once. No
timing is asserted: the bench measures, this test only checks that it measured something and
that nothing was lost or doubled.

The breakdown workload needs py-spy, which the test environment does not install; its pure
parts (stack -> stage, CPU shared out by samples, the server's flush counters) are tested here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.batches import BatchShape, grpc_request, http_body, make_batch, metric_rows
from bench.reference import ReferenceSender, insert_run_id
from bench.server_telemetry import flush_stats, parse_flush_counters
from bench.stages import parse_frame, split_cpu, stage_of, tally_raw

REPO_ROOT = Path(__file__).resolve().parent.parent
_BENCH_TIMEOUT_S = 90
# http: the columnar `series` wire form; http-rows: one object per point.
TRANSPORTS = ("http", "http-rows", "grpc")

_WORKLOAD_KEYS = {
    "workload", "transport", "writers", "batch_points", "duration_s", "elapsed_s", "requests",
    "acked_batches", "acked_points", "unresolved_points", "points_per_s", "latency_ms",
    "throttled", "throttled_share", "errors", "error_kinds", "count_back", "server",
    "clickhouse", "postgres", "generator", "machine_busy_share", "run_ids",
    "points_per_s_ratio_to_baseline", "p50_ratio_to_baseline", "p99_ratio_to_baseline",
    "server_cpu_us_per_point", "stack_cpu_us_per_point", "clickhouse_cpu_us_per_point",
    "postgres_cpu_us_per_point", "points_per_s_ratio_to_plain_reference",
    "points_per_s_ratio_to_schema_reference", "wire_form", "flushes", "breakdown",
    "clickhouse_insert_cpu_us_per_point", "clickhouse_merge_cpu_us_per_point",
    "clickhouse_insert_cpu_ms_per_insert",
}


def test_a_batch_covers_its_own_steps_and_every_encoding_carries_the_same_points() -> None:
    """The count-back relies on this: batch `seq` of a run owns steps no other batch sends."""
    shape = BatchShape.for_points(1000)
    assert shape.points_per_batch == 1000
    first, second = (make_batch(shape, "run-a", seq) for seq in (0, 1))
    assert not set(first.steps()) & set(second.steps())
    assert first.batch_id != second.batch_id

    body = json.loads(http_body(first))
    json_points = {(s["name"], step) for s in body["series"] for step in s["steps"]}
    message = grpc_request(first)
    grpc_points = {(c.name, step) for c in message.metric_columns for step in c.steps}
    assert len(json_points) == 1000
    assert json_points == grpc_points
    rows = json.loads(http_body(first, "rows"))
    assert rows["series"] == [] and rows["batch_id"] == body["batch_id"]
    assert {(p["name"], p["step"]) for p in rows["metrics"]} == json_points
    values = {(s["name"], step): value for s in body["series"]
              for step, value in zip(s["steps"], s["values"], strict=True)}
    assert {(p["name"], p["step"]): p["value"] for p in rows["metrics"]} == values
    # RowBinary: 1000 rows of (run_id, name, step, value, timestamp_ms, version).
    row_bytes = metric_rows(first, version=1)
    name_bytes = sum(len(name) + 1 for name, _ in json_points)
    assert len(row_bytes) == name_bytes + 1000 * (len("run-a") + 1 + 4 * 8)


class _Inserts:
    """A MetricsConnection that keeps what it is given."""

    def __init__(self) -> None:
        self.payloads: list[tuple[str, bytes]] = []

    def insert_metrics(self, rowbinary: bytes, table: str = "metrics") -> None:
        self.payloads.append((table, rowbinary))

    def query_rows(self, sql: str) -> list[dict[str, Any]]:
        return []

    def execute(self, sql: str) -> None:
        pass

    def close(self) -> None:
        pass


def test_every_reference_insert_is_a_run_of_its_own_with_the_same_rows() -> None:
    shape = BatchShape.for_points(1000)
    sender = ReferenceSender(_Inserts(), "plain")
    first, second = (sender.encode(make_batch(shape, "bench-x-ref-w0", seq)) for seq in (0, 1))
    assert sender.run_ids == [insert_run_id("bench-x-ref-w0", seq) for seq in (0, 1)]
    assert len(first) == len(second)
    assert first.count(sender.run_ids[0].encode()) == 1000
    assert second.count(sender.run_ids[1].encode()) == 1000
    assert sender.run_ids[0].encode() not in second
    assert first.replace(sender.run_ids[0].encode(), sender.run_ids[1].encode()) == second


def _frame(function: str, path: str) -> str:
    return f"{function} ({path}:1)"


_TRIO = "/venv/site-packages/trio/_core/_run.py"
_MAIN = "/repo/mlrun/__main__.py"


def test_a_sampled_stack_belongs_to_the_stage_of_its_leaf_most_claimed_frame() -> None:
    def stage(*frames: str) -> str:
        return stage_of([parse_frame(f) for f in frames])

    handler = _frame("IngestServicer.LogBatch", "/repo/mlrun/server/edges/grpc/ingest_servicer.py")
    nul_walk = _frame("_nul_field", "/repo/mlrun/server/edges/payloads.py")
    convert = _frame("convert", "/repo/mlrun/server/edges/payloads.py")
    from_proto = _frame("batch_from_proto", "/repo/mlrun/server/edges/grpc/ingest_servicer.py")
    assert stage(handler, from_proto, convert, nul_walk) == "validate"
    assert stage(handler, from_proto) == "parse"
    decode = _frame("decode_json", "/repo/mlrun/server/edges/payloads.py")
    assert stage(_frame("log_batch", "/repo/mlrun/server/edges/http/api.py"), decode) == "parse"
    # Plumbing under a stage is that stage's cost: the thread hop of a PostgreSQL call.
    postgres = _frame("Postgres._call", "/repo/mlrun/server/storage/postgres/client.py")
    hop = _frame("to_thread_run_sync", "/venv/site-packages/trio/_threads.py")
    assert stage(_frame("unrolled_run", _TRIO), postgres, hop) == "postgres"
    flush = _frame("ClickHouseWritePath._serve_writer.<locals>.flush",
                   "/repo/mlrun/server/pipelines/clickhouse_write_path.py")
    h11 = _frame("Connection.send", "/venv/site-packages/h11/_connection.py")
    httpcore = _frame("AsyncHTTP11Connection._send_request",
                      "/venv/site-packages/httpcore/_async/http11.py")
    assert stage(flush, httpcore, h11) == "clickhouse"
    encode = _frame("encode_metric_rows", "/repo/mlrun/server/protocols/clickhouse.py")
    assert stage(_frame("Ingest._log_batch", "/repo/mlrun/server/usecases/ingest.py"),
                 _frame("_Reservation.submit_nowait",
                        "/repo/mlrun/server/pipelines/clickhouse_write_path.py"),
                 encode) == "encode"
    # The event loop below the entry point is plumbing; an unclaimed mlrun frame is `other`.
    assert stage(_frame("main", _MAIN), _frame("unrolled_run", _TRIO)) == "plumbing"
    assert stage(_frame("main", _MAIN), _frame("Telemetry.count",
                                               "/repo/mlrun/server/telemetry.py")) == "other"


def test_each_thread_groups_cpu_is_shared_out_by_its_own_samples() -> None:
    main = "thread (100): MainThread"
    worker = "thread (101): Trio thread 0"
    decode = _frame("decode_json", "/repo/mlrun/server/edges/payloads.py")
    psycopg = _frame("Cursor.execute", "/venv/site-packages/psycopg/cursor.py")
    loop = _frame("unrolled_run", _TRIO)
    tally = tally_raw([
        f"{main};{_frame('main', _MAIN)};{decode} 30\n",
        f"{main};{_frame('main', _MAIN)};{loop} 10\n",
        f"{worker};{psycopg} 5\n",
        "garbage line\n",
    ])
    assert tally.total() == 45 and tally.total("main") == 40
    assert tally.framework_leaf == 10
    split = split_cpu(tally, {"main": 2.0, "workers": 0.5})
    assert split["parse"] == pytest.approx(1.5)
    assert split["plumbing"] == pytest.approx(0.5)
    assert split["postgres"] == pytest.approx(0.5)
    assert sum(split.values()) == pytest.approx(2.5)
    # CPU of a group that was never sampled is kept apart, not shared out over the others.
    assert split_cpu(tally_raw([]), {"main": 1.0})["unsampled main"] == pytest.approx(1.0)


def test_the_servers_flush_counters_become_rows_per_insert_and_wait_per_point() -> None:
    def exposition(flushes: int, rows: int, seconds: float) -> str:
        return "\n".join([
            "# TYPE mlrun_pipeline_flushes_total counter",
            f'mlrun_pipeline_flushes_total{{pipeline="metrics"}} {flushes}',
            'mlrun_pipeline_flushes_total{pipeline="system_metrics"} 99',
            f'mlrun_pipeline_committed_rows_total{{pipeline="metrics"}} {rows}',
            f'mlrun_pipeline_flush_duration_seconds_sum{{pipeline="metrics"}} {seconds}',
        ])

    before = parse_flush_counters(exposition(10, 1000, 0.5))
    after = parse_flush_counters(exposition(20, 41000, 2.5))
    stats = flush_stats(before, after, elapsed_s=4.0)
    assert stats is not None
    assert (stats.flushes, stats.rows, stats.rows_per_flush) == (10, 40000, 4000.0)
    assert stats.mean_flush_ms == pytest.approx(200.0)
    assert stats.flush_busy_share == pytest.approx(0.5)
    assert stats.clickhouse_wait_us_per_point == pytest.approx(50.0)
    assert parse_flush_counters("mlrun_other 1") is None


@pytest.mark.timeout(_BENCH_TIMEOUT_S + 30)
def test_quick_bench_on_real_backends_stores_every_acknowledged_point_once(
    tmp_path: Path,
) -> None:
    out_dir = tmp_path / "bench-out"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--duration", "2", "--writers", "1",
         "--transports", ",".join(TRANSPORTS), "--workloads", "ingest,baseline,sdk",
         "--out", str(out_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=_BENCH_TIMEOUT_S,
    )
    output = f"stdout:\n{completed.stdout[-4000:]}\nstderr:\n{completed.stderr[-4000:]}"
    assert completed.returncode == 0, output
    reports = list(out_dir.glob("bench-*.json"))
    assert len(reports) == 1, output
    report: dict[str, Any] = json.loads(reports[0].read_text())

    assert {"schema_version", "target", "settings", "baseline", "ingest", "exactly_once",
            "problems", "notes"} <= set(report)
    assert report["exactly_once"] is True and report["problems"] == [], output
    assert report["target"]["kind"] == "own-real-backends"
    assert report["target"]["server_exit_status"] == 0

    (baseline,) = report["baseline"]
    assert sorted(r["transport"] for r in report["ingest"]) == sorted(TRANSPORTS)
    assert {r["transport"]: r["wire_form"] for r in report["ingest"]} == {
        "http": "series", "http-rows": "rows", "grpc": "columns"}
    # The references: large direct INSERTs, every row counted back, ClickHouse CPU per row.
    assert [r["reference"] for r in report["references"]] == ["plain-mergetree", "schema"]
    for ref in report["references"]:
        assert ref["workload"] == "reference" and ref["errors"] == 0, ref
        assert ref["acked_points"] > 0 and ref["batch_points"] == 100_000
        assert ref["count_back"]["exactly_once"] is True, ref["count_back"]
        assert ref["clickhouse_cpu_us_per_point"] > 0
        # ClickHouse names its threads: INSERT work apart from the merge pool.
        assert ref["clickhouse_insert_cpu_ms_per_insert"] > 0
        assert set(ref["clickhouse"]["cpu_s_by_thread_kind"]) >= {"queries"}
    assert report["references"][1]["points_per_s_ratio_to_plain_reference"] > 0
    assert report["settings"]["reference_rows_per_insert"] == 100_000
    assert report["breakdown"] == []
    for result in [baseline, *report["ingest"]]:
        assert set(result) >= _WORKLOAD_KEYS, sorted(_WORKLOAD_KEYS - set(result))
        assert result["writers"] == 1 and result["batch_points"] == 1000
        assert result["acked_points"] > 0 and result["errors"] == 0, result
        assert result["acked_points"] == result["acked_batches"] * 1000
        count = result["count_back"]
        assert count["stored_distinct_points"] == count["acknowledged_points"]
        assert count["acknowledged_points"] == result["acked_points"]
        assert count["exactly_once"] is True
        assert set(result["latency_ms"]) == {"p50", "p95", "p99", "max"}
        assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
        assert result["generator"]["cpu_s"] >= 0
    for result in report["ingest"]:
        assert result["points_per_s_ratio_to_baseline"] > 0
        assert result["points_per_s_ratio_to_plain_reference"] > 0
        assert result["points_per_s_ratio_to_schema_reference"] > 0
        assert result["stack_cpu_ratio_to_plain_reference"] > 0
        assert result["stack_cpu_ratio_to_schema_reference"] > 0
        assert result["server"]["cpu_s"] > 0
        assert result["server"]["peak_rss_bytes"] > 0
        assert result["server_cpu_us_per_point"] > 0
        assert result["clickhouse_cpu_us_per_point"] > 0
        # The server's own counters: every acknowledged point went out in its INSERTs.
        assert result["flushes"]["rows"] >= result["acked_points"], result["flushes"]
        assert result["flushes"]["rows_per_flush"] > 0
    # sdk: every log() call was timed and its point counted back from ClickHouse.
    sdk = report["sdk"]
    assert sdk["log_calls"] > 0 and sdk["stored_points"] == sdk["log_calls"], sdk
    assert 0 < sdk["log_overhead_us"]["p50"] <= sdk["log_overhead_us"]["p99"]
    assert sdk["visible_timeouts"] == 0 and sdk["visible_ms"]["p50"] > 0, sdk
    assert report["overload"] == [] and report["query"] is None
    assert sorted(report["workloads"]) == ["baseline", "ingest", "sdk"]
    plot = Path(report["plot"])
    assert plot.parent == out_dir and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The table names the verdict too.
    assert "exactly once: yes" in completed.stdout
