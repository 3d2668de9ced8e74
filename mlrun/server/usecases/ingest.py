"""Write use-cases: projects, run lifecycle, and metric batch ingest.

Owns the order of a batch's journey, which is what makes "acknowledged = stored exactly once"
true:

    validate + flatten points          (400/413 before anything is touched)
    reserve capacity in every sink     (all or none; 429 when full; nothing touched yet)
    PostgreSQL, one transaction:       run is running · ledger claim (new | retry | duplicate |
                                       409 conflict) · cardinality · params · tags
    encode rows, submit to pipelines   (cannot fail: capacity was reserved)
    await the flushes that carry them  (group commit; 503 commit_timeout when too slow)
    mark the ledger row committed      (best effort: the data is already durable)
    answer 200

Why this order: the ledger claim comes before any metric write, so a batch id reused with a
different payload is refused before it can touch stored data. A claim left 'pending' by a crash
or a timeout does not block the client's retry: the retry writes again, which is harmless
because ClickHouse keeps one row per (run, metric, step) — the highest version — and every query
deduplicates. Concurrent copies of one batch inside this process wait for the first instead of
writing again, so 50 simultaneous submissions write once.

Semantics decided here (documented in the README):
- NaN and ±Infinity are dropped point by point with a `non_finite_value` warning: they cannot
  be carried by JSON, and one of them would poison min/max summaries.
- A batch without `batch_id` is stored but not deduplicated (warning `not_deduplicated`).
- Missing timestamps are filled with the server's clock at admission.

Access: every use-case checks the key's scope, and a project-scoped key may only touch its own
project (`Principal.require_project`; for calls naming a run, `auth.RunAccess` finds the run's
project, cached, so a scoped key costs one lookup per run and process). Global keys skip that.

The HTTP and gRPC edges both call `Ingest`; neither holds any of this logic.
Must not import the edges, hypercorn or purerpc.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from mlrun.server.errors import InvalidInput, MlrunError, PayloadTooLarge
from mlrun.server.pipelines.group_commit import Pipeline, Ticket, reserve_all
from mlrun.server.protocols.clickhouse import encode_metric_rows
from mlrun.server.runtime.config import CardinalityConfig
from mlrun.server.storage.postgres.metadata import MetadataStore
from mlrun.server.usecases.auth import Principal, RunAccess
from mlrun.wire.schemas import (
    MAX_POINTS_PER_BATCH,
    CreateProject,
    FinalStatus,
    IngestBatch,
    IngestResult,
    IngestWarning,
    InitRun,
    MetricPoint,
    Project,
    RunCreated,
    RunState,
    json_encoder,
)

logger = logging.getLogger("mlrun.ingest")

# (name, step, value, timestamp_ms or None)
Point = tuple[str, int, float, int | None]

# RowBinary size of one metric row beyond its two strings: 4 x 8-byte numbers + 2 length bytes.
_ROW_OVERHEAD_BYTES = 34


@dataclass(frozen=True, slots=True)
class IngestTimeouts:
    """Deadlines of one ingest request; their sum bounds the time to an answer (< 10 s).
    `metadata_s` is the MetadataStore's own per-call deadline (set where it is built)."""

    metadata_s: float = 3.0
    commit_s: float = 5.0
    mark_committed_s: float = 1.5


class VersionClock:
    """Monotonic row versions: wall-clock nanoseconds, never repeating within this process, so
    the last write of a (run, metric, step) wins across requests and across restarts."""

    def __init__(self) -> None:
        self._last = 0

    def reserve(self, count: int) -> int:
        base = max(time.time_ns(), self._last + 1)
        self._last = base + count
        return base


def flatten_points(points: Sequence[MetricPoint], batch: IngestBatch | None = None
                   ) -> list[Point]:
    """Row points plus, when `batch` is given, its columnar `series`, as one list."""
    flat: list[Point] = [(p.name, p.step, p.value, p.timestamp) for p in points]
    if batch is not None:
        for index, series in enumerate(batch.series):
            count = len(series.steps)
            if len(series.values) != count:
                raise InvalidInput(
                    f"series[{index}] has {count} steps but {len(series.values)} values",
                    code="series_length_mismatch",
                    field=f"series[{index}].values",
                )
            if series.timestamps is not None and len(series.timestamps) != count:
                raise InvalidInput(
                    f"series[{index}] has {count} steps but {len(series.timestamps)} timestamps",
                    code="series_length_mismatch",
                    field=f"series[{index}].timestamps",
                )
            timestamps: list[int | None] = (
                list(series.timestamps) if series.timestamps is not None else [None] * count
            )
            flat.extend(zip([series.name] * count, series.steps, series.values, timestamps,
                            strict=True))
    return flat


def drop_non_finite(points: list[Point], *, field: str,
                    warnings: list[IngestWarning]) -> list[Point]:
    finite = [p for p in points if math.isfinite(p[2])]
    dropped = len(points) - len(finite)
    if dropped:
        warnings.append(IngestWarning(
            code="non_finite_value", field=field, dropped=dropped,
            message=f"{dropped} NaN or infinite values were dropped"))
    return finite


def payload_hash(batch: IngestBatch) -> bytes:
    """Hash of the canonical encoding of the whole payload, timestamps included (the Struct
    fixes field order, so the same batch hashes the same from HTTP and gRPC)."""
    return hashlib.sha256(json_encoder.encode(batch)).digest()


class Ingest:
    def __init__(
        self,
        metadata: MetadataStore,
        *,
        metrics: Pipeline,
        system_metrics: Pipeline,
        cardinality: CardinalityConfig,
        timeouts: IngestTimeouts = IngestTimeouts(),
        on_runs_created: Callable[[int], None] | None = None,
    ) -> None:
        self._metadata = metadata
        self._on_runs_created = on_runs_created
        self._metrics = metrics
        self._system_metrics = system_metrics
        self._cardinality = cardinality
        self._timeouts = timeouts
        self._versions = VersionClock()
        self._inflight: dict[tuple[str, str], anyio.Event] = {}
        self._run_access = RunAccess(metadata.run_project)

    # --- projects and runs --------------------------------------------------------------------

    async def create_project(self, principal: Principal, request: CreateProject) -> Project:
        principal.require("write")
        principal.require_project(request.name)
        return await self._metadata.create_project(request.name, request.description)

    async def list_projects(self, principal: Principal) -> list[Project]:
        principal.require("read")
        projects = await self._metadata.list_projects()
        if principal.project is not None:
            projects = [p for p in projects if p.name == principal.project]
        return projects

    async def init_run(
        self, principal: Principal, request: InitRun
    ) -> tuple[RunCreated, list[IngestWarning]]:
        principal.require("write")
        principal.require_project(request.project)
        created, warnings = await self._metadata.init_run(request, limits=self._cardinality)
        if created.created and self._on_runs_created is not None:
            self._on_runs_created(1)
        return created, warnings

    async def finish_run(self, principal: Principal, run_id: str, status: FinalStatus) -> RunState:
        principal.require("write")
        await self._run_access.require(principal, run_id)
        return await self._metadata.finish_run(run_id, status)

    async def heartbeat(self, principal: Principal, run_id: str) -> RunState:
        principal.require("write")
        await self._run_access.require(principal, run_id)
        return await self._metadata.heartbeat(run_id)

    # --- batches ------------------------------------------------------------------------------

    async def log_batch(self, principal: Principal, batch: IngestBatch) -> IngestResult:
        principal.require("write")
        await self._run_access.require(principal, batch.run_id)
        key = (batch.run_id, batch.batch_id) if batch.batch_id is not None else None
        if key is not None and (inflight := self._inflight.get(key)) is not None:
            # The same batch is being written by another request of this process: wait for
            # it, then the ledger answers "duplicate" (or "retry" if it failed).
            with anyio.move_on_after(self._timeouts.commit_s + self._timeouts.metadata_s):
                await inflight.wait()
        if key is None:
            return await self._log_batch(batch)
        done = anyio.Event()
        self._inflight.setdefault(key, done)
        try:
            return await self._log_batch(batch)
        finally:
            if self._inflight.get(key) is done:
                del self._inflight[key]
            done.set()

    async def _log_batch(self, batch: IngestBatch) -> IngestResult:
        warnings: list[IngestWarning] = []
        metric_points = drop_non_finite(
            flatten_points(batch.metrics, batch), field="metrics",
            warnings=warnings)
        system_points = drop_non_finite(
            flatten_points(batch.system_metrics),
            field="system_metrics", warnings=warnings)
        total = len(metric_points) + len(system_points)
        if total > MAX_POINTS_PER_BATCH:
            raise PayloadTooLarge(
                f"a batch carries at most {MAX_POINTS_PER_BATCH} points (got {total})",
                code="too_many_points", field="metrics")

        run_id_bytes = len(batch.run_id.encode())
        work = [
            (pipeline, points)
            for pipeline, points in ((self._metrics, metric_points),
                                     (self._system_metrics, system_points))
            if points
        ]
        reservations = reserve_all(
            [(pipeline, len(points), _estimate_bytes(points, run_id_bytes))
             for pipeline, points in work]
        )
        tickets: list[Ticket] = []
        stored = 0
        handed_over = 0  # reservations submitted or released so far, in order
        try:
            preparation = await self._metadata.prepare_batch(
                run_id=batch.run_id,
                batch_id=batch.batch_id,
                payload_hash=payload_hash(batch),
                seq=batch.seq,
                points=total,
                metric_names={p[0] for p in metric_points},
                params=batch.params,
                tags=batch.tags,
                limits=self._cardinality,
            )
            warnings.extend(preparation.warnings)
            if preparation.outcome == "duplicate":
                return IngestResult(accepted=0, duplicate=True, warnings=warnings)
            admitted = preparation.admitted_metric_names
            for (pipeline, points), reservation in zip(work, reservations, strict=True):
                if pipeline is self._metrics:
                    points = [p for p in points if p[0] in admitted]
                if points:
                    tickets.append(pipeline.submit_nowait(
                        reservation, self._encode(batch.run_id, points), len(points)))
                    stored += len(points)
                else:
                    reservation.release()
                handed_over += 1
        finally:
            # Failed (or answered "duplicate") before every reservation was handed over.
            for reservation in reservations[handed_over:]:
                reservation.release()
        for ticket in tickets:
            await ticket.wait(self._timeouts.commit_s)
        if batch.batch_id is not None:
            await self._mark_committed(batch.run_id, batch.batch_id)
        return IngestResult(accepted=stored, duplicate=False, warnings=warnings)

    def _encode(self, run_id: str, points: list[Point]) -> bytes:
        now_ms = time.time_ns() // 1_000_000
        version = self._versions.reserve(len(points))
        return encode_metric_rows(
            (run_id, name, step, value, now_ms if ts is None else ts, version + i)
            for i, (name, step, value, ts) in enumerate(points)
        )

    async def _mark_committed(self, run_id: str, batch_id: str) -> None:
        try:
            with anyio.fail_after(self._timeouts.mark_committed_s):
                await self._metadata.mark_batch_committed(run_id, batch_id)
        except (MlrunError, TimeoutError) as exc:
            # The points are durable already; a retry of this batch will write them again,
            # which storage deduplicates. Not worth failing the request for.
            logger.warning("could not mark batch %s of run %s committed: %s", batch_id, run_id,
                           getattr(exc, "code", "timeout"))


def _estimate_bytes(points: list[Point], run_id_bytes: int) -> int:
    return sum(len(p[0]) for p in points) * 4 + len(points) * (run_id_bytes + _ROW_OVERHEAD_BYTES)
