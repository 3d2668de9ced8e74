"""`python -m bench.query` (from the repository root): read-path latencies of issue 5.

    python -m bench.query                  own server on real backends (PostgreSQL 15,
                                           clickhouse-server 18.16, rclone s3)
    python -m bench.query --embedded       own server on the embedded default (pgserver, chdb)
    python -m bench.query --quick          smaller data, fewer requests (about a minute)
    python -m bench.query --url http://host:3001 --api-key KEY

Seeds through the public API (so it works against any server): `--runs` runs in one project
with tags and params, one series of `--series-points` points, one of `--full-points`, and
`--compare-runs` runs of `--compare-points` points each; then times, one request at a time over
one keep-alive connection, `--requests` requests per workload after `_WARMUP_REQUESTS` untimed
ones:

    list_filtered   GET /api/v1/runs?project&tags=team=cv&params=lr>0.001&limit=100
    list_deep_page  the same listing, the page after 20 pages (a cursor)
    downsample_*    GET .../metrics of the big series to 1000 points (lttb, minmax, avg)
    full_series     GET .../metrics?method=raw of the full series in one page
    full_series_columns  the same with layout=columns (arrays, what the web UI reads)
    compare         POST /api/v1/runs/compare of the compare runs, 500 points per series
    compare_columns the same with layout=columns
    run_detail      GET /api/v1/runs/{run_id} (metric summaries from ClickHouse)

Latency is measured from sending the request to having the whole body (loopback HTTP, the
server's JSON encoding included, the client's decoding not). Every answer is checked (status,
point counts) so a fast wrong answer cannot pass as a result. Prints a table and writes
`query-<time>.json` under `--out`. Exit 1 when a check failed or set-up failed, 2 for bad
options. Targets from issue 5 are printed next to the numbers.

Owns only this workload; targets (own servers, backends) come from `bench.targets`. Must not
import anyio: plain threads for seeding, one connection for timing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec

from bench.errors import BenchError
from bench.processes import UsageProbe
from bench.report import CPU_HEADER, LatencyMs, cpu_cells, latency_summary
from bench.targets import Target, external_server, own_server_embedded, own_server_on_real_backends

_PROJECT = "bench-query"
_WARMUP_REQUESTS = 3
_SEED_THREADS = 8
_BATCH_POINTS = 100_000  # the server's MAX_POINTS_PER_BATCH
_REQUEST_TIMEOUT_S = 60.0
_T0_MS = 1_700_000_000_000
# Issue 5's targets, in ms (p50 is what is compared; p99 is reported).
_TARGETS_MS = {"list_filtered": 20.0, "downsample_lttb": 50.0, "downsample_minmax": 50.0,
               "downsample_avg": 50.0, "full_series": 150.0, "compare": 100.0,
               "full_series_columns": 150.0, "compare_columns": 100.0}


class QueryResult(msgspec.Struct, frozen=True, kw_only=True):
    workload: str
    requests: int
    latency_ms: LatencyMs
    response_bytes: int
    data: str
    target_ms: float | None
    meets_target: bool | None
    # CPU ms per request of each watched process (server, clickhouse, postgres) over the timed
    # requests, from /proc (10 ms ticks: over 50 requests, 0.2 ms resolution). What a request
    # costs, which holds on a shared box where latency swings; empty for an external server.
    cpu_ms_per_request: dict[str, float] = {}
    # The machine's busy share while the workload ran (other engineers' work included).
    machine_busy: float | None = None


class QueryReport(msgspec.Struct, frozen=True, kw_only=True):
    started_at: str
    target: str
    sizes: dict[str, int]
    seed_s: float
    results: list[QueryResult]
    problems: list[str]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    runs: int
    series_points: int
    full_points: int
    compare_runs: int
    compare_points: int
    requests: int


def _progress(line: str) -> None:
    print(f"bench.query: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- seeding


def _client(target: Target) -> httpx.Client:
    return httpx.Client(base_url=target.http_url, timeout=_REQUEST_TIMEOUT_S,
                        headers={"Authorization": f"Bearer {target.api_key}"}, trust_env=False)


def _check(response: httpx.Response, what: str, status: int = 200) -> Any:
    if response.status_code != status and not (status == 201 and response.status_code == 200):
        raise BenchError(f"{what}: HTTP {response.status_code} {response.text[:300]}")
    return response.json()


def _create_runs(target: Target, run_ids: Sequence[str], index_offset: int = 0) -> None:
    teams = ("cv", "nlp", "rl")
    rates = (0.1, 0.01, 0.003, 0.001, 0.0003, 0.0001)

    def create(chunk: Sequence[tuple[int, str]]) -> None:
        with _client(target) as client:
            for index, run_id in chunk:
                _check(client.post("/api/v1/runs", json={
                    "project": _PROJECT, "run_id": run_id, "name": f"trial-{index}",
                    "tags": {"team": teams[index % 3], "stage": "sweep"},
                    "config": {"lr": rates[(index // 3) % len(rates)], "batch": 32 << (index % 4),
                               "opt": "adam" if index % 2 else "sgd"},
                }), f"create run {run_id}", 201)

    numbered = list(enumerate(run_ids, start=index_offset))
    chunks = [numbered[i::_SEED_THREADS] for i in range(_SEED_THREADS)]
    with concurrent.futures.ThreadPoolExecutor(_SEED_THREADS) as pool:
        for future in [pool.submit(create, chunk) for chunk in chunks if chunk]:
            future.result()


def _log_series(client: httpx.Client, run_id: str, name: str, points: int) -> None:
    for start in range(0, points, _BATCH_POINTS):
        steps = list(range(start, min(points, start + _BATCH_POINTS)))
        values = [1.0 / (1 + s / 1000) + ((s * 7919) % 1000) / 1e5 for s in steps]
        _check(client.post("/api/v1/ingest/batch", json={
            "run_id": run_id, "batch_id": f"{name}-{start}",
            "series": [{"name": name, "steps": steps, "values": values,
                        "timestamps": [_T0_MS + s * 10 for s in steps]}],
        }), f"log {name} of {run_id}")


def seed(target: Target, settings: Settings) -> tuple[list[str], float]:
    started = time.perf_counter()
    run_ids = [f"bq-{i:06d}" for i in range(settings.runs)]
    _progress(f"creating {settings.runs} runs")
    _create_runs(target, run_ids)
    compare_ids = run_ids[:settings.compare_runs]
    with _client(target) as client:
        _progress(f"logging {settings.series_points} + {settings.full_points} points")
        _log_series(client, run_ids[-1], "loss", settings.series_points)
        _log_series(client, run_ids[-2], "loss", settings.full_points)
        _progress(f"logging {settings.compare_runs} x {settings.compare_points} points")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            def log(run_id: str) -> None:
                with _client(target) as own:
                    _log_series(own, run_id, "loss", settings.compare_points)
            for future in [pool.submit(log, run_id) for run_id in compare_ids]:
                future.result()
    return run_ids, time.perf_counter() - started


# --------------------------------------------------------------------------- timing


def _timed(
    target: Target, client: httpx.Client, requests: int,
    send: Callable[[httpx.Client], httpx.Response], verify: Callable[[Any], None],
) -> tuple[list[float], int, dict[str, float], float]:
    """`requests` timed requests after `_WARMUP_REQUESTS` untimed ones (the first timed answer
    is verified): latencies in s, the answer's size, each watched process's CPU ms per timed
    request, and the machine's busy share meanwhile."""
    for _ in range(_WARMUP_REQUESTS):
        _check(send(client), "warm-up")
    probe = UsageProbe(target.watched)
    latencies: list[float] = []
    size = 0
    for index in range(requests):
        started = time.perf_counter()
        response = send(client)
        latencies.append(time.perf_counter() - started)
        body = _check(response, "query")
        if index == 0:
            verify(body)
            size = len(response.content)
    usage, _, busy = probe.finish()
    cpu_ms = {name: round(used.cpu_s * 1000 / max(1, requests), 2)
              for name, used in usage.items() if used is not None}
    return latencies, size, cpu_ms, round(busy, 2)


def run_workloads(target: Target, settings: Settings, run_ids: list[str]) -> tuple[
        list[QueryResult], list[str]]:
    big, full = run_ids[-1], run_ids[-2]
    compare_ids = run_ids[:settings.compare_runs]
    problems: list[str] = []
    results: list[QueryResult] = []
    # Runs the filter matches, by the seeding rule of _create_runs (team=cv: index % 3 == 0;
    # lr > 0.001: the first three of the six rates); quick mode seeds too few for a full page.
    matching = sum(1 for i in range(settings.runs) if i % 3 == 0 and (i // 3) % 6 < 3)
    listing: dict[str, str | int] = {"project": _PROJECT, "tags": "team=cv", "params": "lr>0.001",
                                     "limit": 100}

    with _client(target) as client:
        cursor = None
        for _ in range(20):
            page = _check(client.get("/api/v1/runs", params={
                **listing, **({"cursor": cursor} if cursor else {})}), "page walk")
            cursor = page["next_cursor"]
            if cursor is None:
                break

        def expect(condition: bool, message: str) -> None:
            if not condition:
                problems.append(message)

        def series_check(method: str, budget: int, total: int,
                         points: str = "points") -> Callable[[Any], None]:
            def verify(body: Any) -> None:
                (series,) = body["series"]
                expect(series["total_points"] == total,
                       f"{method}: total_points {series['total_points']} != {total}")
                expect(0 < len(series[points]) <= budget,
                       f"{method}: {len(series[points])} points for a budget of {budget}")
            return verify

        workloads: list[tuple[str, str, Callable[[httpx.Client], httpx.Response],
                              Callable[[Any], None]]] = [
            ("list_filtered", f"{settings.runs} runs, tag+param filter, page of 100",
             lambda c: c.get("/api/v1/runs", params=listing),
             lambda body: expect(len(body["runs"]) == min(100, matching),
                                 f"list_filtered: {len(body['runs'])} runs, expected "
                                 f"{min(100, matching)}")),
            ("list_deep_page", f"{settings.runs} runs, page 21 through a cursor",
             lambda c: c.get("/api/v1/runs", params={**listing, "cursor": cursor}),
             lambda body: expect(len(body["runs"]) > 0, "list_deep_page: empty page")),
        ]
        for method in ("lttb", "minmax", "avg"):
            workloads.append((
                f"downsample_{method}", f"{settings.series_points} points -> 1000",
                lambda c, m=method: c.get(f"/api/v1/runs/{big}/metrics", params={  # type: ignore[misc]
                    "names": "loss", "method": m, "max_points": 1000}),
                series_check(method, 1000, settings.series_points)))
        workloads += [
            ("full_series", f"{settings.full_points} points, raw, one page",
             lambda c: c.get(f"/api/v1/runs/{full}/metrics", params={
                 "names": "loss", "method": "raw", "max_points": settings.full_points}),
             series_check("raw", settings.full_points, settings.full_points)),
            ("full_series_columns", f"{settings.full_points} points, raw, layout=columns",
             lambda c: c.get(f"/api/v1/runs/{full}/metrics", params={
                 "names": "loss", "method": "raw", "max_points": settings.full_points,
                 "layout": "columns"}),
             series_check("raw", settings.full_points, settings.full_points, "steps")),
            ("compare", f"{settings.compare_runs} runs x {settings.compare_points} points"
             " -> 500 each",
             lambda c: c.post("/api/v1/runs/compare", json={"run_ids": compare_ids}),
             lambda body: expect(len(body["runs"]) == settings.compare_runs
                                 and all(len(r["series"][0]["points"]) <= 500
                                         for r in body["runs"]), "compare: wrong shape")),
            ("compare_columns", "the same, layout=columns (what the web UI asks for)",
             lambda c: c.post("/api/v1/runs/compare", json={"run_ids": compare_ids,
                                                            "layout": "columns"}),
             lambda body: expect(len(body["runs"]) == settings.compare_runs
                                 and all(len(r["series"][0]["steps"]) <= 500
                                         for r in body["runs"]), "compare_columns: wrong shape")),
            ("run_detail", "one run with one metric summary",
             lambda c: c.get(f"/api/v1/runs/{big}"),
             lambda body: expect(body["metrics_summary"][0]["count"] == settings.series_points,
                                 "run_detail: wrong count")),
        ]
        for name, data, send, verify in workloads:
            _progress(f"timing {name} ({settings.requests} requests)")
            latencies, size, cpu_ms, busy = _timed(target, client, settings.requests,
                                                              send, verify)
            summary = latency_summary(latencies)
            goal = _TARGETS_MS.get(name)
            results.append(QueryResult(
                workload=name, requests=len(latencies), latency_ms=summary, response_bytes=size,
                data=data, target_ms=goal,
                meets_target=None if goal is None or summary.p50 is None else summary.p50 < goal,
                cpu_ms_per_request=cpu_ms, machine_busy=busy,
            ))
    return results, problems


# --------------------------------------------------------------------------- report

def render(report: QueryReport) -> str:
    header = (f"{'workload':20} {'p50 ms':>8} {'p99 ms':>8} {'target':>7} {'KB':>7}"
              f" {CPU_HEADER}  data")
    lines = [f"target: {report.target}", f"seeded in {report.seed_s:.1f} s", header,
             "-" * len(header)]
    for r in report.results:
        target = "-" if r.target_ms is None else f"<{r.target_ms:g}"
        mark = "" if r.meets_target is None else (" ok" if r.meets_target else " MISSED")
        lines.append(f"{r.workload:20} {r.latency_ms.p50 or 0:8.1f} {r.latency_ms.p99 or 0:8.1f}"
                     f" {target:>7} {r.response_bytes / 1024:7.0f}"
                     f" {cpu_cells(r.cpu_ms_per_request, r.machine_busy)}  {r.data}{mark}")
    lines += [f"problem: {p}" for p in report.problems]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.query",
                                     description="MLRun read-path latencies (issue 5)")
    parser.add_argument("--url", help="an existing server's HTTP base URL")
    parser.add_argument("--api-key", default=os.environ.get("MLRUN_API_KEY"))
    parser.add_argument("--embedded", action="store_true",
                        help="start an own server on the embedded default")
    parser.add_argument("--quick", action="store_true",
                        help="2000 runs, 200k/20k-point series, 20 requests per workload")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--series-points", type=int)
    parser.add_argument("--full-points", type=int)
    parser.add_argument("--compare-runs", type=int)
    parser.add_argument("--compare-points", type=int)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    if args.url and args.embedded:
        parser.error("--url and --embedded exclude each other")
    if args.url and not args.api_key:
        parser.error("--url needs --api-key (or MLRUN_API_KEY)")
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    quick = args.quick
    settings = Settings(
        runs=args.runs or (2000 if quick else 10_000),
        series_points=args.series_points or (200_000 if quick else 1_000_000),
        full_points=args.full_points or (20_000 if quick else 100_000),
        compare_runs=args.compare_runs or 20,
        compare_points=args.compare_points or (2_000 if quick else 10_000),
        requests=args.requests or (20 if quick else 100),
    )
    if settings.compare_runs > min(100, settings.runs - 2) or settings.runs < 300:
        raise SystemExit("bench.query: needs --runs >= 300 and --compare-runs <= 100")
    if min(settings.series_points, settings.full_points, settings.compare_points,
           settings.requests) < 1 or settings.full_points > 100_000:
        raise SystemExit("bench.query: sizes must be positive, --full-points <= 100000")
    return settings


@contextlib.contextmanager
def _target(args: argparse.Namespace, log_dir: Path) -> Iterator[Target]:
    if args.url:
        yield external_server(url=args.url, api_key=args.api_key, grpc_target=None,
                              server_pid=None, clickhouse=None)
    elif args.embedded:
        with own_server_embedded({}, keep_log_in=log_dir) as target:
            yield target
    else:
        with own_server_on_real_backends({}, keep_log_in=log_dir) as target:
            yield target


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = settings_of(args)
    now = datetime.datetime.now(datetime.UTC)
    stem = "query-" + now.strftime("%Y%m%dT%H%M%SZ")
    out_dir: Path = args.out
    try:
        _progress("starting the target" if not args.url else f"target {args.url}")
        with _target(args, out_dir / f"{stem}-logs") as target:
            run_ids, seed_s = seed(target, settings)
            results, problems = run_workloads(target, settings, run_ids)
            report = QueryReport(
                started_at=now.isoformat(timespec="seconds"), target=target.description,
                sizes=msgspec.structs.asdict(settings), seed_s=round(seed_s, 2),
                results=results, problems=problems)
    except (BenchError, httpx.HTTPError) as exc:
        print(f"bench.query: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.query: interrupted; every process it started was stopped", file=sys.stderr)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    print(render(report))
    print(f"\nreport: {path}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
