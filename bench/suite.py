"""The sweep: for each writer count K, the baseline and then every transport, each counted back.

Owns the order of a bench run and the assembly of its report:

    for K in writers:                 (a server on real backends, or one given by URL)
        baseline(K)                   K threads inserting the batches straight into ClickHouse
        for transport in transports:  K fresh runs, K writer threads through the server
            ingest(K, transport)      then count the runs' points back from ClickHouse
    embedded default:                 ingest sweep first; then stop the server, open its chdb
                                      directory, count every workload back, run the baselines

Then, on the same server, `sdk` (bench.sdk) and `query` (bench.query through
bench.query_workload). `run_overload` is the overload sweep (K rising, first transport) for a
second Suite on a server with a small pipeline; `__main__` merges the two reports.

Every workload writes to its own fresh runs (`bench-<session>-<workload>-k<K>-w<i>`), so
counting back is exact and runs of the bench never mix. CPU and RSS are sampled around each
workload (`processes.UsageProbe`). Loops are bounded: the writer counts and transports are
finite lists, and each workload is bounded in time by `writers.run_writers`.

Must not import anyio.
"""

from __future__ import annotations

import datetime
import os
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from bench.baseline import DirectInsertSender
from bench.batches import Batch, BatchShape, make_batch
from bench.errors import BenchError
from bench.ingest import GrpcIngestSender, HttpIngestSender, RunsClient
from bench.metrics_store import MetricsStore, StoreError, count_points
from bench.processes import Usage, UsageProbe
from bench.query import Settings as QuerySettings
from bench.query_workload import run_query_workload
from bench.report import (
    CountBack,
    ProcessUsage,
    QuerySection,
    Report,
    SdkResult,
    Settings,
    TargetInfo,
    Transport,
    WorkloadResult,
    cpu_us_per_point,
    latency_summary,
    ratio,
)
from bench.sdk import SdkSettings, run_sdk_workload
from bench.targets import Target
from bench.writers import NORMAL_STOPS, Limits, Sender, run_writers

_PROJECT = "bench"
# A writer cannot send more than this many batches per second of duration (a 1000-point batch
# takes > 1 ms); the cap only makes the loop bounded in count as well as in time.
_MAX_BATCHES_PER_S = 5000


@dataclass(frozen=True, slots=True)
class SuiteSettings:
    writers: tuple[int, ...]
    transports: tuple[Transport, ...]
    duration_s: float
    batch_points: int
    request_timeout_s: float
    grace_s: float
    quick: bool
    workloads: frozenset[str] = frozenset({"ingest", "baseline"})
    overload_writers: tuple[int, ...] = ()
    sdk: SdkSettings | None = None
    query: QuerySettings | None = None


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _process_usage(usage: Usage | None, elapsed_s: float) -> ProcessUsage | None:
    if usage is None:
        return None
    return ProcessUsage(
        cpu_s=usage.cpu_s,
        cpu_share=round(usage.cpu_s / elapsed_s, 3) if elapsed_s > 0 else 0.0,
        peak_rss_bytes=usage.peak_rss_bytes,
        peak_rss_since_start=usage.peak_rss_since_start,
    )


def _count_back(store: MetricsStore, result: WorkloadResult) -> CountBack:
    connection = store.connect()
    try:
        stored = count_points(connection, result.run_ids)
    except StoreError as exc:
        raise BenchError(f"counting back from {store.describe()} failed: {exc}") from exc
    finally:
        connection.close()
    acked, unresolved = result.acked_points, result.unresolved_points
    return CountBack(
        acknowledged_points=acked,
        stored_distinct_points=stored.distinct_points,
        stored_rows=stored.rows,
        unresolved_points=unresolved,
        exactly_once=acked <= stored.distinct_points <= acked + unresolved,
    )


class Suite:
    def __init__(self, target: Target, settings: SuiteSettings) -> None:
        self.target = target
        self.settings = settings
        self.shape = BatchShape.for_points(settings.batch_points)
        self.session = secrets.token_hex(4)
        self.limits = Limits(
            duration_s=settings.duration_s,
            grace_s=settings.grace_s,
            max_batches=max(1, int(settings.duration_s * _MAX_BATCHES_PER_S)),
        )
        self.baseline: list[WorkloadResult] = []
        self.ingest: list[WorkloadResult] = []
        self.overload: list[WorkloadResult] = []
        self.sdk: SdkResult | None = None
        self.query: QuerySection | None = None
        self.query_problems: list[str] = []
        self.notes: list[str] = list(target.notes)
        self.server_exit_status: int | None = None
        self._progress: Callable[[str], None] = lambda line: None

    # --- the sweep ----------------------------------------------------------------------------

    def run(self, progress: Callable[[str], None]) -> Report:
        self._progress = progress
        started_at = _now_iso()
        store = self.target.store
        workloads = self.settings.workloads
        for writers in self.settings.writers if workloads & {"ingest", "baseline"} else ():
            if store is not None and "baseline" in workloads:
                self.baseline.append(self._baseline(store, writers))
            for transport in self.settings.transports if "ingest" in workloads else ():
                self.ingest.append(self._ingest(transport, writers, store))
        if "sdk" in workloads and self.settings.sdk is not None:
            self.sdk = run_sdk_workload(self.target, self.settings.sdk, progress)
        if "query" in workloads and self.settings.query is not None:
            self.query, self.query_problems = run_query_workload(
                self.target, self.settings.query, progress)
        self._stop_and_count_back()
        return self._report(started_at)

    def run_overload(self, progress: Callable[[str], None]) -> Report:
        """K rising against a server with a small pipeline (the target's), first transport."""
        self._progress = progress
        started_at = _now_iso()
        transport = self.settings.transports[0]
        for writers in self.settings.overload_writers:
            self.overload.append(
                self._ingest(transport, writers, self.target.store, workload="overload"))
        self._stop_and_count_back()
        return self._report(started_at)

    def _stop_and_count_back(self) -> None:
        self.server_exit_status = self.target.stop_server()
        if self.server_exit_status not in (0, None):
            self.notes.append(f"the server exited with status {self.server_exit_status}")
        if self.target.after_stop_store is not None:
            self._after_stop(self.target.after_stop_store())
        self.ingest = [self._with_ratios(result) for result in self.ingest]

    def _after_stop(self, store: MetricsStore) -> None:
        """Embedded default: count back what the stopped server stored, then the baselines."""
        self._progress(f"counting back from {store.describe()}")
        self.ingest = [
            msgspec.structs.replace(result, count_back=_count_back(store, result))
            for result in self.ingest
        ]
        self.overload = [
            msgspec.structs.replace(result, count_back=_count_back(store, result))
            for result in self.overload
        ]
        if "baseline" in self.settings.workloads and not self.overload:
            self.baseline = [self._baseline(store, writers) for writers in self.settings.writers]

    # --- one workload -------------------------------------------------------------------------

    def _run_ids(self, workload: str, writers: int) -> list[str]:
        return [f"bench-{self.session}-{workload}-k{writers}-w{index}" for index in range(writers)]

    def _baseline(self, store: MetricsStore, writers: int) -> WorkloadResult:
        run_ids = self._run_ids("baseline", writers)
        self._progress(f"baseline: {writers} writer(s) inserting into {store.describe()}")
        senders: list[Sender[bytes]] = []
        try:
            for _ in range(writers):
                senders.append(DirectInsertSender(store.connect()))
        except BaseException:
            for sender in senders:
                sender.close()
            raise
        result = self._measure("baseline", "clickhouse", senders, run_ids)
        return msgspec.structs.replace(result, count_back=_count_back(store, result))

    def _ingest(
        self, transport: Transport, writers: int, store: MetricsStore | None,
        workload: str = "ingest",
    ) -> WorkloadResult:
        target = self.target
        run_ids = self._run_ids(f"{workload}-{transport}", writers)
        timeout_s = self.settings.request_timeout_s
        where = target.http_url if transport == "http" else target.grpc_target
        self._progress(f"{workload}: {writers} writer(s) over {transport} to {where}")
        runs = RunsClient(target.http_url, target.api_key, timeout_s=timeout_s)
        runs.create(run_ids, project=_PROJECT)
        senders: list[Sender[bytes]] = []
        try:
            for _ in range(writers):
                if transport == "http":
                    senders.append(
                        HttpIngestSender(target.http_url, target.api_key, timeout_s=timeout_s))
                else:
                    if target.grpc_target is None:
                        raise BenchError("the gRPC transport needs --grpc-target")
                    senders.append(
                        GrpcIngestSender(target.grpc_target, target.api_key, timeout_s=timeout_s))
        except BaseException:
            for sender in senders:
                sender.close()
            raise
        result = self._measure(workload, transport, senders, run_ids)
        runs.finish(run_ids)
        count = _count_back(store, result) if store is not None else None
        return msgspec.structs.replace(result, count_back=count)

    def _with_ratios(self, result: WorkloadResult) -> WorkloadResult:
        """An ingest result with its figures over the baseline's with the same K."""
        base = next((b for b in self.baseline if b.writers == result.writers), None)
        if base is None:
            return result
        return msgspec.structs.replace(
            result,
            points_per_s_ratio_to_baseline=ratio(result.points_per_s, base.points_per_s),
            p50_ratio_to_baseline=ratio(result.latency_ms.p50, base.latency_ms.p50),
            p99_ratio_to_baseline=ratio(result.latency_ms.p99, base.latency_ms.p99),
        )

    def _measure(
        self,
        workload: str,
        transport: Transport,
        senders: Sequence[Sender[bytes]],
        run_ids: Sequence[str],
    ) -> WorkloadResult:
        shape = self.shape

        def batch_of(writer: int, seq: int) -> Batch:
            return make_batch(shape, run_ids[writer], seq)

        probe = UsageProbe(self.target.watched)
        run = run_writers(senders, batch_of, self.limits,
                          request_timeout_s=self.settings.request_timeout_s)
        usage, own_cpu_s, busy_share = probe.finish()
        elapsed_s = run.elapsed_s
        stopped_by = Counter(tally.stopped_by for tally in run.tallies)
        if run.stuck_writers:
            stopped_by["still running at the join deadline"] = run.stuck_writers
        errors = run.errors()
        details: dict[str, str] = {}
        for tally in run.tallies:
            for kind, detail in tally.error_details.items():
                details.setdefault(kind, detail)
        requests = sum(t.requests for t in run.tallies)
        throttled = sum(t.throttled for t in run.tallies)
        return WorkloadResult(
            workload="baseline" if workload == "baseline" else (
                "overload" if workload == "overload" else "ingest"),
            transport=transport,
            writers=len(senders),
            batch_points=shape.points_per_batch,
            duration_s=self.settings.duration_s,
            elapsed_s=round(elapsed_s, 3),
            requests=requests,
            acked_batches=sum(t.acked_batches for t in run.tallies),
            acked_points=run.acked_points,
            unresolved_points=run.unresolved_points,
            points_per_s=round(run.acked_points / elapsed_s, 1) if elapsed_s > 0 else 0.0,
            latency_ms=latency_summary(run.latencies_s()),
            throttled=throttled,
            throttled_share=round(throttled / requests, 4) if requests else 0.0,
            errors=sum(errors.values()),
            error_kinds=dict(errors),
            error_details=details,
            duplicates=sum(t.duplicates for t in run.tallies),
            accepted_mismatches=sum(t.accepted_mismatches for t in run.tallies),
            stopped_by=dict(stopped_by),
            run_ids=list(run_ids),
            count_back=None,
            server=(server := _process_usage(usage.get("server"), elapsed_s)),
            clickhouse=(clickhouse := _process_usage(usage.get("clickhouse"), elapsed_s)),
            postgres=(postgres := _process_usage(usage.get("postgres"), elapsed_s)),
            # The baseline bypasses the server: its "stack" is ClickHouse alone.
            server_cpu_us_per_point=(None if workload == "baseline"
                                     else cpu_us_per_point(run.acked_points, server)),
            stack_cpu_us_per_point=(cpu_us_per_point(run.acked_points, clickhouse)
                                    if workload == "baseline" else
                                    cpu_us_per_point(run.acked_points, server, clickhouse,
                                                     postgres)),
            generator=ProcessUsage(
                cpu_s=round(own_cpu_s, 3),
                cpu_share=round(own_cpu_s / elapsed_s, 3) if elapsed_s > 0 else 0.0,
                peak_rss_bytes=None,
                peak_rss_since_start=True,
            ),
            machine_busy_share=round(busy_share, 3),
        )

    # --- the report ---------------------------------------------------------------------------

    def _report(self, started_at: str) -> Report:
        problems: list[str] = list(self.query_problems)
        for result in [*self.baseline, *self.ingest, *self.overload]:
            label = f"{result.workload} {result.transport} K={result.writers}"
            if result.count_back is not None and not result.count_back.exactly_once:
                c = result.count_back
                problems.append(
                    f"{label}: {c.stored_distinct_points} distinct points stored for"
                    f" {c.acknowledged_points} acknowledged ({c.unresolved_points} unresolved)")
            early = {k: v for k, v in result.stopped_by.items() if k not in NORMAL_STOPS}
            if early:
                kinds = ", ".join(f"{k} x{v}" for k, v in sorted(early.items()))
                problems.append(f"{label}: writers stopped early: {kinds}")
            if result.accepted_mismatches:
                problems.append(f"{label}: {result.accepted_mismatches} batches acknowledged"
                                " with another point count than sent")
            ran_its_course = result.elapsed_s >= 0.5 * result.duration_s
            # chdb inserts run inside the bench process: there its CPU is ClickHouse's.
            in_process_store = result.workload == "baseline" and self.target.store is None
            if ran_its_course and not in_process_store and result.generator.cpu_share > 0.8:
                self.notes.append(
                    f"{label}: the load generator used {result.generator.cpu_share:.0%} of a"
                    " core; it may have limited the rate")
        counted = [r.count_back for r in [*self.baseline, *self.ingest, *self.overload]
                   if r.count_back]
        if self.sdk is not None and self.sdk.stored_points is not None \
                and self.sdk.stored_points != self.sdk.log_calls:
            problems.append(f"sdk: {self.sdk.stored_points} points stored for"
                            f" {self.sdk.log_calls} log() calls")
        store = self.target.store
        return Report(
            started_at=started_at,
            finished_at=_now_iso(),
            target=TargetInfo(
                kind=self.target.kind,
                description=self.target.description,
                http_url=self.target.http_url,
                grpc_target=self.target.grpc_target,
                metrics_store=store.describe() if store is not None else None,
                server_exit_status=self.server_exit_status,
            ),
            settings=Settings(
                writers=list(self.settings.writers),
                transports=list(self.settings.transports),
                duration_s=self.settings.duration_s,
                batch_points=self.shape.points_per_batch,
                metric_names_per_batch=len(self.shape.metric_names),
                request_timeout_s=self.settings.request_timeout_s,
                grace_s=self.settings.grace_s,
                quick=self.settings.quick,
                cpu_count=os.cpu_count() or 0,
            ),
            baseline=self.baseline,
            ingest=self.ingest,
            exactly_once=all(c.exactly_once for c in counted) if counted else None,
            problems=problems,
            notes=self.notes,
            workloads=sorted(self.settings.workloads),
            overload=self.overload,
            sdk=self.sdk,
            query=self.query,
        )

