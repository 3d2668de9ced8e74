"""The bench's report: its schema (msgspec Structs), the JSON file, and the plain-text table.

Owns what a run's numbers are called and how they are shown. Units are in the names
(`_s`, `_ms`, `_bytes`, `_share` for 0..1). Percentiles are nearest-rank over every acknowledged
request of a workload. A `cpu_share` is CPU seconds divided by the workload's wall time, so 1.0
is one core busy for the whole workload (the machine has two).

The JSON keys are a contract for tools and for tests/test_bench_smoke.py: add keys freely,
rename none without bumping `schema_version`.

Must not do any I/O besides writing the report file, and must not import anyio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec
from msgspec import Struct

SCHEMA_VERSION = 1
# "http" sends the columnar `series` wire form, "http-rows" the row form (`metrics: [{name, value,
# step, timestamp}]`, what hand-written and MLflow-style clients send), "grpc" `metric_columns`.
Transport = Literal["clickhouse", "http", "http-rows", "grpc", "mlflow"]
ReferenceKind = Literal["plain-mergetree", "schema"]


class LatencyMs(Struct, frozen=True, kw_only=True):
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


class ProcessUsage(Struct, frozen=True, kw_only=True):
    cpu_s: float
    cpu_share: float
    peak_rss_bytes: int | None
    peak_rss_since_start: bool  # true when the peak could not be reset before the workload
    # ClickHouse: "queries" (the INSERTs and their views) and "background" (merges) threads.
    cpu_s_by_thread_kind: dict[str, float] | None = None


class CountBack(Struct, frozen=True, kw_only=True):
    """Every acknowledged point stored exactly once: `stored_distinct_points` must equal
    `acknowledged_points` (or lie within `unresolved_points` above it, for batches that were
    neither acknowledged nor refused when the writers gave up)."""

    acknowledged_points: int
    stored_distinct_points: int
    stored_rows: int  # raw rows; above distinct only until ClickHouse merges replaced copies
    unresolved_points: int
    exactly_once: bool


class FlushStats(Struct, frozen=True, kw_only=True):
    """The server's group commit into ClickHouse's `metrics` during a workload, from its
    `/metrics` counters: INSERTs made, rows per INSERT, and the wall time spent waiting on them
    (`clickhouse_wait_us_per_point`: flush seconds over rows; `flush_busy_share`: flush seconds
    over the workload's wall time, 1.0 = one INSERT always in flight)."""

    flushes: int
    rows: int
    rows_per_flush: float | None
    mean_flush_ms: float | None
    flush_busy_share: float | None
    clickhouse_wait_us_per_point: float | None


class StageCost(Struct, frozen=True, kw_only=True):
    stage: str  # bench.stages.STAGES, or "unsampled <thread group>"
    cpu_us_per_point: float
    share: float  # of the server's CPU in the window


class Breakdown(Struct, frozen=True, kw_only=True):
    """The server's CPU per point split into stages (bench.profiler, bench.stages)."""

    sampler: str
    sampled_window_s: float
    samples: int
    main_thread_samples: int
    sample_errors: int | None  # stacks py-spy could not read (torn by --nonblocking): dropped
    server_cpu_s: float  # from /proc, over the whole workload
    main_thread_cpu_s: float  # the event loop
    worker_threads_cpu_s: float  # PostgreSQL calls run in worker threads
    server_cpu_us_per_point: float
    coverage: float | None  # sampled GIL-seconds over measured CPU seconds in the window
    stages: list[StageCost]
    framework_leaf_share: float | None  # samples whose leaf frame is trio/anyio/hypercorn/...
    unclaimed_leaves: dict[str, int]  # top leaf frames of `other`: stale rules show up here
    sampler_cpu_s: float | None  # py-spy's own CPU (it shares the cores)
    samples_file: str


class WorkloadResult(Struct, frozen=True, kw_only=True):
    workload: Literal["baseline", "ingest", "overload", "reference"]
    transport: Transport
    writers: int
    batch_points: int
    duration_s: float
    elapsed_s: float
    requests: int
    acked_batches: int
    acked_points: int
    unresolved_points: int  # neither acknowledged nor refused when the writers gave up
    points_per_s: float
    latency_ms: LatencyMs
    throttled: int  # 429 / RESOURCE_EXHAUSTED answers
    throttled_share: float  # of all requests
    errors: int
    error_kinds: dict[str, int]
    error_details: dict[str, str]
    duplicates: int  # acknowledged as "already stored" (a retry of a batch that had committed)
    accepted_mismatches: int  # acknowledged with another point count than sent
    stopped_by: dict[str, int]  # why writers stopped: "deadline" (or "deadline while
    # throttled") for all when all went well; anything else is listed in `problems`
    run_ids: list[str]
    count_back: CountBack | None
    server: ProcessUsage | None
    clickhouse: ProcessUsage | None
    postgres: ProcessUsage | None
    generator: ProcessUsage  # the bench process itself (all writer threads)
    machine_busy_share: float  # all cores, from /proc/stat
    in_flight: int = 1  # batches each writer kept in flight (`--in-flight`)
    # CPU per acknowledged point, in microseconds: of the server alone, and of the whole stack
    # (server + ClickHouse + PostgreSQL). On a shared box these hold from run to run while rates
    # swing 2x: compare runs by them.
    server_cpu_us_per_point: float | None = None
    stack_cpu_us_per_point: float | None = None
    # Ingest only: this workload over the baseline with the same number of writers.
    points_per_s_ratio_to_baseline: float | None = None
    p50_ratio_to_baseline: float | None = None
    p99_ratio_to_baseline: float | None = None
    # CPU per acknowledged point of ClickHouse and of PostgreSQL alone (all their threads and
    # background work, merges included, during the workload).
    clickhouse_cpu_us_per_point: float | None = None
    postgres_cpu_us_per_point: float | None = None
    # ClickHouse's CPU split by thread: running the INSERTs with their views, and merging
    # parts in the background (which goes on after a workload: this is what fell inside it);
    # and the INSERT threads' CPU per INSERT (the server's flushes, or a direct workload's).
    clickhouse_insert_cpu_us_per_point: float | None = None
    clickhouse_merge_cpu_us_per_point: float | None = None
    clickhouse_insert_cpu_ms_per_insert: float | None = None
    # Ingest only: points/s over the two direct-insert references of the same run.
    points_per_s_ratio_to_plain_reference: float | None = None
    points_per_s_ratio_to_schema_reference: float | None = None
    # The same in CPU, which holds on a shared box where rates swing: the whole stack's CPU per
    # point over the reference's ClickHouse CPU per row (how many times the physical cost).
    stack_cpu_ratio_to_plain_reference: float | None = None
    stack_cpu_ratio_to_schema_reference: float | None = None
    wire_form: str | None = None  # http: "series" or "rows"; grpc: "columns"
    flushes: FlushStats | None = None
    breakdown: Breakdown | None = None
    # A reference: which one and how many rows each INSERT carried.
    reference: ReferenceKind | None = None
    reference_table: str | None = None


class OverheadUs(Struct, frozen=True, kw_only=True):
    p50: float | None
    p99: float | None
    max: float | None


class CpuPerPoint(Struct, frozen=True, kw_only=True):
    """The SDK process's CPU-µs per point, by thread (see `bench.sdk_throughput`)."""

    total: float | None
    caller: float | None  # the thread calling log()
    batcher: float | None
    sender: float | None  # every lane
    rest: float | None  # grpc core threads, thread tails after the last sample


class SdkThroughput(Struct, frozen=True, kw_only=True):
    """One process pushing points through the SDK as fast as its loop goes (one variant)."""

    transport: str
    in_flight: int  # max_batches_in_flight
    offered_points_per_s: int | None  # the loop's pace; None: flat out
    pattern: str
    log_calls: int
    points: int
    log_wall_s: float  # the log() loop
    end_to_end_s: float  # first log() -> finish() returned, everything acknowledged
    points_per_s: int  # points / end_to_end_s
    acknowledged_points: int
    stored_points: int | None  # counted back from ClickHouse (None: no store)
    log_call_us: OverheadUs  # wall time of one log() call
    log_call_cpu_us: float | None  # the calling thread's CPU per log() call
    sdk_cpu_us_per_point: CpuPerPoint
    server_cpu_us_per_point: float | None
    clickhouse_cpu_us_per_point: float | None
    postgres_cpu_us_per_point: float | None
    # % of one core over end_to_end_s; machine_busy: % of the whole machine (all cores)
    cpu_share_pct: dict[str, float | None]
    batches: int
    spilled_batches: int  # batches the outbox spilled to disk (memory queue full)
    retries: int
    load_average: float  # 1-minute, at the end: the box is shared


class SdkResult(Struct, frozen=True, kw_only=True):
    """`mlrun.init` + `log()` against the bench's server, the SDK's sender thread running."""

    run_id: str
    log_calls: int
    log_wall_s: float  # all timed calls, back to back
    log_overhead_us: OverheadUs  # one `log()` call, perf_counter_ns around it
    finish_s: float  # `run.finish()` after the timed calls: the sender drains its queue
    stored_points: int | None  # counted back from ClickHouse after finish (None: no store)
    visible_samples: int  # points logged one at a time and polled for in ClickHouse
    visible_timeouts: int  # samples not visible within `visible_timeout_s`
    visible_timeout_s: float
    visible_ms: LatencyMs  # log() to the point being readable in ClickHouse
    sdk_statistics: dict[str, int | float | str | None]
    throughput: list[SdkThroughput] = []  # bench.sdk_throughput, one per variant


class QueryLatency(Struct, frozen=True, kw_only=True):
    workload: str
    requests: int
    latency_ms: LatencyMs
    response_bytes: int
    data: str
    target_ms: float | None
    meets_target: bool | None
    cpu_ms_per_request: dict[str, float] = {}
    machine_busy: float | None = None


class QuerySection(Struct, frozen=True, kw_only=True):
    """`bench.query`'s read-path latencies, run on the bench's server."""

    sizes: dict[str, int]
    seed_s: float
    results: list[QueryLatency]


class TargetInfo(Struct, frozen=True, kw_only=True):
    kind: str
    description: str
    http_url: str
    grpc_target: str | None
    metrics_store: str | None
    server_exit_status: int | None = None


class Settings(Struct, frozen=True, kw_only=True):
    writers: list[int]
    transports: list[str]
    duration_s: float
    batch_points: int
    metric_names_per_batch: int
    request_timeout_s: float
    grace_s: float
    quick: bool
    cpu_count: int
    breakdown_writers: int | None = None
    sample_rate_hz: int | None = None
    reference_writers: int | None = None
    reference_rows_per_insert: int | None = None


class Report(Struct, frozen=True, kw_only=True):
    schema_version: int = SCHEMA_VERSION
    started_at: str
    finished_at: str
    target: TargetInfo
    settings: Settings
    baseline: list[WorkloadResult]
    ingest: list[WorkloadResult]
    exactly_once: bool | None  # every count-back matched (None: nothing could be counted)
    problems: list[str]  # correctness failures and writers that stopped early
    notes: list[str]
    workloads: list[str] = []  # which of ingest, baseline, overload, query, sdk were run
    overload: list[WorkloadResult] = []  # a server with a small pipeline, K rising
    overload_server_env: dict[str, str] = {}
    sdk: SdkResult | None = None
    query: QuerySection | None = None
    plot: str | None = None  # the PNG next to the JSON
    # Large RowBinary INSERTs straight into ClickHouse (bench.reference), measured once per run:
    # into a plain MergeTree with the metrics columns (what ClickHouse physically does), and
    # into the real `metrics` table with its materialized views (what the schema costs).
    references: list[WorkloadResult] = []
    # Ingest workloads at one K with the server sampled (bench.profiler): CPU per point by stage.
    breakdown: list[WorkloadResult] = []


def percentile_ms(sorted_s: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of sorted seconds, in milliseconds."""
    if not sorted_s:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_s)))
    return round(sorted_s[rank - 1] * 1000, 3)


def latency_summary(latencies_s: Sequence[float]) -> LatencyMs:
    ordered = sorted(latencies_s)
    return LatencyMs(
        p50=percentile_ms(ordered, 0.50),
        p95=percentile_ms(ordered, 0.95),
        p99=percentile_ms(ordered, 0.99),
        max=round(ordered[-1] * 1000, 3) if ordered else None,
    )


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return round(value / base, 3)


def write_json(report: Report, out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    return path


# --------------------------------------------------------------------------- the table

_COLUMNS = (
    ("workload", 10), ("K", 3), ("points/s", 10), ("x base", 6), ("x plain", 7),
    ("x schema", 8), ("p50 ms", 8), ("p95 ms", 8), ("p99 ms", 8), ("reqs", 6), ("429 %", 6),
    ("errors", 6), ("stored/acked", 21), ("srv cpu", 7), ("srv us/pt", 9), ("ch us/pt", 8),
    ("all us/pt", 9), ("cpu x plain", 11), ("srv MB", 6), ("ch cpu", 6), ("pg cpu", 6),
    ("gen cpu", 7), ("busy", 5),
)


def _cell(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _percent(usage: ProcessUsage | None) -> str:
    return "-" if usage is None else f"{usage.cpu_share * 100:.0f}%"


def lane_label(result: WorkloadResult) -> str:
    """`baseline`, `plain MT`, `schema`, or the transport (`http` sends `series`)."""
    if result.workload == "baseline":
        return "baseline"
    if result.workload == "reference":
        return "plain MT" if result.reference == "plain-mergetree" else "schema"
    return result.transport


def _row(result: WorkloadResult) -> list[str]:
    count = result.count_back
    if count is None:
        stored = "not counted"
    else:
        verdict = "ok" if count.exactly_once else "MISMATCH"
        stored = f"{count.stored_distinct_points}/{count.acknowledged_points} {verdict}"
    ingest_like = result.workload in ("ingest", "overload")
    return [
        lane_label(result),
        str(result.writers) if result.in_flight == 1 else f"{result.writers}x{result.in_flight}",
        _cell(result.points_per_s),
        _cell(result.points_per_s_ratio_to_baseline, 2) if ingest_like else (
            "1" if result.workload == "baseline" else "-"),
        _cell(result.points_per_s_ratio_to_plain_reference, 2),
        _cell(result.points_per_s_ratio_to_schema_reference, 2),
        _cell(result.latency_ms.p50, 1),
        _cell(result.latency_ms.p95, 1),
        _cell(result.latency_ms.p99, 1),
        str(result.requests),
        _cell(result.throttled_share * 100, 1),
        str(result.errors),
        stored,
        _percent(result.server),
        _cell(result.server_cpu_us_per_point, 2),
        _cell(result.clickhouse_cpu_us_per_point, 2),
        _cell(result.stack_cpu_us_per_point, 2),
        _cell(result.stack_cpu_ratio_to_plain_reference, 1),
        _cell(result.server.peak_rss_bytes / 2**20
              if result.server and result.server.peak_rss_bytes else None),
        _percent(result.clickhouse),
        _percent(result.postgres),
        _percent(result.generator),
        f"{result.machine_busy_share * 100:.0f}%",
    ]


def _aligned(header: list[str], rows: list[list[str]],
             min_widths: Sequence[int] = ()) -> list[str]:
    """Plain-text columns: the first left-aligned, the rest right-aligned, a rule under the
    header."""
    widths = [max(len(name), *(min_widths[i:i + 1] or [0])) for i, name in enumerate(header)]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for index, row in enumerate([header, *rows]):
        lines.append("  ".join(
            cell.ljust(width) if column < 1 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def _rows_text(results: Sequence[WorkloadResult]) -> list[str]:
    return _aligned([name for name, _ in _COLUMNS], [_row(result) for result in results],
                    [width for _, width in _COLUMNS])


def _reference_lines(report: Report) -> list[str]:
    settings = report.settings
    rows_per_insert = settings.reference_rows_per_insert
    return [
        f"references: direct RowBinary INSERTs of {_cell(rows_per_insert)} rows by"
        f" {settings.reference_writers} writer(s) into a plain MergeTree with the metrics"
        " columns (plain MT) and into `metrics` with its views (schema); K = writers,"
        " points/s = rows/s, ch us/pt = ClickHouse CPU per row",
        *_rows_text(report.references),
        *_clickhouse_split_lines(report.references),
    ]


def _clickhouse_split_lines(results: Sequence[WorkloadResult]) -> list[str]:
    lines = []
    for result in results:
        if result.clickhouse_insert_cpu_us_per_point is None:
            continue
        rows = result.acked_points / result.acked_batches if result.acked_batches else None
        lines.append(
            f"{lane_label(result)}: ClickHouse CPU per point"
            f" {_cell(result.clickhouse_insert_cpu_us_per_point, 2)} us in INSERTs (with views)"
            f" + {_cell(result.clickhouse_merge_cpu_us_per_point, 2)} us merging;"
            f" {_cell(result.clickhouse_insert_cpu_ms_per_insert, 1)} ms of CPU per INSERT of"
            f" {_cell(rows)} rows")
    return lines


def _breakdown_lines(report: Report) -> list[str]:
    results = report.breakdown
    stage_names: list[str] = []
    for result in results:
        for cost in result.breakdown.stages if result.breakdown else ():
            if cost.stage not in stage_names:
                stage_names.append(cost.stage)
    header = ["lane", "points/s", "p50 ms", "p99 ms", "srv us/pt", *stage_names, "ch us/pt",
              "ch ins", "ch merge", "pg us/pt", "ch wait us/pt", "rows/INSERT", "ch ms/INSERT",
              "INSERT busy", "x plain", "x schema", "all us/pt", "cpu x plain", "cpu x schema",
              "coverage", "samples"]
    rows = []
    for result in results:
        breakdown, flushes = result.breakdown, result.flushes
        costs = {c.stage: c for c in breakdown.stages} if breakdown else {}
        rows.append([
            lane_label(result), _cell(result.points_per_s), _cell(result.latency_ms.p50, 1),
            _cell(result.latency_ms.p99, 1), _cell(result.server_cpu_us_per_point, 2),
            *(_cell(costs[name].cpu_us_per_point, 2) if name in costs else "-"
              for name in stage_names),
            _cell(result.clickhouse_cpu_us_per_point, 2),
            _cell(result.clickhouse_insert_cpu_us_per_point, 2),
            _cell(result.clickhouse_merge_cpu_us_per_point, 2),
            _cell(result.postgres_cpu_us_per_point, 2),
            _cell(flushes.clickhouse_wait_us_per_point if flushes else None, 2),
            _cell(flushes.rows_per_flush if flushes else None),
            _cell(result.clickhouse_insert_cpu_ms_per_insert, 1),
            f"{flushes.flush_busy_share:.0%}" if flushes and flushes.flush_busy_share is not None
            else "-",
            _cell(result.points_per_s_ratio_to_plain_reference, 2),
            _cell(result.points_per_s_ratio_to_schema_reference, 2),
            _cell(result.stack_cpu_us_per_point, 2),
            _cell(result.stack_cpu_ratio_to_plain_reference, 1),
            _cell(result.stack_cpu_ratio_to_schema_reference, 1),
            _cell(breakdown.coverage if breakdown else None, 2),
            str(breakdown.samples) if breakdown else "-",
        ])
    first = next((r.breakdown for r in results if r.breakdown), None)
    sampler = f"{first.sampler}" if first else "no samples"
    lines = [
        f"breakdown at K={results[0].writers}: server CPU-us per point by stage ({sampler};"
        " each thread group's /proc CPU shared out by its samples; bench.stages says what each"
        " stage holds); ch ins / ch merge = ClickHouse CPU-us per point in its INSERT threads /"
        " its merge pool; ch wait = the server's wall time in INSERTs per point; INSERT busy ="
        " share of the wall time an INSERT into `metrics` was in flight",
        *_aligned(header, rows),
    ]
    for result in results:
        if result.breakdown and result.breakdown.unclaimed_leaves:
            leaves = ", ".join(f"{k} {v}" for k, v in result.breakdown.unclaimed_leaves.items())
            lines.append(f"{lane_label(result)}: top frames in `other`: {leaves}")
    return lines


def _sdk_lines(sdk: SdkResult) -> list[str]:
    o, v = sdk.log_overhead_us, sdk.visible_ms
    stored = "not counted" if sdk.stored_points is None else f"{sdk.stored_points} stored"
    return [
        f"sdk: {sdk.log_calls} log() calls in {sdk.log_wall_s:.2f} s; overhead per call"
        f" p50 {_cell(o.p50, 1)} us, p99 {_cell(o.p99, 1)} us, max {_cell(o.max, 0)} us;"
        f" finish {sdk.finish_s:.2f} s; {stored}",
        f"sdk: log-to-visible in ClickHouse over {sdk.visible_samples} samples:"
        f" p50 {_cell(v.p50, 1)} ms, p95 {_cell(v.p95, 1)} ms, max {_cell(v.max, 1)} ms;"
        f" {sdk.visible_timeouts} not visible within {sdk.visible_timeout_s:g} s",
        *_sdk_throughput_lines(sdk.throughput),
    ]


def _sdk_throughput_lines(results: list[SdkThroughput]) -> list[str]:
    if not results:
        return []
    header = (f"{'transport':16} {'in fl':>5} {'offered':>8} {'points/s':>9} {'stored':>8}"
              f" {'log us p50/p99':>15} {'sdk us/pt':>9} {'(call/bat/snd/rest)':>20}"
              f" {'srv':>5} {'ch':>5} {'cpu% sdk/srv/ch/box':>20} {'spill':>5} {'load':>5}")
    rows = []
    for r in results:
        c, s, o = r.sdk_cpu_us_per_point, r.cpu_share_pct, r.log_call_us
        split = "/".join(_cell(v, 2) for v in (c.caller, c.batcher, c.sender, c.rest))
        shares = "/".join(_cell(s.get(k), 0) for k in ("sdk", "server", "clickhouse",
                                                         "machine_busy"))
        stored = "-" if r.stored_points is None else str(r.stored_points)
        rows.append(
            f"{r.transport:16} {r.in_flight:>5} {_cell(r.offered_points_per_s):>8}"
            f" {r.points_per_s:>9,} {stored:>8}"
            f" {_cell(o.p50, 1) + '/' + _cell(o.p99, 1):>15} {_cell(c.total, 2):>9}"
            f" {split:>20} {_cell(r.server_cpu_us_per_point, 2):>5}"
            f" {_cell(r.clickhouse_cpu_us_per_point, 2):>5} {shares:>20}"
            f" {r.spilled_batches:>5} {r.load_average:>5}")
    return [
        f"sdk throughput, one process, end to end (first log() to finish() acknowledged):"
        f" {results[0].pattern}, {results[0].points} points per row; us/pt = CPU-us per point;"
        " cpu% = % of one core over the run (box = whole machine)",
        header, "-" * len(header), *rows,
    ]


# CPU ms per request of the server, ClickHouse and PostgreSQL, and the machine's busy share.
CPU_HEADER = f"{'srv cpu':>7} {'ch cpu':>6} {'pg cpu':>6} {'busy':>4}"


def cpu_cells(cpu_ms: dict[str, float], busy: float | None) -> str:
    def cell(name: str, width: int) -> str:
        value = cpu_ms.get(name)
        return f"{'-' if value is None else f'{value:.1f}':>{width}}"
    share = "-" if busy is None else f"{busy * 100:.0f}%"
    return f"{cell('server', 7)} {cell('clickhouse', 6)} {cell('postgres', 6)} {share:>4}"



def _query_lines(query: QuerySection) -> list[str]:
    header = (f"{'query':20} {'p50 ms':>8} {'p99 ms':>8} {'target':>7} {'KB':>7} {CPU_HEADER}"
              "  data")
    lines = [f"query: seeded {query.sizes} in {query.seed_s:.1f} s", header, "-" * len(header)]
    for r in query.results:
        goal = "-" if r.target_ms is None else f"<{r.target_ms:g}"
        mark = "" if r.meets_target is None else (" ok" if r.meets_target else " MISSED")
        lines.append(f"{r.workload:20} {r.latency_ms.p50 or 0:8.1f} {r.latency_ms.p99 or 0:8.1f}"
                     f" {goal:>7} {r.response_bytes / 1024:7.0f}"
                     f" {cpu_cells(r.cpu_ms_per_request, r.machine_busy)}  {r.data}{mark}")
    return lines


def render_table(report: Report) -> str:
    """Baseline and ingest rows grouped by K (baseline first), overload, sdk, query, then
    problems and notes."""
    results = sorted(
        [*report.baseline, *report.ingest],
        key=lambda r: (r.writers, r.workload != "baseline", r.transport),
    )
    lines = [
        f"MLRun bench - {report.target.description}",
        f"{report.settings.batch_points}-point batches"
        f" ({report.settings.metric_names_per_batch} metrics x"
        f" {report.settings.batch_points // report.settings.metric_names_per_batch} steps),"
        f" {report.settings.duration_s:g} s per workload, {report.settings.cpu_count} cores;"
        " cpu columns: % of one core; x base: points/s over the direct ClickHouse insert of the"
        " same batches (baseline); x plain / x schema: over the references below; cpu x plain:"
        " all us/pt over the plain reference's ClickHouse CPU per row",
        "",
    ]
    if results:
        lines += [*_rows_text(results), ""]
    if report.references:
        lines += [*_reference_lines(report), ""]
    if report.breakdown:
        lines += [*_breakdown_lines(report), ""]
    if report.overload:
        env = " ".join(f"{k}={v}" for k, v in sorted(report.overload_server_env.items()))
        lines += [f"overload (server {env or 'as given'}; srv MB: peak RSS during the step):",
                  *_rows_text(report.overload), ""]
    if report.sdk is not None:
        lines += [*_sdk_lines(report.sdk), ""]
    if report.query is not None:
        lines += [*_query_lines(report.query), ""]
    verdicts = {True: "yes, every count-back matched", False: "NO - see problems",
                None: "not checked (no ClickHouse to count in)"}
    lines.append("exactly once: " + verdicts[report.exactly_once])
    lines.extend(f"problem: {problem}" for problem in report.problems)
    lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)


def cpu_us_per_point(points: int, *usages: ProcessUsage | None) -> float | None:
    """CPU microseconds per point over the given processes; None when one was not measured."""
    if points <= 0 or not usages or any(usage is None for usage in usages):
        return None
    return round(sum(u.cpu_s for u in usages if u is not None) * 1e6 / points, 3)
