"""Read use-cases: run listing and search, run detail, metric and system-metric series, run
comparison. Shared by the HTTP and gRPC edges, which only translate.

Owns (the listing grammar itself is `usecases.listing`):
- authorization of reads: the `read` scope; a project-scoped key reads only its project (a
  listing without `project` is limited to it; another project's run is 404 `run_not_found`);
- the orchestration of a series read (how the `MetricReads` port and `domain.downsampling` meet):

      run exists and is readable (PostgreSQL)  ┐
      series names of the run                  ├ at once
      stats per series (rows, key bounds, duplicates?), when the names are given ┘
      ├─ raw: a page of points after the cursor's key            one query (+1 row: more?)
      ├─ rows <= budget: every point                             one query
      └─ rows > budget: bucket statistics under a plan           one query for all series
         └─ final selection in Python (LTTB / minmax / avg)      no I/O
  Deduplication (last write wins per key) is skipped only for series proven free of
  duplicates by `MetricReads.stats`. A comparison is the same read over runs x metrics;
  with `relative_time` the timestamps are shifted by each run's start (`created_at`);
- sorting by a metric's last value, which spans both stores: the matching run ids come from
  PostgreSQL (at most `MAX_METRIC_SORT_RUNS`), their last values from the ClickHouse summary,
  the order and the keyset cursor (value, run_id; runs without the metric last) are applied
  here, and the page's rows are read back from PostgreSQL.

Must not import the HTTP or gRPC edges, hypercorn, purerpc or storage: it reads through the
`RunReads` and `MetricReads` ports.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from mlrun.server.concurrently import both
from mlrun.server.domain.downsampling import (
    BlockPlan,
    BucketPlan,
    Method,
    RunsCursor,
    Sample,
    SeriesCursor,
    decode_cursor,
    encode_cursor,
    plan_block_buckets,
    plan_buckets,
    select_avg,
    select_lttb,
    select_lttb_columns,
    select_minmax,
)
from mlrun.server.errors import InvalidInput, NotFound
from mlrun.server.ports.keys import Principal
from mlrun.server.ports.metric_reads import (
    BLOCK_STEPS,
    METRICS,
    SYSTEM_METRICS,
    BucketRequest,
    Columns,
    KeyRange,
    MetricReads,
    SeriesRef,
    SeriesStats,
    SeriesTable,
    whole_series_stats,
)
from mlrun.server.ports.run_reads import (
    Keyset,
    KeysetValue,
    RunFilter,
    RunReads,
    RunRecord,
    RunSort,
    SortColumn,
)
from mlrun.server.usecases.listing import (
    RunListing,
    check_text,
    invalid_field,
    split_list,
    unescape,
)
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.query_schemas import (
    DEFAULT_MAX_POINTS,
    DEFAULT_RAW_PAGE_POINTS,
    MAX_NAMES_PER_QUERY,
    MAX_SERIES_POINTS,
    ComparedRun,
    CompareResult,
    CompareRuns,
    DownsampleMethod,
    MetricsResult,
    MetricSummary,
    RunDetail,
    RunPage,
    RunSummary,
    Series,
    SeriesLayout,
    SeriesPoint,
)
from mlrun.wire.schemas import RunStatus
from mlrun.wire.timestamps import iso_utc

# Sorting by a metric orders the matching runs in this process: beyond this many, narrow the
# filter (400 `too_many_runs`).
MAX_METRIC_SORT_RUNS = 50_000
# Series per comparison (runs x metrics), and metrics compared when none are named.
MAX_COMPARE_SERIES = 1000
DEFAULT_COMPARE_METRICS = 20


# --------------------------------------------------------------------------- grammar


@dataclass(frozen=True, slots=True)
class SeriesRequest:
    """A series read, parsed: what both edges hand to `Queries.series`."""

    system: bool
    names: tuple[str, ...]
    max_points: int | None
    start: int | None
    end: int | None
    method: DownsampleMethod
    cursor: str | None
    layout: SeriesLayout = "points"


def parse_names(text: str | None, *, field: str = "names") -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(dict.fromkeys(unescape(item) for item in split_list(text, field=field)))


# --------------------------------------------------------------------------- rendering



def epoch_ms(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _duration_s(record: RunRecord) -> float | None:
    if record.finished_at is None:
        return None
    return (record.finished_at - record.created_at).total_seconds()


def _summary(record: RunRecord) -> RunSummary:
    return RunSummary(
        run_id=record.run_id, project=record.project, name=record.name,
        status=cast(RunStatus, record.status), created_at=iso_utc(record.created_at),
        updated_at=iso_utc(record.updated_at),
        finished_at=iso_utc(record.finished_at) if record.finished_at else None,
        duration_s=_duration_s(record), tags=record.tags, params=record.params,
    )


def _sample_columns(table: SeriesTable, samples: Sequence[Sample],
                    shift_ms: int = 0) -> _SeriesColumns:
    """Selected samples as (steps, values, timestamps)."""
    keys, values, others = (list(map(operator.itemgetter(i), samples)) for i in range(3))
    return _stored_columns(table, keys, values, others, shift_ms)


def _stored_columns(table: SeriesTable, keys: list[int], values: list[float],
                    others: list[int], shift_ms: int = 0) -> _SeriesColumns:
    """A series' (key, value, other) columns as (steps, values, timestamps), timestamps
    shifted by `shift_ms` (relative-time comparisons). C-level passes only: a raw page holds
    up to 100k points."""
    if table is METRICS:
        if shift_ms:
            others = [o - shift_ms for o in others]
        return keys, values, others
    if shift_ms:
        keys = [k - shift_ms for k in keys]
    return others, values, keys


# --------------------------------------------------------------------------- use-cases

# A series' points as three columns: steps, values, timestamps.
_SeriesColumns = tuple[list[int], list[float], list[int]]


@dataclass(frozen=True, slots=True)
class _SeriesData:
    columns: _SeriesColumns
    total_points: int
    downsampled: bool
    next_cursor: str | None = None


_EMPTY = _SeriesData(columns=([], [], []), total_points=0, downsampled=False)


class Queries:
    """The read use-cases. Built once per process; both edges call it."""

    def __init__(self, runs: RunReads, metrics: MetricReads) -> None:
        self._runs = runs
        self._metrics = metrics

    # --- runs --------------------------------------------------------------------------------

    async def list_runs(self, principal: Principal, listing: RunListing) -> RunPage:
        principal.require("read")
        run_filter = listing.run_filter
        if run_filter.project is not None:
            principal.require_project(run_filter.project)
        elif principal.project is not None:
            # A project-scoped key sees its own project only.
            run_filter = dataclasses.replace(run_filter, project=principal.project)
        if listing.sort.column is None:
            return await self._list_by_metric(run_filter, listing)
        sort = RunSort(column=listing.sort.column, descending=listing.sort.descending)
        after = None
        if listing.cursor is not None:
            position = decode_cursor(listing.cursor, RunsCursor)
            if position.sort != listing.sort.text:
                raise InvalidInput("the cursor belongs to another sort order",
                                   code=ErrorCode.INVALID_CURSOR, field="cursor")
            after = Keyset(value=_keyset_value(sort.column, position.value),
                           run_id=check_text(position.run_id, "cursor"))
        page = await self._runs.page(run_filter, sort, after=after, limit=listing.limit,
                                     include_total=listing.include_total)
        next_cursor = None
        if page.has_more and page.rows:
            last = page.rows[-1]
            next_cursor = encode_cursor(RunsCursor(
                sort=listing.sort.text,
                value=_cursor_value(last.sort_value(sort.column)),
                run_id=last.run_id,
            ))
        return RunPage(runs=[_summary(r) for r in page.rows], next_cursor=next_cursor,
                       total=page.total)

    async def _list_by_metric(self, run_filter: RunFilter, listing: RunListing) -> RunPage:
        metric = cast(str, listing.sort.metric)
        ids = await self._runs.matching_ids(run_filter, max_runs=MAX_METRIC_SORT_RUNS)
        if len(ids) > MAX_METRIC_SORT_RUNS:
            raise InvalidInput(
                f"sorting by a metric considers at most {MAX_METRIC_SORT_RUNS} runs;"
                " narrow the filter", code=ErrorCode.TOO_MANY_RUNS, field="sort")
        values = await self._metrics.last_values(metric, ids)
        descending = listing.sort.descending

        with_value = sorted((i for i in ids if i in values), key=lambda i: (values[i], i),
                            reverse=descending)
        without_value = sorted((i for i in ids if i not in values), reverse=descending)
        ordered = with_value + without_value
        start = 0
        if listing.cursor is not None:
            position = decode_cursor(listing.cursor, RunsCursor)
            if position.sort != listing.sort.text or not (
                    position.value is None or isinstance(position.value, int | float)):
                raise InvalidInput("the cursor belongs to another sort order",
                                   code=ErrorCode.INVALID_CURSOR, field="cursor")
            start = _position_after(ordered, values, position, descending)
        page_ids = ordered[start:start + listing.limit]
        records = await self._runs.by_ids(page_ids)
        rows = [records[i] for i in page_ids if i in records]
        next_cursor = None
        if start + listing.limit < len(ordered) and page_ids:
            last_id = page_ids[-1]
            next_cursor = encode_cursor(RunsCursor(
                sort=listing.sort.text, value=values.get(last_id), run_id=last_id))
        return RunPage(runs=[_summary(r) for r in rows], next_cursor=next_cursor,
                       total=len(ordered) if listing.include_total else None)

    async def get_run(self, principal: Principal, run_id: str) -> RunDetail:
        principal.require("read")
        record, summaries = await both(
            lambda: self._runs.detail(run_id),
            lambda: self._metrics.summaries([run_id]),
        )
        if record is None:
            raise NotFound(f"run {run_id!r} does not exist", code=ErrorCode.RUN_NOT_FOUND,
                           field="run_id")
        principal.require_run_visible(run_id, record.project)
        return RunDetail(
            run_id=record.run_id, project=record.project, name=record.name,
            status=cast(RunStatus, record.status), created_at=iso_utc(record.created_at),
            updated_at=iso_utc(record.updated_at),
            finished_at=iso_utc(record.finished_at) if record.finished_at else None,
            last_heartbeat_at=(iso_utc(record.last_heartbeat_at)
                               if record.last_heartbeat_at else None),
            duration_s=_duration_s(record), tags=record.tags, params=record.params,
            artifacts_count=record.artifacts_count,
            metrics_summary=[
                MetricSummary(name=s.name, last_value=s.last_value, last_step=s.last_step,
                              min=s.min_value, max=s.max_value, count=s.count)
                for s in summaries
            ],
        )

    async def _readable_runs(
        self, principal: Principal, run_ids: Sequence[str], *, field: str
    ) -> dict[str, RunRecord]:
        records = await self._runs.by_ids(run_ids, with_children=False)
        for index, run_id in enumerate(run_ids):
            record = records.get(run_id)
            if record is None:
                raise NotFound(f"run {run_id!r} does not exist", code=ErrorCode.RUN_NOT_FOUND,
                               field=field if len(run_ids) == 1 else f"{field}[{index}]")
            principal.require_run_visible(
                run_id, record.project, field=field if len(run_ids) == 1 else f"{field}[{index}]")
        return records

    # --- series ------------------------------------------------------------------------------

    async def series(self, principal: Principal, run_id: str,
                     request: SeriesRequest) -> MetricsResult:
        principal.require("read")
        table = SYSTEM_METRICS if request.system else METRICS
        start_field, end_field = ("start_ms", "end_ms") if request.system else \
            ("start_step", "end_step")
        for value, name in ((request.start, start_field), (request.end, end_field)):
            if value is not None and value < 0:
                raise invalid_field(name, "must not be negative")
        if request.start is not None and request.end is not None and request.start > request.end:
            raise invalid_field(start_field, f"must not exceed {end_field}")
        if request.max_points is not None and not 2 <= request.max_points <= MAX_SERIES_POINTS:
            raise invalid_field("max_points", f"must be 2..{MAX_SERIES_POINTS}")
        names = request.names
        after_key = None
        if request.cursor is not None:
            if request.method != "raw":
                raise invalid_field("cursor", "only raw reads are paged (method=raw)")
            position = decode_cursor(request.cursor, SeriesCursor)
            if names and names != (position.name,):
                raise invalid_field("cursor", "the cursor belongs to another series")
            names, after_key = (position.name,), position.after_key
        if len(names) > MAX_NAMES_PER_QUERY:
            raise invalid_field("names", f"at most {MAX_NAMES_PER_QUERY} series per request")
        for name in names:
            check_text(name, "names")

        key_range = KeyRange(request.start, request.end)
        metrics = self._metrics
        # The run check (PostgreSQL), the run's series names and, when the names are known
        # already, their statistics (ClickHouse) are independent: one round trip of latency.
        refs = [SeriesRef(run_id, name) for name in names]
        stats: dict[SeriesRef, SeriesStats] | None = None
        if refs:
            _, (named, stats) = await both(
                lambda: self._readable_runs(principal, [run_id], field="run_id"),
                lambda: both(lambda: metrics.series_names(table, [run_id]),
                              lambda: metrics.stats(table, refs, key_range)))
        else:
            _, named = await both(
                lambda: self._readable_runs(principal, [run_id], field="run_id"),
                lambda: metrics.series_names(table, [run_id]))
            refs = [SeriesRef(run_id, ref.name) for ref in named[:MAX_NAMES_PER_QUERY]]
        available = [ref.name for ref in named]
        method = request.method
        if method == "raw":
            page_size = request.max_points or DEFAULT_RAW_PAGE_POINTS
            data = await self._raw_pages(table, refs, key_range, page_size, after_key, stats)
        else:
            data = await self._downsampled(table, refs, key_range, method,
                                           request.max_points or DEFAULT_MAX_POINTS,
                                           stats=stats)
        return MetricsResult(
            run_id=run_id,
            series=[_series(ref.name, data.get(ref, _EMPTY), method, request.layout)
                    for ref in refs],
            available_metrics=available,
        )

    async def _pages(self, table: SeriesTable, refs: Sequence[SeriesRef],
                     stats: dict[SeriesRef, SeriesStats], key_range: KeyRange, *, limit: int,
                     after_key: int | None = None) -> dict[SeriesRef, Columns]:
        """Pages of `refs`, deduplicating only the series that hold duplicates."""
        pages: dict[SeriesRef, Columns] = {}
        for dedup in (False, True):
            group = [ref for ref in refs if stats[ref].has_duplicates == dedup]
            if group:
                pages.update(await self._metrics.pages(table, group, key_range, limit=limit,
                                                       dedup=dedup, after_key=after_key))
        return pages

    async def _raw_pages(self, table: SeriesTable, refs: Sequence[SeriesRef],
                         key_range: KeyRange, page_size: int, after_key: int | None,
                         stats: dict[SeriesRef, SeriesStats] | None = None,
                         ) -> dict[SeriesRef, _SeriesData]:
        if stats is None:
            stats = await self._metrics.stats(table, refs, key_range)
        pages = await self._pages(table, list(stats), stats, key_range, limit=page_size + 1,
                                  after_key=after_key)
        result: dict[SeriesRef, _SeriesData] = {}
        for ref, st in stats.items():
            columns = pages.get(ref)
            if columns is None:
                continue
            count = min(len(columns.keys), page_size)
            next_cursor = None
            if len(columns.keys) > page_size:
                next_cursor = encode_cursor(SeriesCursor(name=ref.name,
                                                         after_key=columns.keys[count - 1]))
            total = st.rows
            if st.has_duplicates and not st.rows_distinct:
                total = await self._metrics.distinct_keys(table, ref, key_range)
            result[ref] = _SeriesData(columns=_stored_columns(
                                          table, columns.keys[:count], columns.values[:count],
                                          columns.others[:count]),
                                      total_points=total, downsampled=False,
                                      next_cursor=next_cursor)
        return result

    async def _downsampled(self, table: SeriesTable, refs: Sequence[SeriesRef],
                           key_range: KeyRange, method: Method, max_points: int,
                           shifts_ms: dict[str, int] | None = None,
                           stats: dict[SeriesRef, SeriesStats] | None = None,
                           ) -> dict[SeriesRef, _SeriesData]:
        if stats is None:
            stats = await self._metrics.stats(table, refs, key_range)
        small = [ref for ref, st in stats.items() if st.rows <= max_points]
        large = [ref for ref, st in stats.items() if st.rows > max_points]
        result: dict[SeriesRef, _SeriesData] = {}
        if large:
            plans: dict[SeriesRef, BucketPlan | BlockPlan] = {}
            dirty: dict[SeriesRef, tuple[int, ...]] = {}
            for ref in large:
                st = stats[ref]
                # A series or step range is bucketed from its block rollups (128 steps a row;
                # dirty blocks and a range's two edge blocks from their points) when it is
                # long enough for whole blocks per bucket.
                block_plan = (plan_block_buckets(method, st.lo, st.hi, max_points, BLOCK_STEPS)
                              if st.dirty_blocks is not None else None)
                if block_plan is not None and st.dirty_blocks is not None:
                    dirty[ref] = st.dirty_blocks
                plans[ref] = block_plan or plan_buckets(method, st.lo, st.hi, max_points)
            requests = [BucketRequest(ref, plans[ref], method, stats[ref].has_duplicates,
                                      dirty.get(ref, ()), key_range) for ref in large]
            bucketed = await self._metrics.buckets(table, requests)
            for ref, series in bucketed.items():
                total = series.total
                if total <= max_points:
                    small.append(ref)  # only duplicates made it look large: read it whole
                    continue
                # A plan without interior buckets (a budget of 2) keeps first and last only.
                buckets = [b for b in series.buckets if b.slot < plans[ref].count]
                if series.lttb is not None:
                    samples = select_lttb_columns(series.first, series.last, series.lttb,
                                                  plans[ref].count)
                elif method == "lttb":
                    samples = select_lttb(series.first, series.last, buckets)
                elif method == "minmax":
                    samples = select_minmax(series.first, series.last, buckets)
                else:
                    samples = select_avg(series.first, series.last, buckets)
                shift = (shifts_ms or {}).get(ref.run_id, 0)
                result[ref] = _SeriesData(columns=_sample_columns(table, samples, shift),
                                          total_points=total, downsampled=True)
        if small:
            pages = await self._pages(table, small, stats, key_range, limit=max_points)
            for ref, columns in pages.items():
                shift = (shifts_ms or {}).get(ref.run_id, 0)
                result[ref] = _SeriesData(
                    columns=_stored_columns(table, columns.keys, columns.values,
                                            columns.others, shift),
                    total_points=len(columns.keys), downsampled=False)
        return result

    # --- comparison --------------------------------------------------------------------------

    async def compare(self, principal: Principal, request: CompareRuns) -> CompareResult:
        principal.require("read")
        run_ids = list(dict.fromkeys(request.run_ids))
        # The runs (PostgreSQL) and every series of them with its statistics (ClickHouse
        # block rollups: the names, and what planning the reads needs) at once.
        records, blocks = await both(
            lambda: self._readable_runs(principal, run_ids, field="run_ids"),
            lambda: self._metrics.block_stats(run_ids, None))
        whole_stats = whole_series_stats(blocks)
        names_by_run: dict[str, set[str]] = {run_id: set() for run_id in run_ids}
        for ref in whole_stats:
            if ref.run_id in names_by_run:
                names_by_run[ref.run_id].add(ref.name)
        common = sorted(set.intersection(*names_by_run.values())) if names_by_run else []
        names = (list(dict.fromkeys(request.metric_names)) if request.metric_names is not None
                 else common[:DEFAULT_COMPARE_METRICS])
        if len(names) * len(run_ids) > MAX_COMPARE_SERIES:
            raise invalid_field("metric_names", f"at most {MAX_COMPARE_SERIES} series (runs x"
                                           " metrics) per comparison")
        shifts_ms: dict[str, int] = {}
        if request.alignment == "relative_time":
            shifts_ms = {run_id: epoch_ms(records[run_id].created_at) for run_id in run_ids}
        refs = [SeriesRef(run_id, name) for run_id in run_ids for name in names]
        data = await self._downsampled(
            METRICS, refs, KeyRange(), request.method, request.max_points, shifts_ms,
            stats={ref: whole_stats[ref] for ref in refs if ref in whole_stats})
        return CompareResult(
            alignment=request.alignment,
            common_metrics=common,
            runs=[
                ComparedRun(
                    run_id=run_id, project=records[run_id].project, name=records[run_id].name,
                    status=cast(RunStatus, records[run_id].status),
                    started_at=iso_utc(records[run_id].created_at),
                    series=[_series(name, data.get(SeriesRef(run_id, name), _EMPTY),
                                    request.method, request.layout) for name in names],
                )
                for run_id in run_ids
            ],
        )


def _series(name: str, data: _SeriesData, method: DownsampleMethod,
            layout: SeriesLayout) -> Series:
    steps, values, timestamps = data.columns
    if layout == "columns":
        return Series(name=name, steps=steps, values=values, timestamps=timestamps,
                      total_points=data.total_points, downsampled=data.downsampled,
                      method=method, next_cursor=data.next_cursor)
    return Series(name=name, points=list(map(SeriesPoint, steps, values, timestamps)),
                  total_points=data.total_points, downsampled=data.downsampled, method=method,
                  next_cursor=data.next_cursor)


# --------------------------------------------------------------------------- cursors


def _cursor_value(value: KeysetValue) -> str | int | None:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, timedelta):
        return value // timedelta(microseconds=1)
    return value


def _keyset_value(column: SortColumn, value: str | int | float | None) -> KeysetValue:
    invalid = InvalidInput("the cursor belongs to another sort order",
                           code=ErrorCode.INVALID_CURSOR,
                           field="cursor")
    if column in ("created_at", "updated_at"):
        if not isinstance(value, str):
            raise invalid
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise invalid from None
        if moment.tzinfo is None:
            raise invalid
        return moment
    if column == "duration":
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise invalid
        try:
            return timedelta(microseconds=value)
        except OverflowError:
            raise invalid from None
    if not isinstance(value, str):
        raise invalid
    return check_text(value, "cursor")


def _position_after(ordered: list[str], values: dict[str, float], position: RunsCursor,
                    descending: bool) -> int:
    """Index of the first run strictly after the cursor in `ordered` (which is sorted by
    (has no value, value, run_id), reversed within each part when descending)."""
    cursor_value = None if position.value is None else float(position.value)
    if cursor_value is not None and not math.isfinite(cursor_value):
        raise InvalidInput("the cursor belongs to another sort order",
                           code=ErrorCode.INVALID_CURSOR,
                           field="cursor")

    def after(run_id: str) -> bool:
        value = values.get(run_id)
        if cursor_value is None:
            return value is None and (run_id < position.run_id if descending
                                      else run_id > position.run_id)
        if value is None:
            return True
        mine = (value, run_id)
        theirs = (cursor_value, position.run_id)
        return mine < theirs if descending else mine > theirs

    for index, run_id in enumerate(ordered):
        if after(run_id):
            return index
    return len(ordered)
