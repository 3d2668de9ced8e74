"""The sweep: for each writer count K, the baseline and then every transport, each counted back.

Owns the order of a bench run and the assembly of its report:

    for K in writers:                 (a server on real backends, or one given by URL)
        baseline(K)                   K threads inserting the batches straight into ClickHouse
        for transport in transports:  K fresh runs, K writer threads through the server
            ingest(K, transport)      then count the runs' points back from ClickHouse
    breakdown:                        at one K, every transport again with the server sampled
                                      (bench.profiler): its CPU per point split into stages
    references:                       large direct INSERTs into a plain MergeTree and into
                                      `metrics` with its views (bench.reference); every ingest
                                      result gets its rate over both as ratios
    embedded default:                 ingest sweep first; then stop the server, open its chdb
                                      directory, count every workload back, run the baselines
                                      and the references

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
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from bench import reference
from bench.baseline import DirectInsertSender
from bench.batches import Batch, BatchShape, make_batch
from bench.errors import BenchError
from bench.ingest import GrpcIngestSender, HttpIngestSender, RunsClient, SharedGrpcChannel
from bench.metrics_store import METRICS_TABLE, MetricsStore, StoreError, count_points
from bench.mlflow import MlflowBatchSender, official_client_rates
from bench.peers import run_peers
from bench.processes import Usage, UsageProbe
from bench.profiler import DEFAULT_RATE_HZ, StageProfiler, find_py_spy
from bench.query import Settings as QuerySettings
from bench.query_workload import run_query_workload
from bench.report import (
    CountBack,
    FlushStats,
    ProcessUsage,
    QuerySection,
    ReferenceKind,
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
from bench.server_telemetry import flush_stats, read_flush_counters
from bench.targets import Target
from bench.writers import NORMAL_STOPS, Limits, Sender, run_writers

_PROJECT = "bench"
# A writer cannot send more than this many batches per second of duration (a 1000-point batch
# takes > 1 ms); the cap only makes the loop bounded in count as well as in time.
_MAX_BATCHES_PER_S = 5000
# References: at most this long each (they need no more to settle on a rate).
_MAX_REFERENCE_S = 5.0
# Before a reference or a breakdown lane, wait (bounded) for ClickHouse's merges of the previous
# workload's parts to finish, so its CPU is not billed to the next one.
_SETTLE_MAX_S = 15.0
_SETTLE_POLL_S = 0.25
Workload = Literal["baseline", "ingest", "overload", "reference"]
_WIRE_FORMS = {"http": "series", "http-rows": "rows", "grpc": "columns", "mlflow": "mlflow-rows"}


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
    breakdown_writers: int = 8
    sample_rate_hz: int = DEFAULT_RATE_HZ
    log_dir: Path | None = None  # where the breakdown's py-spy samples are kept
    peers: tuple[tuple[str, str], ...] = ()  # (name, URL) of MLflow-API servers (bench.peers)
    in_flight: int = 1  # batches each ingest writer keeps in flight (bench.ingest.in_flight)

    @property
    def references(self) -> bool:
        """References go with every ingest report (and can be run alone)."""
        return bool(self.workloads & {"ingest", "baseline", "breakdown", "reference"})


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
        cpu_s_by_thread_kind=usage.cpu_s_by_thread_kind,
    )


def _count_back(store: MetricsStore, result: WorkloadResult,
                table: str = METRICS_TABLE) -> CountBack:
    connection = store.connect()
    try:
        stored = count_points(connection, result.run_ids, table)
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
        self.references: list[WorkloadResult] = []
        self.breakdown: list[WorkloadResult] = []
        self.breakdown_problems: list[str] = []
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
        py_spy = find_py_spy() if "breakdown" in workloads else ""  # fail before any load
        for writers in self.settings.writers if workloads & {"ingest", "baseline"} else ():
            if store is not None and "baseline" in workloads:
                self.baseline.append(self._baseline(store, writers))
            for transport in self.settings.transports if "ingest" in workloads else ():
                self.ingest.append(self._ingest(transport, writers, store))
        if "breakdown" in workloads:
            for transport in self.settings.transports:
                self.breakdown.append(self._breakdown(transport, store, py_spy))
        if store is not None and self.settings.references:
            self.references = self._references(store)
        if "mlflow" in workloads:
            self._progress("mlflow: the official client's rate")
            self.notes.extend(official_client_rates(
                self.target, duration_s=self.settings.duration_s, session=self.session))
        if "peers" in workloads:
            self.notes.extend(run_peers(
                self.target, self.settings.peers, writers=self.settings.writers,
                limits=self.limits, shape=self.shape,
                request_timeout_s=self.settings.request_timeout_s, progress=self._progress))
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
        self.breakdown = [self._with_ratios(result) for result in self.breakdown]
        self.references = [self._with_ratios(result) for result in self.references]

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
        self.breakdown = [
            msgspec.structs.replace(result, count_back=_count_back(store, result))
            for result in self.breakdown
        ]
        if "baseline" in self.settings.workloads and not self.overload:
            self.baseline = [self._baseline(store, writers) for writers in self.settings.writers]
        if self.settings.references and not self.overload:
            self.references = self._references(store)

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
        workload: str = "ingest", *, profiler: Callable[[], StageProfiler] | None = None,
    ) -> WorkloadResult:
        """K writers through the server; `workload` "breakdown" runs as an ingest workload
        with the server sampled by the profiler `profiler()` makes."""
        target = self.target
        run_ids = self._run_ids(f"{workload}-{transport}", writers)
        timeout_s = self.settings.request_timeout_s
        where = target.grpc_target if transport == "grpc" else target.http_url
        self._progress(f"{workload}: {writers} writer(s) over {transport} to {where}")
        runs = RunsClient(target.http_url, target.api_key, timeout_s=timeout_s)
        runs.create(run_ids, project=_PROJECT)
        # The overload workload measures refusals, one batch per writer at a time.
        in_flight = 1 if workload == "overload" else self.settings.in_flight
        senders: list[Sender[bytes]] = []
        try:
            for _ in range(writers):
                channel = None
                if transport == "grpc":
                    if target.grpc_target is None:
                        raise BenchError("the gRPC transport needs --grpc-target")
                    channel = SharedGrpcChannel(target.grpc_target, in_flight)
                for _ in range(in_flight):
                    if transport == "grpc":
                        assert target.grpc_target is not None and channel is not None
                        senders.append(GrpcIngestSender(target.grpc_target, target.api_key,
                                                        timeout_s=timeout_s, channel=channel))
                    elif transport == "mlflow":
                        senders.append(MlflowBatchSender(target.http_url, target.api_key,
                                                         timeout_s=timeout_s))
                    else:
                        senders.append(HttpIngestSender(
                            target.http_url, target.api_key, timeout_s=timeout_s,
                            form="rows" if transport == "http-rows" else "series"))
        except BaseException:
            for sender in senders:
                sender.close()
            raise
        result = self._measure("overload" if workload == "overload" else "ingest", transport,
                               senders, run_ids, flush_url=target.http_url,
                               profiler=profiler() if profiler is not None else None,
                               in_flight=in_flight)
        runs.finish(run_ids)
        count = _count_back(store, result) if store is not None else None
        return msgspec.structs.replace(result, count_back=count)

    def _breakdown(self, transport: Transport, store: MetricsStore | None,
                   py_spy: str) -> WorkloadResult:
        server = self.target.watched.get("server")
        if server is None:
            raise BenchError("the breakdown workload samples the server: it needs its PID"
                             " (an own server, or --server-pid)")
        if store is not None:
            self._settle(store)
        writers = self.settings.breakdown_writers
        log_dir = self.settings.log_dir or Path("bench-out")
        samples = log_dir / f"breakdown-{transport}-k{writers}.pyspy.txt"

        def profiler() -> StageProfiler:
            return StageProfiler(server.pid, duration_s=self.settings.duration_s,
                                 rate_hz=self.settings.sample_rate_hz, out_path=samples,
                                 py_spy=py_spy)

        return self._ingest(transport, writers, store, "breakdown", profiler=profiler)

    def _settle(self, store: MetricsStore) -> None:
        """Wait until ClickHouse runs no merge, at most `_SETTLE_MAX_S` (then go on anyway)."""
        connection = store.connect()
        try:
            deadline = time.monotonic() + _SETTLE_MAX_S
            while time.monotonic() < deadline:
                (row,) = connection.query_rows("SELECT count() AS n FROM system.merges")
                if int(row["n"]) == 0:
                    return
                time.sleep(_SETTLE_POLL_S)  # bounded by the deadline; nothing to wait on
            self.notes.append(f"ClickHouse was still merging {_SETTLE_MAX_S:g} s after a"
                              " workload; the next one's ClickHouse CPU includes merges")
        except StoreError:
            return  # settling is a courtesy to the measurement, not a step it needs
        finally:
            connection.close()

    def _references(self, store: MetricsStore) -> list[WorkloadResult]:
        plain = reference.plain_table(self.session)
        connection = store.connect()
        try:
            connection.execute(reference.drop_table_sql(plain))
            connection.execute(reference.create_plain_table_sql(plain))
        except StoreError as exc:
            raise BenchError(f"creating the reference table {plain} failed: {exc}") from exc
        finally:
            connection.close()
        try:
            return [self._reference(store, "plain-mergetree", plain),
                    self._reference(store, "schema", METRICS_TABLE)]
        finally:
            connection = store.connect()
            try:
                connection.execute(reference.drop_table_sql(plain))
            except StoreError as exc:
                self.notes.append(f"the reference table {plain} could not be dropped: {exc}")
            finally:
                connection.close()

    def _reference(self, store: MetricsStore, kind: ReferenceKind, table: str) -> WorkloadResult:
        self._settle(store)
        writers = reference.WRITERS
        duration_s = min(self.settings.duration_s, _MAX_REFERENCE_S)
        run_ids = self._run_ids(f"reference-{kind}", writers)
        self._progress(f"reference: {writers} writer(s) inserting {reference.ROWS_PER_INSERT:,}"
                       f" rows per INSERT into {table} ({store.describe()})")
        senders: list[reference.ReferenceSender] = []
        try:
            for _ in range(writers):
                senders.append(reference.ReferenceSender(store.connect(), table))
        except BaseException:
            for sender in senders:
                sender.close()
            raise
        max_batches = int(duration_s * reference.MAX_ROWS_PER_S
                          / reference.ROWS_PER_INSERT / writers) + 1
        limits = Limits(duration_s=duration_s, grace_s=self.settings.grace_s,
                        max_batches=max_batches)
        result = self._measure("reference", "clickhouse", senders, run_ids,
                               shape=reference.reference_shape(), limits=limits)
        result = msgspec.structs.replace(
            result, reference=kind, reference_table=table,
            run_ids=[run_id for sender in senders for run_id in sender.run_ids])
        return msgspec.structs.replace(result, count_back=_count_back(store, result, table))

    def _with_ratios(self, result: WorkloadResult) -> WorkloadResult:
        """An ingest result with its figures over the baseline's with the same K, and its rate
        over both references (the schema reference's over the plain one)."""
        plain = next((r for r in self.references if r.reference == "plain-mergetree"), None)
        schema = next((r for r in self.references if r.reference == "schema"), None)
        if result.workload == "reference":
            if result.reference != "schema" or plain is None:
                return result
            return msgspec.structs.replace(
                result,
                points_per_s_ratio_to_plain_reference=ratio(
                    result.points_per_s, plain.points_per_s),
                stack_cpu_ratio_to_plain_reference=ratio(
                    result.stack_cpu_us_per_point, plain.clickhouse_cpu_us_per_point))
        result = msgspec.structs.replace(
            result,
            points_per_s_ratio_to_plain_reference=ratio(
                result.points_per_s, plain.points_per_s if plain else None),
            points_per_s_ratio_to_schema_reference=ratio(
                result.points_per_s, schema.points_per_s if schema else None),
            stack_cpu_ratio_to_plain_reference=ratio(
                result.stack_cpu_us_per_point,
                plain.clickhouse_cpu_us_per_point if plain else None),
            stack_cpu_ratio_to_schema_reference=ratio(
                result.stack_cpu_us_per_point,
                schema.clickhouse_cpu_us_per_point if schema else None),
        )
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
        workload: Workload,
        transport: Transport,
        senders: Sequence[Sender[bytes]],
        run_ids: Sequence[str],
        *,
        shape: BatchShape | None = None,
        limits: Limits | None = None,
        flush_url: str | None = None,
        profiler: StageProfiler | None = None,
        in_flight: int = 1,
    ) -> WorkloadResult:
        """`senders`: `in_flight` consecutive ones per writer, sharing the writer's run and
        numbering its batches between them."""
        shape = shape or self.shape

        def batch_of(slot: int, seq: int) -> Batch:
            return make_batch(shape, run_ids[slot // in_flight],
                              seq * in_flight + slot % in_flight)

        counters_before = read_flush_counters(flush_url) if flush_url else None
        probe = UsageProbe(self.target.watched)
        breakdown, why_not = None, None
        if profiler is not None:
            profiler.start()
        try:
            run = run_writers(senders, batch_of, limits or self.limits,
                              request_timeout_s=self.settings.request_timeout_s)
            if profiler is not None:
                breakdown, why_not = profiler.finish(run.acked_points, run.elapsed_s)
        finally:
            if profiler is not None:
                profiler.stop()
        usage, own_cpu_s, busy_share = probe.finish()
        counters_after = read_flush_counters(flush_url) if flush_url else None
        if why_not is not None:
            self.breakdown_problems.append(f"breakdown {transport}: {why_not}")
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
        direct = workload in ("baseline", "reference")  # straight into ClickHouse
        server = _process_usage(usage.get("server"), elapsed_s)
        clickhouse = _process_usage(usage.get("clickhouse"), elapsed_s)
        postgres = _process_usage(usage.get("postgres"), elapsed_s)
        generator = ProcessUsage(
            cpu_s=round(own_cpu_s, 3),
            cpu_share=round(own_cpu_s / elapsed_s, 3) if elapsed_s > 0 else 0.0,
            peak_rss_bytes=None,
            peak_rss_since_start=True,
        )
        # chdb (the embedded default, after the server stopped) inserts inside this process.
        in_process_clickhouse = direct and self.target.store is None
        points = run.acked_points
        flushes: FlushStats | None = flush_stats(counters_before, counters_after, elapsed_s)
        by_kind = clickhouse.cpu_s_by_thread_kind if clickhouse is not None else None
        # INSERTs ClickHouse ran: one per acknowledged batch when direct, the server's flushes.
        inserts = sum(t.acked_batches for t in run.tallies) if direct else (
            flushes.flushes if flushes is not None else 0)
        return WorkloadResult(
            workload=workload,
            transport=transport,
            writers=len(senders) // in_flight,
            in_flight=in_flight,
            batch_points=shape.points_per_batch,
            duration_s=(limits or self.limits).duration_s,
            elapsed_s=round(elapsed_s, 3),
            requests=requests,
            acked_batches=sum(t.acked_batches for t in run.tallies),
            acked_points=points,
            unresolved_points=run.unresolved_points,
            points_per_s=round(points / elapsed_s, 1) if elapsed_s > 0 else 0.0,
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
            server=server,
            clickhouse=clickhouse,
            postgres=postgres,
            # The baseline and the references bypass the server: their "stack" is ClickHouse.
            server_cpu_us_per_point=None if direct else cpu_us_per_point(points, server),
            stack_cpu_us_per_point=(cpu_us_per_point(points, clickhouse) if direct else
                                    cpu_us_per_point(points, server, clickhouse, postgres)),
            clickhouse_cpu_us_per_point=cpu_us_per_point(
                points, generator if in_process_clickhouse else clickhouse),
            postgres_cpu_us_per_point=None if direct else cpu_us_per_point(points, postgres),
            clickhouse_insert_cpu_us_per_point=(
                round(by_kind.get("queries", 0.0) * 1e6 / points, 3)
                if by_kind is not None and points else None),
            clickhouse_merge_cpu_us_per_point=(
                round(by_kind.get("background", 0.0) * 1e6 / points, 3)
                if by_kind is not None and points else None),
            clickhouse_insert_cpu_ms_per_insert=(
                round(by_kind.get("queries", 0.0) * 1e3 / inserts, 2)
                if by_kind is not None and inserts else None),
            generator=generator,
            machine_busy_share=round(busy_share, 3),
            wire_form=_WIRE_FORMS.get(transport),
            flushes=flushes,
            breakdown=breakdown,
        )

    # --- the report ---------------------------------------------------------------------------

    def _report(self, started_at: str) -> Report:
        problems: list[str] = [*self.query_problems, *self.breakdown_problems]
        everything = [*self.baseline, *self.ingest, *self.overload, *self.breakdown,
                      *self.references]
        for result in everything:
            label = f"{result.workload} {result.reference or result.transport} K={result.writers}"
            if result.count_back is not None and not result.count_back.exactly_once:
                c = result.count_back
                problems.append(
                    f"{label}: {c.stored_distinct_points} distinct points stored for"
                    f" {c.acknowledged_points} acknowledged ({c.unresolved_points} unresolved)")
            # A reference may run out of its INSERT budget before its time: that is its bound.
            normal = NORMAL_STOPS | ({"max_batches"} if result.workload == "reference" else set())
            early = {k: v for k, v in result.stopped_by.items() if k not in normal}
            if early:
                kinds = ", ".join(f"{k} x{v}" for k, v in sorted(early.items()))
                problems.append(f"{label}: writers stopped early: {kinds}")
            if result.accepted_mismatches:
                problems.append(f"{label}: {result.accepted_mismatches} batches acknowledged"
                                " with another point count than sent")
            ran_its_course = result.elapsed_s >= 0.5 * result.duration_s
            # chdb inserts run inside the bench process: there its CPU is ClickHouse's.
            in_process_store = result.workload in ("baseline", "reference") \
                and self.target.store is None
            if ran_its_course and not in_process_store and result.generator.cpu_share > 0.8:
                self.notes.append(
                    f"{label}: the load generator used {result.generator.cpu_share:.0%} of a"
                    " core; it may have limited the rate")
        counted = [r.count_back for r in everything if r.count_back]
        if self.sdk is not None and self.sdk.stored_points is not None \
                and self.sdk.stored_points != self.sdk.log_calls:
            problems.append(f"sdk: {self.sdk.stored_points} points stored for"
                            f" {self.sdk.log_calls} log() calls")
        for variant in self.sdk.throughput if self.sdk is not None else ():
            if variant.stored_points not in (None, variant.points):
                problems.append(f"sdk throughput ({variant.transport}, {variant.in_flight} in"
                                f" flight): {variant.stored_points} points stored of"
                                f" {variant.points}")
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
                breakdown_writers=(self.settings.breakdown_writers
                                   if "breakdown" in self.settings.workloads else None),
                sample_rate_hz=(self.settings.sample_rate_hz
                                if "breakdown" in self.settings.workloads else None),
                reference_writers=reference.WRITERS if self.references else None,
                reference_rows_per_insert=(reference.ROWS_PER_INSERT if self.references
                                           else None),
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
            references=self.references,
            breakdown=self.breakdown,
        )

