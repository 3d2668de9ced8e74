"""Write use-cases: projects, run lifecycle, and metric batch ingest.

Owns the order of a batch's journey, which is what makes "acknowledged = stored exactly once"
true:

    validate + flatten points into columns (400/413 before anything is touched)
    assign row versions                    (first_version + i, kept in the ledger row)
    reserve write-path capacity            (all or none; 429 when full, or after a bounded
                                           wait for room; nothing touched yet)
    PostgreSQL, one transaction:           run is running · ledger claim (new | retry |
                                           duplicate | 409 conflict) · cardinality · params · tags
    a 'pending' resend: does storage hold its rows already?  (yes -> the answer is duplicate)
    submit to the write path               (cannot fail: capacity was reserved)
    await durability                       (group commit; 503 commit_timeout when too slow)
    answer 200                             (the write path marks the ledger row committed)

Why this order: the ledger claim comes before any metric write, so a batch id reused with a
different payload is refused before it can touch stored data. A claim left 'pending' (a crash,
a timeout, a ledger mark that did not land) does not block the client's retry: the retry asks
the write path whether every row of the batch (known by its versions) is stored: if so the
answer is a duplicate. Either way the same rows are written again — ClickHouse's views are not
atomic with an insert, so a first attempt cut short may have reached `metrics` but not the
summaries — which is harmless because ClickHouse keeps one row per (run, metric, step), the
highest version, and every query deduplicates.
Concurrent copies of one batch inside this process wait for the first instead of writing
again, so 50 simultaneous submissions write once.

The answer bound: one deadline, `IngestTimeouts.answer_s` (9.5 s, under the README's 10 s),
covers the whole request on the server's clock — waiting for a concurrent copy, PostgreSQL, the
storage check and the commit — and each step gets what is left of it.

Semantics decided here (documented in the README):
- NaN and ±Infinity are dropped point by point with a `non_finite_value` warning: they cannot
  be carried by JSON, and one of them would poison min/max summaries.
- A batch without `batch_id` is stored but not deduplicated (warning `not_deduplicated`).
- Missing timestamps are filled with the server's clock at admission.

Access: every use-case checks the key's scope, and a project-scoped key may only touch its own
project (`Principal.require_project`; for calls naming a run, `RunAccess` finds the run's
project, cached, so a scoped key costs one lookup per run and process). Global keys skip that.

The HTTP and gRPC edges both call `Ingest`; neither holds any of this logic. It reaches storage
only through the ports (`RunMetadata`, `WritePath`). Must not import the edges, storage,
pipelines, hypercorn or purerpc.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import anyio

from mlrun.server.errors import BackendTimeout, InvalidInput, MlrunError, PayloadTooLarge
from mlrun.server.ports.keys import Principal
from mlrun.server.ports.run_metadata import CardinalityLimits, RunMetadata
from mlrun.server.ports.write_path import (
    EMPTY_COLUMNS,
    BatchIdentity,
    BatchWrite,
    PointColumns,
    WritePath,
)
from mlrun.server.usecases.access import RunAccess
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.schemas import (
    MAX_NAME_BYTES,
    MAX_POINTS_PER_BATCH,
    CreateProject,
    FinalStatus,
    IngestBatch,
    IngestResult,
    IngestWarning,
    InitRun,
    MetricPoint,
    MetricSeries,
    Project,
    RunCreated,
    RunState,
    json_encoder,
)

logger = logging.getLogger("mlrun.ingest")


@dataclass(frozen=True, slots=True)
class IngestTimeouts:
    """Deadlines of one ingest request. `answer_s` bounds the whole request (the README promises
    an answer within 10 s); the others bound single steps inside it. `metadata_s` is the
    metadata store's own per-call deadline (set where it is built)."""

    answer_s: float = 9.5
    metadata_s: float = 3.0
    commit_s: float = 5.0
    holds_s: float = 1.5
    # The longest a request waits for room in a write path that waits (queued mode's XADD
    # buffer, full only while the server is short of CPU); never past what leaves the
    # PostgreSQL step and the commit their own deadlines.
    room_s: float = 1.5


class VersionClock:
    """Monotonic row versions: wall-clock nanoseconds, never repeating within this process, so
    the last write of a (run, metric, step) wins across requests and across restarts."""

    def __init__(self) -> None:
        self._last = 0

    def reserve(self, count: int) -> int:
        base = max(time.time_ns(), self._last + 1)
        self._last = base + count
        return base


@dataclass(slots=True)
class _Columns:
    """Points being gathered into columns (versions are added once the count is known)."""

    names: list[str]
    steps: list[int]
    values: list[float]
    timestamps_ms: list[int]

    def __len__(self) -> int:
        return len(self.steps)

    def with_versions(self, first_version: int) -> PointColumns:
        return PointColumns(names=self.names, steps=self.steps, values=self.values,
                            timestamps_ms=self.timestamps_ms,
                            versions=range(first_version, first_version + len(self.steps)))


def gather_columns(points: Sequence[MetricPoint], series: Sequence[MetricSeries], *,
                   field: str, now_ms: int, warnings: list[IngestWarning]) -> _Columns:
    """Row points, then columnar `series`, as columns; non-finite values dropped with a warning
    and missing timestamps filled with `now_ms`.

    The per-point work is list comprehensions and C-level extends (no Python call per point):
    it runs for every point the server ingests."""
    columns = _Columns([p.name for p in points], [p.step for p in points],
                       [p.value for p in points],
                       [now_ms if p.timestamp is None else p.timestamp for p in points])
    _check_name_bytes(columns.names, lambda i: f"{field}[{i}].name")
    for index, one in enumerate(series):
        count = len(one.steps)
        if len(one.values) != count:
            raise InvalidInput(
                f"series[{index}] has {count} steps but {len(one.values)} values",
                code=ErrorCode.SERIES_LENGTH_MISMATCH,
                field=f"series[{index}].values",
            )
        if one.timestamps is not None and len(one.timestamps) != count:
            raise InvalidInput(
                f"series[{index}] has {count} steps but {len(one.timestamps)} timestamps",
                code=ErrorCode.SERIES_LENGTH_MISMATCH,
                field=f"series[{index}].timestamps",
            )
        columns.names.extend([one.name] * count)
        columns.steps.extend(one.steps)
        columns.values.extend(one.values)
        columns.timestamps_ms.extend(one.timestamps if one.timestamps is not None
                                     else [now_ms] * count)
    _check_name_bytes([one.name for one in series], lambda i: f"series[{i}].name")
    return _drop_non_finite(columns, field=field, warnings=warnings)


def _check_name_bytes(names: Sequence[str], field_of: Callable[[int], str]) -> None:
    """The wire schema caps names in characters; storage in UTF-8 bytes. A name of at most
    MAX_NAME_BYTES / 4 characters always fits, so only longer distinct names are encoded; the
    error names the first offending field."""
    long_names = {name for name in set(names) if len(name) > MAX_NAME_BYTES // 4
                  and len(name.encode()) > MAX_NAME_BYTES}
    if long_names:
        index = next(i for i, name in enumerate(names) if name in long_names)
        raise InvalidInput(f"{field_of(index)} is longer than {MAX_NAME_BYTES} bytes (UTF-8)",
                           code=ErrorCode.VALUE_TOO_LONG, field=field_of(index))


def _all_finite(values: list[float]) -> bool:
    """One C-level pass: the exact sum of finite values is finite (NaN or ±inf make it NaN or
    inf); only a sum too large for a float needs the slow check."""
    try:
        return math.isfinite(math.fsum(values))
    except OverflowError:
        return all(math.isfinite(v) for v in values)


def _drop_non_finite(columns: _Columns, *, field: str,
                     warnings: list[IngestWarning]) -> _Columns:
    if _all_finite(columns.values):
        return columns
    isfinite = math.isfinite
    keep = [i for i, v in enumerate(columns.values) if isfinite(v)]
    dropped = len(columns) - len(keep)
    warnings.append(IngestWarning(
        code=ErrorCode.NON_FINITE_VALUE, field=field, dropped=dropped,
        message=f"{dropped} NaN or infinite values were dropped"))
    return _Columns([columns.names[i] for i in keep], [columns.steps[i] for i in keep],
                    [columns.values[i] for i in keep], [columns.timestamps_ms[i] for i in keep])


def only_names(columns: PointColumns, admitted: frozenset[str]) -> PointColumns:
    """The points whose name is admitted, each keeping its version."""
    if all(name in admitted for name in set(columns.names)):
        return columns
    keep = [i for i, name in enumerate(columns.names) if name in admitted]
    return PointColumns(names=[columns.names[i] for i in keep],
                        steps=[columns.steps[i] for i in keep],
                        values=[columns.values[i] for i in keep],
                        timestamps_ms=[columns.timestamps_ms[i] for i in keep],
                        versions=[columns.versions[i] for i in keep])


def payload_hash(batch: IngestBatch) -> bytes:
    """Hash of the canonical encoding of the whole payload, timestamps included (the Struct
    fixes field order, so the same batch hashes the same from HTTP and gRPC)."""
    return hashlib.sha256(json_encoder.encode(batch)).digest()


class Ingest:
    def __init__(
        self,
        metadata: RunMetadata,
        *,
        write_path: WritePath,
        cardinality: CardinalityLimits,
        timeouts: IngestTimeouts = IngestTimeouts(),
        on_runs_created: Callable[[int], None] | None = None,
    ) -> None:
        self._metadata = metadata
        self._on_runs_created = on_runs_created
        self._write_path = write_path
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

    async def log_batch(self, principal: Principal, batch: IngestBatch, *,
                        tags_after_finish: bool = False) -> IngestResult:
        """`tags_after_finish`: a batch of only tags may also land on a finished run."""
        deadline = anyio.current_time() + self._timeouts.answer_s
        principal.require("write")
        await self._run_access.require(principal, batch.run_id)
        key = (batch.run_id, batch.batch_id) if batch.batch_id is not None else None
        if key is not None and (inflight := self._inflight.get(key)) is not None:
            # The same batch is being written by another request of this process: wait for
            # it (leaving time for our own ledger look-up), then the ledger answers
            # "duplicate" (or "retry" if it failed).
            with anyio.move_on_after(_left(deadline) - self._timeouts.metadata_s):
                await inflight.wait()
        if key is None:
            return await self._log_batch(batch, deadline, tags_after_finish)
        done = anyio.Event()
        self._inflight.setdefault(key, done)
        try:
            return await self._log_batch(batch, deadline, tags_after_finish)
        finally:
            if self._inflight.get(key) is done:
                del self._inflight[key]
            done.set()

    async def _log_batch(self, batch: IngestBatch, deadline: float,
                         tags_after_finish: bool) -> IngestResult:
        warnings: list[IngestWarning] = []
        now_ms = time.time_ns() // 1_000_000
        metric_columns = gather_columns(batch.metrics, batch.series, field="metrics",
                                        now_ms=now_ms, warnings=warnings)
        system_columns = gather_columns(batch.system_metrics, (), field="system_metrics",
                                        now_ms=now_ms, warnings=warnings)
        total = len(metric_columns) + len(system_columns)
        if total > MAX_POINTS_PER_BATCH:
            raise PayloadTooLarge(
                f"a batch carries at most {MAX_POINTS_PER_BATCH} points (got {total})",
                code=ErrorCode.TOO_MANY_POINTS, field="metrics")

        first_version = self._versions.reserve(total)
        # A write path may make us wait for room (bounded: see IngestTimeouts.room_s).
        reservation = await self._write_path.reserve(
            batch.run_id, metric_columns.with_versions(first_version),
            system_columns.with_versions(first_version + len(metric_columns)),
            wait_s=min(self._timeouts.room_s,
                       _left(deadline) - self._timeouts.metadata_s - self._timeouts.commit_s))
        submitted = False
        try:
            with _answer_deadline(deadline, "postgres"):
                preparation = await self._metadata.prepare_batch(
                    run_id=batch.run_id,
                    batch_id=batch.batch_id,
                    payload_hash=payload_hash(batch),
                    seq=batch.seq,
                    points=total,
                    first_version=first_version,
                    metric_names=set(metric_columns.names),
                    params=batch.params,
                    tags=batch.tags,
                    limits=self._cardinality,
                    tags_after_finish=tags_after_finish,
                )
            warnings.extend(preparation.warnings)
            if preparation.outcome == "duplicate" or (
                    preparation.outcome == "retry" and batch.batch_id is not None
                    and self._write_path.committed_unmarked(batch.run_id, batch.batch_id)):
                # The second case: a resend that overtook its own ledger mark (written after
                # the answer, by this process); rewriting would only waste a write.
                return IngestResult(accepted=0, duplicate=True, warnings=warnings)
            first_version = preparation.first_version
            write = BatchWrite(
                identity=BatchIdentity(batch.run_id, batch.batch_id, first_version),
                metrics=only_names(metric_columns.with_versions(first_version),
                                   preparation.admitted_metric_names),
                system_metrics=(system_columns.with_versions(first_version + len(metric_columns))
                                if len(system_columns) else EMPTY_COLUMNS),
            )
            stored_before = (preparation.outcome == "retry"
                             and await self._stored_before(write, deadline))
            # A pending batch is written again even when its rows are all there: ClickHouse's
            # materialized views are not atomic with the insert, so a first attempt cut short
            # by a crash may have reached `metrics` but not the summaries or block rollups. The
            # same rows (same versions) again repair those and change no read.
            durability = reservation.submit_nowait(write)
            submitted = True
        finally:
            if not submitted:  # failed, or answered "duplicate", before handing the rows over
                reservation.release()
        await durability.wait(min(self._timeouts.commit_s, _left(deadline)))
        if stored_before:  # acknowledged before (or committed unseen): a duplicate, as promised
            return IngestResult(accepted=0, duplicate=True, warnings=warnings)
        return IngestResult(accepted=write.rows, duplicate=False, warnings=warnings)

    async def _stored_before(self, write: BatchWrite, deadline: float) -> bool:
        """Whether storage holds every row of a resent batch whose ledger row is still pending
        (its first attempt committed, the ledger mark did not land). False when the check
        itself fails: the batch is written again either way, only the answer depends on it."""
        try:
            with anyio.fail_after(min(self._timeouts.holds_s, _left(deadline))):
                return await self._write_path.holds(write, timeout_s=self._timeouts.holds_s)
        except (MlrunError, TimeoutError) as exc:
            logger.warning("could not check whether batch %s of run %s is stored (%s)",
                           write.identity.batch_id, write.identity.run_id,
                           getattr(exc, "code", "timeout"))
            return False


def _left(deadline: float) -> float:
    return max(deadline - anyio.current_time(), 0.0)


@contextmanager
def _answer_deadline(deadline: float, backend: str) -> Iterator[None]:
    """Cancels the step at the request's answer deadline and reports it as a retryable
    `backend_timeout` naming the backend that was being waited for."""
    try:
        with anyio.fail_after(_left(deadline)):
            yield
    except TimeoutError as exc:
        raise BackendTimeout(f"{backend} did not answer in time; retry with the same batch_id",
                             backend=backend) from exc
