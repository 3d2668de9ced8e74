"""The `sdk` workload: what `log()` costs the training loop, and how soon a point is readable.

1. `mlrun.init` against the bench's server (HTTP, a temp spool dir), then `log_calls` calls of
   `run.log({"loss": v}, step=i)`, each timed with `perf_counter_ns` while the SDK's sender thread
   ships the batches; then `run.finish()` (timed) and, with a ClickHouse to read, a count-back of
   the run's points (must equal the calls).
2. log-to-visible: a second run; `visible_samples` times, log one point, then poll until it is
   readable (ClickHouse when the target has a store, else the server's metrics API), each poll
   bounded by `visible_timeout_s`.

3. throughput (`bench.sdk_throughput`, when `throughput` is set): one process pushing points
   through the SDK as fast as its loop goes, end to end, with every process's CPU per point.

Loops are bounded in count and in time (`max_wall_s` stops the timed calls early, noted in the
count). Must not import anyio (the SDK runs its own threads).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx

import mlrun
from bench.errors import BenchError
from bench.metrics_store import METRICS_TABLE, StoreError, count_points
from bench.report import OverheadUs, SdkResult, latency_summary
from bench.sdk_throughput import ThroughputSettings, run_sdk_throughput
from bench.targets import Target
from mlrun.server.protocols.clickhouse import quote_identifier, quote_list

_PROJECT = "bench-sdk"
_POLL_INTERVAL_S = 0.002
_HTTP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class SdkSettings:
    log_calls: int
    max_wall_s: float
    visible_samples: int
    visible_timeout_s: float
    finish_timeout_s: float
    throughput: ThroughputSettings | None = None


def _percentile_us(sorted_ns: list[int], fraction: float) -> float | None:
    if not sorted_ns:
        return None
    rank = max(1, int(-(-fraction * len(sorted_ns) // 1)))
    return round(sorted_ns[rank - 1] / 1000, 2)


def _visibility_probe(target: Target, run_id: str) -> Callable[[int], bool]:
    """`probe(step)`: is the point of `step` readable yet?"""
    store = target.store
    if store is not None:
        connection = store.connect()

        def in_clickhouse(step: int) -> bool:
            sql = (f"SELECT count() AS c FROM {quote_identifier(METRICS_TABLE)}"
                   f" WHERE run_id IN {quote_list([run_id])} AND name = 'probe'"
                   f" AND step = {int(step)}")
            try:
                (row,) = connection.query_rows(sql)
            except StoreError as exc:
                raise BenchError(f"sdk: polling {store.describe()} failed: {exc}") from exc
            return int(row["c"]) > 0
        return in_clickhouse

    client = httpx.Client(base_url=target.http_url, timeout=_HTTP_TIMEOUT_S, trust_env=False,
                          headers={"Authorization": f"Bearer {target.api_key}"})

    def in_api(step: int) -> bool:
        response = client.get(f"/api/v1/runs/{run_id}/metrics",
                              params={"names": "probe", "method": "raw", "max_points": 100_000})
        if response.status_code == 404:
            return False
        series = response.json().get("series") or []
        return bool(series) and int(series[0]["total_points"]) > step
    return in_api


def run_sdk_workload(
    target: Target, settings: SdkSettings, progress: Callable[[str], None]
) -> SdkResult:
    with tempfile.TemporaryDirectory(prefix="mlrun-bench-sdk-") as spool_dir:
        options = mlrun.Settings.load(server_url=target.http_url, api_key=target.api_key,
                                      transport="http", spool_dir=spool_dir)
        progress(f"sdk: {settings.log_calls} log() calls, sender running")
        run = mlrun.init(_PROJECT, settings=options)
        durations_ns: list[int] = []
        clock = time.perf_counter_ns
        deadline_ns = clock() + int(settings.max_wall_s * 1e9)
        started_ns = clock()
        for step in range(settings.log_calls):
            before = clock()
            run.log({"loss": 1.0 / (step + 1)}, step=step)
            after = clock()
            durations_ns.append(after - before)
            if after > deadline_ns:
                break
        wall_s = (clock() - started_ns) / 1e9
        finish_started = time.perf_counter()
        run.finish(timeout_s=settings.finish_timeout_s)
        finish_s = time.perf_counter() - finish_started
        statistics = {k: v for k, v in asdict(run.statistics()).items()
                      if isinstance(v, int | float | str) or v is None}
        stored: int | None = None
        if target.store is not None:
            connection = target.store.connect()
            try:
                stored = count_points(connection, [run.run_id]).distinct_points
            except StoreError as exc:
                raise BenchError(f"sdk: counting back failed: {exc}") from exc
            finally:
                connection.close()

        progress(f"sdk: log-to-visible, {settings.visible_samples} samples")
        probe_run = mlrun.init(_PROJECT, settings=options)
        probe = _visibility_probe(target, probe_run.run_id)
        visible_s: list[float] = []
        timeouts = 0
        for step in range(settings.visible_samples):
            logged_at = time.perf_counter()
            probe_run.log({"probe": float(step)}, step=step)
            give_up_at = logged_at + settings.visible_timeout_s
            while True:
                if probe(step):
                    visible_s.append(time.perf_counter() - logged_at)
                    break
                if time.perf_counter() > give_up_at:
                    timeouts += 1
                    break
                time.sleep(_POLL_INTERVAL_S)  # bounded poll: ClickHouse has no change feed
        probe_run.finish(timeout_s=settings.finish_timeout_s)
        throughput = [] if settings.throughput is None else run_sdk_throughput(
            target, settings.throughput, spool_dir, progress)
    ordered = sorted(durations_ns)
    return SdkResult(
        run_id=run.run_id,
        log_calls=len(durations_ns),
        log_wall_s=round(wall_s, 3),
        log_overhead_us=OverheadUs(p50=_percentile_us(ordered, 0.50),
                                   p99=_percentile_us(ordered, 0.99),
                                   max=round(ordered[-1] / 1000, 1) if ordered else None),
        finish_s=round(finish_s, 3),
        stored_points=stored,
        visible_samples=settings.visible_samples,
        visible_timeouts=timeouts,
        visible_timeout_s=settings.visible_timeout_s,
        visible_ms=latency_summary(visible_s),
        sdk_statistics=statistics,
        throughput=throughput,
    )
