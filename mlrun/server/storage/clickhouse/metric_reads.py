"""ClickHouse SQL of the read path: metric summaries, series statistics, bucketed downsampling
(over points or over block rollups), raw pages, and last values for sorting runs by a metric.

Owns `MetricQueries`, every SELECT the read path sends to ClickHouse, and the knowledge of how
`metrics` / `system_metrics` / `metrics_summary` (sql/clickhouse/0001_metrics.sql) and
`metric_blocks` (0002_metric_blocks.sql) are read. The selection among bucket statistics
happens in `mlrun.server.domain.downsampling` (pure); the orchestration (what to ask for, in which
order) in `mlrun.server.usecases.queries`.

Must not import the HTTP/gRPC edges, PostgreSQL, or a ClickHouse transport directly: it codes
against the `storage.clickhouse.client.ClickHouse` protocol. Values are escaped client-side with
`protocols.clickhouse.quote_*` (18.16 has no `{p:Type}` parameters). Every statement runs
unchanged on ClickHouse 18.16 and on chdb (ClickHouse 26): both are exercised by the tests.

Invariants:
- Last write wins per (run, name, key): a query that reads points reads them through the
  deduplicating subquery `argMax(value, version) ... GROUP BY key` unless the block rollups
  prove there is nothing to deduplicate (`dedup=False`, see `MetricQueries.stats`: no block in
  range had a step written twice): a retried or replayed batch is never counted twice.
- Block rollups are read only for clean blocks wholly inside the series or step range read
  (`SeriesStats.dirty_blocks`), whose states describe exactly the stored points; a dirty
  block (a step written twice) and a range's two edge blocks are computed from their points
  (deduplicated, inside the range) in the same statement.
- Bucketing (`BucketPlan.index_of` as SQL, with the first and last key in buckets of their
  own; or whole blocks under a `BlockPlan`) runs in ClickHouse; only per-bucket statistics
  travel back, never the points of a downsampled series.
- Many series are read by ONE statement (every series' plan in constant arrays, `LIMIT n BY`
  for pages), never one statement per series: on 18.16 each statement or UNION ALL branch costs
  ~10 ms of planning, measured. At most `_MAX_SERIES_PER_STATEMENT` series per statement.
  Several series' pairs are selected as runs x names; pairs nobody asked for are dropped.

Costs measured on 18.16 (2 cores, loopback HTTP) for one series of 1M points: statistics from
the block rollups ~13 ms (from the points: ~37 ms); buckets from the rollups 15-20 ms, from
the points ~90 ms without deduplication and ~300 ms with it (GROUP BY step over every row);
the old distinct count `uniqExactMerge(step_count)` of the summary ~180 ms, now unused.
"""

from __future__ import annotations

import itertools
import operator
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Final

from mlrun.server.concurrently import both
from mlrun.server.domain.downsampling import (
    FIRST_BUCKET,
    LAST_BUCKET,
    BlockPlan,
    Bucket,
    BucketPlan,
    LttbColumns,
    Method,
    Sample,
)
from mlrun.server.errors import BackendError
from mlrun.server.ports.metric_reads import (
    BLOCK_STEPS,
    BlockStats,
    BucketedSeries,
    BucketRequest,
    Columns,
    KeyRange,
    SeriesRef,
    SeriesStats,
    SeriesTable,
    SummaryRow,
    whole_series_stats,
)
from mlrun.server.protocols.clickhouse import RowBinaryType, quote_list, quote_string
from mlrun.server.storage.clickhouse.bucket_sql import (
    block_bucket_statement,
    bucket_row_names,
    bucket_row_types,
    bucket_statement,
    dirty_block_bucket_statement,
    edge_statement,
    multi_source,
    popcount_sql,
    range_condition,
    series_identity,
    series_where,
)
from mlrun.server.storage.clickhouse.client import ClickHouse

# Series per statement: their runs x names become constant arrays in the SQL (a few dozen bytes
# per slot), far below 18.16's 256 KiB max_query_size.
_MAX_SERIES_PER_STATEMENT: Final = 500
# `run_id IN (...)` lists longer than this read the whole name instead (a 10k-id literal would
# pass max_query_size).
_MAX_IN_LIST: Final = 2000
# Dirty blocks listed per series; beyond this the whole series counts as dirty.
_MAX_DIRTY_LISTED: Final = 1000
# Series whose BlockStats are cached (LRU; a few hundred bytes each, more with dirty blocks).
_MAX_CACHED_SERIES: Final = 20_000


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class MetricQueries:
    def __init__(self, clickhouse: ClickHouse, *, timeout_s: float = 10.0) -> None:
        self._ch = clickhouse
        self._timeout_s = timeout_s
        # BlockStats by series, valid while the series' row count is what they counted.
        self._block_stats: OrderedDict[SeriesRef, BlockStats] = OrderedDict()
        # Block bucketings of whole, clean series (see `_bucketing_key`), LRU.
        self._bucketings: OrderedDict[_BucketingKey, BucketedSeries] = OrderedDict()
        self._cached_buckets = 0  # buckets held in `_bucketings`

    async def _rows(self, sql: str) -> list[dict[str, Any]]:
        return await self._ch.query_rows(sql, timeout_s=self._timeout_s)

    async def _bucket_rows(self, sql: str, method: Method) -> list[dict[str, Any]]:
        """Rows of a (point or block) bucket statement, one per series, read as RowBinary
        (its arrays are typed: `bucket_sql.typed_arrays`): a comparison's 20 x 500 buckets of
        ten columns decode without a parsed JSON number each."""
        names = bucket_row_names(method)
        rows = await self._ch.query_row_binary(sql, bucket_row_types(method),
                                               timeout_s=self._timeout_s)
        return [dict(zip(names, row, strict=True)) for row in rows]

    # --- summaries ---------------------------------------------------------------------------

    async def summaries(
        self, run_ids: Sequence[str], names: Sequence[str] | None = None, *,
        with_counts: bool = True,
    ) -> list[SummaryRow]:
        """min/max/last per (run, metric) from the AggregatingMergeTree, merged now; the count
        (distinct steps) from the block rollups, unless `with_counts` is False (then `count`
        is 0 and the block rollups are not read: one statement instead of two).

        The two statements are not merged into one: on 18.16 a JOIN of the two costs ~3x one
        of them and a UNION ALL their sum (measured, 1 run x 5 metrics, kept-alive HTTP),
        while apart they run in parallel."""
        if not run_ids or (names is not None and not names):
            return []
        where = f"run_id IN {quote_list(run_ids)}"
        if names is not None:
            where += f" AND name IN {quote_list(names)}"
        summary = ("SELECT run_id, name, minMerge(min_value) AS mn, maxMerge(max_value) AS mx,"
                   " argMaxMerge(last_value) AS lv, maxMerge(last_step) AS ls FROM"
                   f" metrics_summary WHERE {where} GROUP BY run_id, name ORDER BY run_id, name")
        # Independent statements: one round trip of latency, not two.
        if with_counts:
            rows, blocks = await both(lambda: self._rows(summary),
                                      lambda: self.block_stats(run_ids, names))
        else:
            rows, blocks = await self._rows(summary), {}
        return [
            SummaryRow(
                run_id=str(r["run_id"]), name=str(r["name"]), min_value=float(r["mn"]),
                max_value=float(r["mx"]), last_value=float(r["lv"]), last_step=int(r["ls"]),
                count=blocks[ref].distinct if ref in blocks else 0,
            )
            for r in rows
            for ref in (SeriesRef(str(r["run_id"]), str(r["name"])),)
        ]

    async def block_stats(
        self, run_ids: Sequence[str], names: Sequence[str] | None
    ) -> dict[SeriesRef, BlockStats]:
        """`BlockStats` of every series of `run_ids` (x `names`, all names when None).

        Computing them merges five states per block (~13 ms for a 1M-step series on 18.16);
        counting a series' rows merges one state over all its blocks at once (~3 ms). The rows
        a series was ever written grow with every insert and nothing else changes its blocks,
        so stats computed at a row count stay exact while that count does: they are cached
        per series (LRU) and recomputed only for series whose count moved."""
        if not run_ids or (names is not None and not names):
            return {}
        where = f"run_id IN {quote_list(run_ids)}"
        if names is not None:
            where += f" AND name IN {quote_list(names)}"
        identity, keys = series_identity(run_ids, names)
        counted = await self._rows(
            f"SELECT {identity}, countMerge(rows) AS n FROM metric_blocks WHERE {where}"
            + (f" GROUP BY {', '.join(keys)}" if keys else ""))
        result: dict[SeriesRef, BlockStats] = {}
        moved: list[SeriesRef] = []
        for row in counted:
            ref = SeriesRef(str(row["sr"]), str(row["sn"]))
            cached = self._block_stats.get(ref)
            if cached is not None and cached.rows == int(row["n"]):
                self._block_stats.move_to_end(ref)
                result[ref] = cached
            else:
                moved.append(ref)
        if moved:
            fresh = await self._compute_block_stats(sorted({r.run_id for r in moved}),
                                                    sorted({r.name for r in moved}))
            for ref in moved:
                if ref in fresh:
                    result[ref] = fresh[ref]
                    self._block_stats[ref] = fresh[ref]
                    self._block_stats.move_to_end(ref)
            while len(self._block_stats) > _MAX_CACHED_SERIES:
                self._block_stats.popitem(last=False)
        return result

    async def _compute_block_stats(
        self, run_ids: Sequence[str], names: Sequence[str]
    ) -> dict[SeriesRef, BlockStats]:
        identity, keys = series_identity(run_ids, names)
        rows = await self._rows(
            "SELECT sr, sn, sum(bn) AS n, sum(bp) AS d, min(bfk) AS lo, max(bzk) AS hi,"
            f" groupArrayIf({_MAX_DIRTY_LISTED + 1})(block, bn != bp) AS dirty FROM ("
            f"SELECT {identity}, block, countMerge(rows) AS bn,"
            " groupBitOrMerge(steps_low) AS bml, groupBitOrMerge(steps_high) AS bmh,"
            f" {popcount_sql('bml')} + {popcount_sql('bmh')} AS bp,"
            " minMerge(first_step) AS bfk, maxMerge(last_step) AS bzk"
            f" FROM metric_blocks WHERE run_id IN {quote_list(run_ids)}"
            f" AND name IN {quote_list(names)} GROUP BY {', '.join([*keys, 'block'])})"
            " GROUP BY sr, sn"
        )
        result: dict[SeriesRef, BlockStats] = {}
        for row in rows:
            dirty = [int(b) for b in row["dirty"]]
            result[SeriesRef(str(row["sr"]), str(row["sn"]))] = BlockStats(
                rows=int(row["n"]), distinct=int(row["d"]), lo=int(row["lo"]),
                hi=int(row["hi"]),
                dirty=tuple(sorted(dirty)) if len(dirty) <= _MAX_DIRTY_LISTED else None)
        return result

    async def series_names(self, table: SeriesTable, run_ids: Sequence[str]) -> list[SeriesRef]:
        """Every (run, series name) that has points."""
        if not run_ids:
            return []
        source = "metrics_summary" if table.has_blocks else table.table
        rows = await self._rows(
            f"SELECT run_id, name FROM {source} WHERE run_id IN {quote_list(run_ids)}"
            " GROUP BY run_id, name ORDER BY run_id, name"
        )
        return [SeriesRef(str(r["run_id"]), str(r["name"])) for r in rows]

    async def last_values(self, name: str, run_ids: Sequence[str]) -> dict[str, float]:
        """The last value (highest step, then latest write) of metric `name` per run."""
        if not run_ids:
            return {}
        where = f"name = {quote_string(name)}"
        if len(run_ids) <= _MAX_IN_LIST:
            where += f" AND run_id IN {quote_list(run_ids)}"
        rows = await self._rows(
            "SELECT run_id, argMaxMerge(last_value) AS lv FROM metrics_summary"
            f" WHERE {where} GROUP BY run_id"
        )
        wanted = set(run_ids)
        return {str(r["run_id"]): float(r["lv"]) for r in rows if r["run_id"] in wanted}

    # --- series statistics -------------------------------------------------------------------

    async def stats(
        self, table: SeriesTable, refs: Sequence[SeriesRef], key_range: KeyRange
    ) -> dict[SeriesRef, SeriesStats]:
        """Rows and key bounds in `key_range` per series, and whether the series holds
        duplicate rows (a step written twice, not yet merged away by ReplacingMergeTree).

        Metrics answer from the block rollups (see `block_stats`), exact and cheap: a series
        has duplicates when a block in range is dirty. A whole-series read needs nothing else;
        a range also counts its rows in `metrics`. System metrics have no rollups: their reads
        always deduplicate. Series without rows in range are absent from the result."""
        if not refs:
            return {}
        wanted = set(refs)
        run_ids = sorted({r.run_id for r in refs})
        names = sorted({r.name for r in refs})
        whole = key_range.start is None and key_range.end is None
        if table.has_blocks and whole:
            whole_stats = whole_series_stats(await self.block_stats(run_ids, names))
            return {ref: st for ref, st in whole_stats.items() if ref in wanted}
        in_range = range_condition(table.key, key_range, after_key=None)
        where = f"run_id IN {quote_list(run_ids)} AND name IN {quote_list(names)}"
        if in_range:
            where += f" AND {in_range}"
        identity, keys = series_identity(run_ids, names)
        group = f" GROUP BY {', '.join(keys)}" if keys else ""
        counted = (f"SELECT {identity}, count() AS n, min({table.key}) AS lo,"
                   f" max({table.key}) AS hi FROM {table.table} WHERE {where}{group}")
        blocks: dict[SeriesRef, BlockStats] = {}
        if table.has_blocks:
            # The range's rows and the series' dirty blocks are independent: read at once.
            rows, blocks = await both(lambda: self._rows(counted),
                                      lambda: self.block_stats(run_ids, names))
        else:
            rows = await self._rows(counted)
        result: dict[SeriesRef, SeriesStats] = {}
        for row in rows:
            ref = SeriesRef(str(row["sr"]), str(row["sn"]))
            if ref not in wanted or int(row["n"]) == 0:
                continue
            lo, hi = int(row["lo"]), int(row["hi"])
            block = blocks.get(ref)
            first_block, last_block = lo // BLOCK_STEPS, hi // BLOCK_STEPS
            dirty_in_range = (None if block is None or block.dirty is None else
                              [b for b in block.dirty if first_block <= b <= last_block])
            duplicates = dirty_in_range is None or bool(dirty_in_range)
            # Bucketed from the rollups when long enough: the blocks wholly inside the range
            # from their rollups, the two edge blocks (and dirty ones) from their points.
            from_points = (None if dirty_in_range is None
                           else tuple(sorted({*dirty_in_range, first_block, last_block})))
            result[ref] = SeriesStats(rows=int(row["n"]), lo=lo, hi=hi,
                                      has_duplicates=duplicates, dirty_blocks=from_points)
        return result

    async def distinct_keys(
        self, table: SeriesTable, ref: SeriesRef, key_range: KeyRange
    ) -> int:
        """Distinct keys of one series in range (what `rows` means once duplicates collapse)."""
        where = series_where(table, ref, key_range, after_key=None)
        rows = await self._rows(f"SELECT uniqExact({table.key}) AS n FROM {table.table}"
                                f" WHERE {where}")
        return int(rows[0]["n"]) if rows else 0

    # --- points ------------------------------------------------------------------------------

    async def pages(
        self,
        table: SeriesTable,
        refs: Sequence[SeriesRef],
        key_range: KeyRange,
        *,
        limit: int,
        dedup: bool,
        after_key: int | None = None,
    ) -> dict[SeriesRef, Columns]:
        """Up to `limit` points per series (after `after_key`), in key order, one per key
        when `dedup`. One statement for all of them (`LIMIT n BY` series)."""
        result: dict[SeriesRef, Columns] = {}
        wanted = set(refs)
        if len(wanted) == 1:
            # One series (the metrics route): no LIMIT BY and no regrouping by series, which
            # cost ~2x the plain ordered read (measured: 100k points 50 ms vs 27 ms on 18.16).
            (ref,) = wanted
            source = multi_source(table, [ref], key_range, after_key, dedup)
            rows = await self._ch.query_row_binary(
                f"SELECT {_POINT_ARRAYS} FROM"
                f" (SELECT k, v, o FROM ({source}) ORDER BY k LIMIT {int(limit)})",
                _POINT_TYPES, timeout_s=self._timeout_s)
            if rows and rows[0][0]:
                result[ref] = _columns(*rows[0])
            return result
        for chunk in _chunks(sorted(wanted), _MAX_SERIES_PER_STATEMENT):
            source = multi_source(table, chunk, key_range, after_key, dedup)
            rows = await self._ch.query_row_binary(
                f"SELECT toString(sr), toString(sn), {_POINT_ARRAYS} FROM (SELECT sr, sn, k, v, o"
                f" FROM ({source}) ORDER BY sr, sn, k LIMIT {int(limit)} BY sr, sn)"
                " GROUP BY sr, sn",
                ("String", "String", *_POINT_TYPES), timeout_s=self._timeout_s)
            for run_id, name, keys, values, others in rows:
                ref = SeriesRef(run_id, name)
                if ref in wanted:
                    result[ref] = _columns(keys, values, others)
        return result

    async def buckets(
        self, table: SeriesTable, requests: Sequence[BucketRequest]
    ) -> dict[SeriesRef, BucketedSeries]:
        """Per-bucket statistics of each series under its plan (see `downsampling`), over the
        plan's keys lo..hi (rows written since the plan was made beyond them are left out).
        One statement per (dedup, method) group, all its series in it."""
        groups: dict[tuple[bool, bool, Method], list[BucketRequest]] = {}
        for request in requests:
            by_blocks = isinstance(request.plan, BlockPlan)
            groups.setdefault((by_blocks, request.dedup, request.method), []).append(request)
        result: dict[SeriesRef, BucketedSeries] = {}
        for (by_blocks, dedup, method), members in groups.items():
            if by_blocks:
                for request in (r for r in members if r.dirty):
                    result[request.ref] = await self._dirty_block_buckets(request)
                members = [r for r in members if not r.dirty]
            for chunk in _chunks(members, _MAX_SERIES_PER_STATEMENT):
                if by_blocks:
                    result.update(await self._block_buckets(chunk, method))
                    continue
                statement, series = bucket_statement(table, chunk, dedup, method)
                for row in await self._bucket_rows(statement, method):
                    index = int(row["s"])
                    if index in series:
                        result[series[index].ref] = _bucketed(method, row)
        return result

    async def _dirty_block_buckets(self, request: BucketRequest) -> BucketedSeries:
        """Buckets of one series with dirty blocks: clean blocks from their rollups, dirty
        ones from their points (deduplicated), combined per bucket in one statement that
        also yields the first and last point (the first bucket's first, the last's last)."""
        rows = await self._rows(dirty_block_bucket_statement(request))
        if not rows:
            raise BackendError("the block rollups of a series returned no bucket",
                               backend="clickhouse")
        row = rows[0]
        _, buckets, lttb = _bucket_records(request.method, row)
        first = Sample(int(row["fk_a"][0]), float(row["fv_a"][0]), int(row["fo_a"][0]))
        last = Sample(int(row["zk_a"][-1]), float(row["zv_a"][-1]), int(row["zo_a"][-1]))
        total = sum(lttb.sizes) if lttb is not None else sum(b.size for b in buckets)
        return BucketedSeries(first=first, last=last if last.key != first.key else None,
                              buckets=buckets, total=total, lttb=lttb)

    async def _block_buckets(
        self, requests: Sequence[BucketRequest], method: Method
    ) -> dict[SeriesRef, BucketedSeries]:
        """Buckets from the block rollups and, at the same time, each series' first and last
        point from its edge blocks (a separate small statement: merging the first/last states
        of every block only for those two would cost ~40% more, measured). A series whose
        bucketing is kept (`_bucketing_key`) is not asked for again."""
        result: dict[SeriesRef, BucketedSeries] = {}
        keys: dict[SeriesRef, _BucketingKey] = {}
        missing: list[BucketRequest] = []
        for asked in requests:
            key = self._bucketing_key(asked)
            cached = self._bucketings.get(key) if key is not None else None
            if key is not None and cached is not None:
                self._bucketings.move_to_end(key)
                result[asked.ref] = cached
                continue
            if key is not None:
                keys[asked.ref] = key
            missing.append(asked)
        if not missing:
            return result
        statement, series = block_bucket_statement(missing, method)
        rows, edge_rows = await both(lambda: self._bucket_rows(statement, method),
                                     lambda: self._rows(edge_statement(missing)))
        edges = {(str(r["sr"]), str(r["sn"]), int(r["block"])): r for r in edge_rows}
        for row in rows:
            request = series.get(int(row["s"]))
            if request is None:
                continue
            plan = request.plan
            assert isinstance(plan, BlockPlan)  # block_bucket_statement checked every plan
            head = edges.get((request.ref.run_id, request.ref.name, plan.first_block))
            tail = edges.get((request.ref.run_id, request.ref.name, plan.last_block))
            if head is None or tail is None:
                raise BackendError("the edge blocks of a series are missing",
                                   backend="clickhouse")
            first = Sample(int(head["fk"]), float(head["fv"]), int(head["fo"]))
            last = Sample(int(tail["zk"]), float(tail["zv"]), int(tail["zo"]))
            _, buckets, lttb = _bucket_records(method, row)
            total = sum(lttb.sizes) if lttb is not None else sum(b.size for b in buckets)
            result[request.ref] = BucketedSeries(
                first=first, last=last if last.key != first.key else None, buckets=buckets,
                total=total, lttb=lttb)
            key = keys.get(request.ref)
            if key is not None and key not in self._bucketings:
                self._bucketings[key] = result[request.ref]
                self._cached_buckets += _bucket_count(result[request.ref])
        while self._cached_buckets > _MAX_CACHED_BUCKETS and self._bucketings:
            _, dropped = self._bucketings.popitem(last=False)
            self._cached_buckets -= _bucket_count(dropped)
        return result

    def _bucketing_key(self, request: BucketRequest) -> _BucketingKey | None:
        """The cache key of a whole, clean series' block bucketing: its plan and method, and
        the rows the series was ever written as this request's statistics counted them (the
        `block_stats` entry they just validated); None when those are not at hand."""
        stats = self._block_stats.get(request.ref)
        if stats is None or request.dirty or request.key_range != KeyRange():
            return None
        return (request.ref, request.method, request.dedup, request.plan, stats.rows)


# The bucketing of one series from its rollups is exact while the rows it was ever written stay
# what they were, for the reason `MetricQueries.block_stats` gives: kept per (series, method,
# dedup, plan, rows), LRU. A finished run's 1M-step chart read again (a reload, another viewer,
# a zoom back out) then costs ClickHouse the row count only, not the merge of every block's
# states (~16 ms of ClickHouse CPU for 7,813 blocks, minmax). Bounded by the buckets held
# (a bucket with its candidates is a few hundred bytes: ~20 MB at most; a UI chart of a 1M-step
# series holds 150-2000 buckets).
_MAX_CACHED_BUCKETS: Final = 50_000


def _bucket_count(series: BucketedSeries) -> int:
    return len(series.lttb.slots) if series.lttb is not None else len(series.buckets)


# (series, method, dedup, plan, rows ever written): what a kept bucketing is valid for.
_BucketingKey = tuple[SeriesRef, Method, bool, BucketPlan | BlockPlan, int]


# --------------------------------------------------------------------------- SQL building


# A page of points as three arrays, read as RowBinary (`query_row_binary`): each array is one
# C-level copy. As JSONEachRow the same 100k points cost ~15 ms of parsing and float() calls.
_POINT_ARRAYS: Final = ("groupArray(toInt64(k)), groupArray(toFloat64(v)),"
                        " groupArray(toInt64(o))")
_POINT_TYPES: Final[tuple[RowBinaryType, ...]] = ("Array(Int64)", "Array(Float64)",
                                                  "Array(Int64)")


def _columns(keys: list[int], values: list[float], others: list[int]) -> Columns:
    """Hot (a raw page is up to 100k points): C-level passes only."""
    if not (len(keys) == len(values) == len(others)):
        raise BackendError("ClickHouse returned columns of different lengths",
                           backend="clickhouse", detail=f"{len(keys)}/{len(values)}/{len(others)}")
    ordered = sorted(keys)
    if ordered != keys:
        # groupArray keeps the subquery's order in practice; never trust it blindly. (A sort
        # of sorted keys plus a list compare is ~4x cheaper than a pairwise check in Python.)
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys = ordered
        values = [values[i] for i in order]
        others = [others[i] for i in order]
    return Columns(keys=keys, values=values, others=others)


def _bucketed(method: Method, row: dict[str, Any]) -> BucketedSeries:
    """A series' bucket arrays (one row of the point bucket statement) as `downsampling`
    records: the first and last point come in buckets of their own."""
    edges, buckets, lttb = _bucket_records(method, row)
    first = edges.get(FIRST_BUCKET)
    if first is None:
        # Buckets are only requested for series with rows at lo (the planned first key).
        raise BackendError("the bucketed series lost its first point", backend="clickhouse")
    last = edges.get(LAST_BUCKET)
    # (lttb's columns hold interior buckets only: `_lttb_records` dropped the edge slots.)
    interior = sum(lttb.sizes) if lttb is not None else sum(b.size for b in buckets)
    return BucketedSeries(first=first, last=last, buckets=buckets,
                          total=interior + 1 + (last is not None), lttb=lttb)


def _bucket_records(method: Method, row: dict[str, Any]) -> tuple[
        dict[int, Sample], list[Bucket], LttbColumns | None]:
    """Bucket arrays as (points of the negative edge slots, interior buckets in slot order,
    or for lttb no buckets but the columns)."""
    if method == "lttb":
        return _lttb_records(row)
    edges, buckets = _bucket_list(method, row)
    return edges, buckets, None


def _lttb_records(row: dict[str, Any]) -> tuple[dict[int, Sample], list[Bucket], LttbColumns]:
    """LTTB bucket arrays as columns (negative slots are the one-point edge buckets)."""
    columns = LttbColumns(
        slots=row["b_a"], sizes=row["n_a"], mean_keys=row["mk_a"], mean_values=row["mv_a"],
        low_keys=row["lk_a"], low_values=row["lv_a"], low_others=row["lo__a"],
        high_keys=row["hk_a"], high_values=row["hv_a"], high_others=row["ho_a"])
    lengths = {len(c) for c in (columns.slots, columns.sizes, columns.mean_keys,
                                columns.mean_values, columns.low_keys, columns.low_values,
                                columns.low_others, columns.high_keys, columns.high_values,
                                columns.high_others)}
    if len(lengths) != 1:
        raise BackendError("ClickHouse returned bucket columns of different lengths",
                           backend="clickhouse")
    # The edge slots lead (ORDER BY b puts -2, -1 first): found without a Python pass over
    # every bucket, unless some negative slot is elsewhere.
    leading = 0
    while leading < len(columns.slots) and columns.slots[leading] < 0:
        leading += 1
    negative = (range(leading) if min(columns.slots[leading:], default=0) >= 0 else
                [i for i, slot in enumerate(columns.slots) if slot < 0])
    edges = {columns.slots[i]: Sample(int(columns.low_keys[i]), float(columns.low_values[i]),
                                      int(columns.low_others[i]))
             for i in negative}
    # Keep the interior buckets only, in slot order: the inner ORDER BY puts the edge slots
    # -2, -1 first and the rest in order in practice (a slice); never trust it blindly.
    slots = columns.slots
    start = len(edges)
    interior = slots[start:]
    if (not interior or interior[0] >= 0) and all(
            map(operator.lt, interior, itertools.islice(interior, 1, None))):
        if start:
            columns = LttbColumns(*(getattr(columns, f)[start:] for f in _LTTB_FIELDS))
    else:
        order = sorted((i for i, slot in enumerate(slots) if slot >= 0), key=slots.__getitem__)
        columns = LttbColumns(*([column[i] for i in order] for column in
                                (getattr(columns, f) for f in _LTTB_FIELDS)))
    return edges, [], columns


_LTTB_FIELDS: Final = ("slots", "sizes", "mean_keys", "mean_values", "low_keys", "low_values",
                       "low_others", "high_keys", "high_values", "high_others")


def _bucket_list(method: Method, row: dict[str, Any]) -> tuple[dict[int, Sample],
                                                               list[Bucket]]:
    """Bucket arrays as (points of the negative edge slots, interior buckets in slot order).

    Hot (a thousand buckets per series, many series per comparison): arrays are zipped once
    rather than indexed per field. Values go through float() because ClickHouse writes an
    integral Float64 as `1`, which decodes to int. A bucket's first and last point are
    candidates only for minmax."""
    count = len(row["b_a"])
    none = itertools.repeat(None, count)
    zeros = itertools.repeat(0.0, count)
    lows_highs: Any = (zip(row["lk_a"], row["lv_a"], row["lo__a"], row["hk_a"], row["hv_a"],
                           row["ho_a"], strict=True) if "lk_a" in row else none)
    edges_wanted = method == "minmax"
    firsts: Any = (zip(row["fk_a"], row["fv_a"], row["fo_a"], strict=True)
                   if edges_wanted and "fk_a" in row else itertools.repeat(None, count))
    lasts: Any = (zip(row["zk_a"], row["zv_a"], row["zo_a"], strict=True)
                  if edges_wanted and "zk_a" in row else itertools.repeat(None, count))
    heads: Any = (zip(row["fk_a"], row["fv_a"], row["fo_a"], strict=True)
                  if "fk_a" in row else itertools.repeat(None, count))
    means = zip(row.get("mk_a", zeros), row.get("mv_a", itertools.repeat(0.0, count)),
                row.get("mo_a", itertools.repeat(0.0, count)), strict=True)
    edges: dict[int, Sample] = {}
    buckets: list[Bucket] = []
    for slot, size, (mean_k, mean_v, mean_o), low_high, first, last, head in zip(
        row["b_a"], row["n_a"], means, lows_highs, firsts, lasts, heads, strict=True,
    ):
        low = high = None
        if low_high is not None:
            lk, lv, lo, hk, hv, ho = low_high
            low, high = Sample(lk, float(lv), lo), Sample(hk, float(hv), ho)
        if slot < 0:
            # One point: whichever candidate column the method computed holds it.
            edges[slot] = low if low is not None else Sample(head[0], float(head[1]), head[2])
            continue
        candidates: tuple[Sample, ...] = ()
        if low is not None and high is not None:
            candidates = (low, high) if low.key <= high.key else (high, low)
            if first is not None and last is not None:
                candidates = (Sample(first[0], float(first[1]), first[2]), *candidates,
                              Sample(last[0], float(last[1]), last[2]))
        buckets.append(Bucket(slot, size, float(mean_k), float(mean_v), float(mean_o),
                              candidates))
    if any(a.slot >= b.slot for a, b in itertools.pairwise(buckets)):
        buckets.sort(key=lambda b: b.slot)  # the inner ORDER BY keeps them sorted in practice
    return edges, buckets
