"""ClickHouse SQL of the read path: metric summaries, series statistics, bucketed downsampling,
raw pages, and last values for sorting runs by a metric.

Owns `MetricQueries`, every SELECT the read path sends to ClickHouse, and the knowledge of how
`metrics` / `system_metrics` / `metrics_summary` (sql/clickhouse/0001_metrics.sql) are read.
The selection among bucket statistics happens in `mlrun.server.downsampling` (pure); the
orchestration (what to ask for, in which order) in `mlrun.server.queries`.

Must not import the HTTP/gRPC edges, PostgreSQL, or a ClickHouse transport directly: it codes
against the `storage.clickhouse.ClickHouse` protocol. Values are escaped client-side with
`protocols.clickhouse.quote_*` (18.16 has no `{p:Type}` parameters). Every statement runs
unchanged on ClickHouse 18.16 and on chdb (ClickHouse 26): both are exercised by the tests.

Invariants:
- Last write wins per (run, name, key): a query that reads points reads them through the
  deduplicating subquery `argMax(value, version) ... GROUP BY key` unless the caller proved
  there is nothing to deduplicate (`dedup=False`, see `MetricQueries.stats`): a retried or
  replayed batch is never counted twice.
- Bucketing (`BucketPlan.index_of` as SQL, with the first and last key in buckets of their
  own) runs in ClickHouse under plans from `downsampling.plan_buckets`; only per-bucket
  statistics travel back, never the points of a downsampled series.
- Many series are read by ONE statement (every series' plan in constant arrays, `LIMIT n BY`
  for pages), never one statement per series: on 18.16 each statement or UNION ALL branch costs
  ~10 ms of planning, measured. At most `_MAX_SERIES_PER_STATEMENT` series per statement.
  Several series' pairs are selected as runs x names; pairs nobody asked for are dropped.

Costs measured on 18.16 (2 cores) for one series of 1M points: the duplicate check's
`uniqExactMerge(step_count)` deserializes the series' whole distinct-step set (~100 ms);
bucketing without deduplication ~50 ms, with it (GROUP BY step over every row) ~300 ms.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from mlrun.server.downsampling import LAST_BUCKET, Bucket, BucketPlan, Method, Sample
from mlrun.server.errors import BackendError
from mlrun.server.protocols.clickhouse import quote_list, quote_string
from mlrun.server.storage.clickhouse import ClickHouse

# Series per statement: their runs x names become constant arrays in the SQL (a few dozen bytes
# per slot), far below 18.16's 256 KiB max_query_size.
_MAX_SERIES_PER_STATEMENT: Final = 500
# `run_id IN (...)` lists longer than this read the whole name instead (a 10k-id literal would
# pass max_query_size).
_MAX_IN_LIST: Final = 2000
# Series remembered as free of duplicates (LRU; ~200 bytes each).
_MAX_VERIFIED_SERIES: Final = 100_000


@dataclass(frozen=True, slots=True)
class SeriesTable:
    """A table of points: `key` is the axis a series is ordered and deduplicated by."""

    table: str
    key: str
    other: str
    has_summary: bool


METRICS: Final = SeriesTable("metrics", key="step", other="timestamp_ms", has_summary=True)
SYSTEM_METRICS: Final = SeriesTable(
    "system_metrics", key="timestamp_ms", other="step", has_summary=False
)


@dataclass(frozen=True, slots=True, order=True)
class SeriesRef:
    run_id: str
    name: str


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Inclusive bounds on the key; None is unbounded."""

    start: int | None = None
    end: int | None = None


@dataclass(frozen=True, slots=True)
class SeriesStats:
    """Rows of one series in the requested range (duplicates included), its key bounds, and
    whether any row of the whole series is a duplicate (then reads must deduplicate)."""

    rows: int
    lo: int
    hi: int
    has_duplicates: bool


@dataclass(frozen=True, slots=True)
class SummaryRow:
    run_id: str
    name: str
    min_value: float
    max_value: float
    last_value: float
    last_step: int
    count: int


@dataclass(frozen=True, slots=True)
class Columns:
    """Points of a series in key order, column by column."""

    keys: list[int]
    values: list[float]
    others: list[int]


@dataclass(frozen=True, slots=True)
class BucketedSeries:
    first: Sample
    last: Sample | None
    buckets: list[Bucket]


@dataclass(frozen=True, slots=True)
class BucketRequest:
    ref: SeriesRef
    plan: BucketPlan
    method: Method
    dedup: bool


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class MetricQueries:
    def __init__(self, clickhouse: ClickHouse, *, timeout_s: float = 10.0) -> None:
        self._ch = clickhouse
        self._timeout_s = timeout_s
        # Series found free of duplicates, with their row count then (see `stats`).
        self._verified: OrderedDict[SeriesRef, int] = OrderedDict()

    async def _rows(self, sql: str) -> list[dict[str, Any]]:
        return await self._ch.query_rows(sql, timeout_s=self._timeout_s)

    # --- summaries ---------------------------------------------------------------------------

    async def summaries(
        self, run_ids: Sequence[str], names: Sequence[str] | None = None, *,
        counts_only: bool = False,
    ) -> list[SummaryRow]:
        """min/max/last/count per (run, metric) from the AggregatingMergeTree, merged now
        (`counts_only`: only the distinct step counts; the other fields are 0)."""
        if not run_ids or (names is not None and not names):
            return []
        where = f"run_id IN {quote_list(run_ids)}"
        if names is not None:
            where += f" AND name IN {quote_list(names)}"
        merged = ("0 AS mn, 0 AS mx, 0 AS lv, 0 AS ls" if counts_only else
                  "minMerge(min_value) AS mn, maxMerge(max_value) AS mx,"
                  " argMaxMerge(last_value) AS lv, maxMerge(last_step) AS ls")
        rows = await self._rows(
            f"SELECT run_id, name, {merged}, uniqExactMerge(step_count) AS c"
            f" FROM metrics_summary WHERE {where} GROUP BY run_id, name ORDER BY run_id, name"
        )
        return [
            SummaryRow(
                run_id=str(r["run_id"]), name=str(r["name"]), min_value=float(r["mn"]),
                max_value=float(r["mx"]), last_value=float(r["lv"]), last_step=int(r["ls"]),
                count=int(r["c"]),
            )
            for r in rows
        ]

    async def series_names(self, table: SeriesTable, run_ids: Sequence[str]) -> list[SeriesRef]:
        """Every (run, series name) that has points."""
        if not run_ids:
            return []
        source = "metrics_summary" if table.has_summary else table.table
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
        duplicate rows (a retried batch not yet merged away by ReplacingMergeTree).

        The duplicate check is exact where a summary exists: the whole series' row count
        equals its distinct step count (uniqExact over every row ever inserted) exactly when no
        step appears twice. That count deserializes the series' whole set of steps (~100 ms
        for 1M steps on 18.16), so a series found free of duplicates is remembered with its row
        count (`_verified`): as long as the count is unchanged, it still has none (rows come
        from inserts and leave only when a merge drops a duplicate; an unchanged count after
        such churn means every row added since was a duplicate and was dropped again). Without
        a summary (system metrics) reads always deduplicate. Series without rows in range are
        absent from the result."""
        if not refs:
            return {}
        run_ids = sorted({r.run_id for r in refs})
        names = sorted({r.name for r in refs})
        in_range = _range_condition(table.key, key_range, after_key=None)
        if in_range:
            counted = (f"countIf({in_range}) AS n, minIf({table.key}, {in_range}) AS lo,"
                       f" maxIf({table.key}, {in_range}) AS hi, count() AS whole")
        else:
            counted = f"count() AS n, min({table.key}) AS lo, max({table.key}) AS hi," \
                      " count() AS whole"
        identity, keys = _identity(run_ids, names)
        group = f" GROUP BY {', '.join(keys)}" if keys else ""
        rows = await self._rows(
            f"SELECT {identity}, {counted} FROM {table.table} WHERE run_id IN"
            f" {quote_list(run_ids)} AND name IN {quote_list(names)}{group}")
        wanted = set(refs)
        found = {SeriesRef(str(row["sr"]), str(row["sn"])): row for row in rows}
        found = {ref: row for ref, row in found.items() if ref in wanted and int(row["n"]) > 0}
        clean: set[SeriesRef] = set()
        if table.has_summary:
            clean = {ref for ref, row in found.items()
                     if self._verified.get(ref) == int(row["whole"])}
            unknown = [ref for ref in found if ref not in clean]
            if unknown:
                distinct = {(s.run_id, s.name): s.count for s in await self.summaries(
                    sorted({r.run_id for r in unknown}), sorted({r.name for r in unknown}),
                    counts_only=True)}
                for ref in unknown:
                    whole = int(found[ref]["whole"])
                    if distinct.get((ref.run_id, ref.name)) == whole:
                        clean.add(ref)
                        self._remember(ref, whole)
        return {
            ref: SeriesStats(rows=int(row["n"]), lo=int(row["lo"]), hi=int(row["hi"]),
                             has_duplicates=ref not in clean)
            for ref, row in found.items()
        }

    def _remember(self, ref: SeriesRef, rows: int) -> None:
        self._verified[ref] = rows
        self._verified.move_to_end(ref)
        while len(self._verified) > _MAX_VERIFIED_SERIES:
            self._verified.popitem(last=False)

    async def distinct_keys(
        self, table: SeriesTable, ref: SeriesRef, key_range: KeyRange
    ) -> int:
        """Distinct keys of one series in range (what `rows` means once duplicates collapse)."""
        where = _series_where(table, ref, key_range, after_key=None)
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
        for chunk in _chunks(sorted(wanted), _MAX_SERIES_PER_STATEMENT):
            source = _multi_source(table, chunk, key_range, after_key, dedup)
            rows = await self._rows(
                "SELECT sr, sn, groupArray(k) AS ks, groupArray(v) AS vs,"
                " groupArray(o) AS os FROM (SELECT sr, sn, k, v, o"
                f" FROM ({source}) ORDER BY sr, sn, k LIMIT {int(limit)} BY sr, sn)"
                " GROUP BY sr, sn"
            )
            for row in rows:
                ref = SeriesRef(str(row["sr"]), str(row["sn"]))
                if ref in wanted:
                    result[ref] = _columns(row)
        return result

    async def buckets(
        self, table: SeriesTable, requests: Sequence[BucketRequest]
    ) -> dict[SeriesRef, BucketedSeries]:
        """Per-bucket statistics of each series under its plan (see `downsampling`), over the
        plan's keys lo..hi (rows written since the plan was made beyond them are left out).
        One statement per (dedup, method) group, all its series in it."""
        groups: dict[tuple[bool, Method], list[BucketRequest]] = {}
        for request in requests:
            groups.setdefault((request.dedup, request.method), []).append(request)
        result: dict[SeriesRef, BucketedSeries] = {}
        for (dedup, method), members in groups.items():
            for chunk in _chunks(members, _MAX_SERIES_PER_STATEMENT):
                statement, series = _bucket_statement(table, chunk, dedup, method)
                for row in await self._rows(statement):
                    index = int(row["s"])
                    if index in series:
                        result[series[index].ref] = _bucketed(method, row)
        return result


# --------------------------------------------------------------------------- SQL building


def _range_condition(key: str, key_range: KeyRange, after_key: int | None) -> str:
    parts = []
    if key_range.start is not None:
        parts.append(f"{key} >= {int(key_range.start)}")
    if after_key is not None:
        parts.append(f"{key} > {int(after_key)}")
    if key_range.end is not None:
        parts.append(f"{key} <= {int(key_range.end)}")
    return " AND ".join(parts)


def _series_where(
    table: SeriesTable, ref: SeriesRef, key_range: KeyRange, after_key: int | None
) -> str:
    where = f"run_id = {quote_string(ref.run_id)} AND name = {quote_string(ref.name)}"
    condition = _range_condition(table.key, key_range, after_key)
    return f"{where} AND {condition}" if condition else where


def _identity(run_ids: Sequence[str], names: Sequence[str]) -> tuple[str, list[str]]:
    """The series' identity as columns `sr` (run) and `sn` (name), and the GROUP BY keys for
    it. A single run or name is a constant: grouping 1M rows by a String column costs about
    as much as reading them (measured), and most reads are of one run. (New names, not
    `run_id`/`name`: an alias shadows its column in WHERE.)"""
    keys: list[str] = []
    if len(run_ids) == 1:
        run = f"{quote_string(run_ids[0])} AS sr"
    else:
        run, keys = "run_id AS sr", ["run_id"]
    if len(names) == 1:
        name = f"{quote_string(names[0])} AS sn"
    else:
        name = "toString(name) AS sn"
        keys.append("name")
    return f"{run}, {name}", keys


def _multi_source(
    table: SeriesTable,
    refs: Sequence[SeriesRef],
    key_range: KeyRange,
    after_key: int | None,
    dedup: bool,
) -> str:
    """Points of every (run, name) of `refs`' runs x names as (sr, sn, k, v, o); one row
    per key when `dedup` (last write wins). Callers drop pairs they did not ask for."""
    run_ids = sorted({ref.run_id for ref in refs})
    names = sorted({ref.name for ref in refs})
    where = f"run_id IN {quote_list(run_ids)} AND name IN {quote_list(names)}"
    condition = _range_condition(table.key, key_range, after_key)
    if condition:
        where += f" AND {condition}"
    identity, keys = _identity(run_ids, names)
    if dedup:
        group = ", ".join([*keys, table.key])
        return (
            f"SELECT {identity}, {table.key} AS k, argMax(value, version) AS v,"
            f" argMax({table.other}, version) AS o"
            f" FROM {table.table} WHERE {where} GROUP BY {group}"
        )
    return (f"SELECT {identity}, {table.key} AS k, value AS v, {table.other} AS o"
            f" FROM {table.table} WHERE {where}")


# The columns each method needs per bucket, as (column, aggregate). Only what the selection
# reads is computed: every aggregate costs per row (measured: lttb's set over 1M rows ~45 ms,
# with the timestamps of its candidates ~70 ms, on chdb here). The first and last buckets hold
# one point each; any candidate column gives that point.
_LOW_HIGH = (("lk", "argMin(k, v)"), ("lv", "min(v)"), ("lo_", "argMin(o, v)"),
             ("hk", "argMax(k, v)"), ("hv", "max(v)"), ("ho", "argMax(o, v)"))
_FIRST = (("fk", "min(k)"), ("fv", "argMin(v, k)"), ("fo", "argMin(o, k)"))
_LAST = (("zk", "max(k)"), ("zv", "argMax(v, k)"), ("zo", "argMax(o, k)"))
_MEANS = (("mk", "avg(k)"), ("mv", "avg(v)"))
_HEAD = (("b", ""), ("n", "count()"))
_METHOD_COLUMNS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "lttb": _HEAD + _MEANS + _LOW_HIGH,
    "minmax": _HEAD + _LOW_HIGH + _FIRST + _LAST,
    "avg": _HEAD + _MEANS + (("mo", "avg(o)"),) + _FIRST,
}


def _int_array(values: Sequence[int]) -> str:
    return f"CAST([{', '.join(str(int(v)) for v in values)}], 'Array(Int64)')"


def _array(values: Sequence[str | int]) -> str:
    """An array literal (`transform` wants arrays; `quote_list` writes tuples)."""
    return "[" + quote_list(values)[1:-1] + "]"


def _bucket_statement(
    table: SeriesTable, requests: Sequence[BucketRequest], dedup: bool, method: Method
) -> tuple[str, dict[int, BucketRequest]]:
    """One statement bucketing every series of `requests` under its own plan, and the series
    number (column `s`, 1-based over runs x names) of each request.

    One scan serves every series: a row's series number comes from `transform` over the run
    and name, and its plan from literals when all plans agree, else from constant arrays
    (`arrayElement`). Array slots of pairs nobody asked for hold harmless values (span 1)."""
    run_ids = sorted({r.ref.run_id for r in requests})
    names = sorted({r.ref.name for r in requests})
    slots = len(run_ids) * len(names)
    lo, hi, count, width = ([0] * slots for _ in range(4))
    span, wanted = [1] * slots, [0] * slots
    series: dict[int, BucketRequest] = {}
    for request in requests:
        index = run_ids.index(request.ref.run_id) * len(names) + names.index(request.ref.name)
        plan = request.plan
        lo[index], hi[index], count[index] = plan.lo, plan.hi, plan.count
        span[index], width[index], wanted[index] = max(plan.span, 1), plan.width, 1
        series[index + 1] = request
    source = _multi_source(table, [r.ref for r in requests],
                           KeyRange(min(lo[i - 1] for i in series),
                                    max(hi[i - 1] for i in series)), None, dedup)
    plans = {(r.plan.lo, r.plan.hi, r.plan.count, r.plan.width) for r in requests}
    if len(requests) == 1:
        number = "1"  # one series (the metrics route): no per-row lookup at all
    else:
        number = (
            f"transform(sr, {_array(run_ids)}, {_array(range(len(run_ids)))}, 0)"
            f" * {len(names)} + transform(sn, {_array(names)}, {_array(range(len(names)))}, 0)"
            " + 1"
        )
    conditions = []
    if not all(wanted):
        conditions.append(f"arrayElement({_int_array(wanted)}, s) = 1")
    if len(plans) == 1:
        # Every series has the same plan (one series, or runs of one length): literals, and
        # the source's WHERE already keeps rows to lo..hi. Per-row array lookups cost more
        # than the aggregation itself (measured ~2.5x on 200k rows).
        plan = requests[0].plan
        row_columns = f"{number} AS s, k, v, o"
        bucket = _bucket_expression(str(int(plan.lo)), str(int(plan.hi)), str(int(plan.count)),
                                    str(max(int(plan.span), 1)), str(int(plan.width)),
                                    width_mode=bool(plan.width), proportional=not plan.width)
    else:
        row_columns = (
            f"{number} AS s, k, v, o,"
            f" arrayElement({_int_array(lo)}, s) AS lo, arrayElement({_int_array(hi)}, s) AS hi,"
            f" arrayElement({_int_array(count)}, s) AS c,"
            f" arrayElement({_int_array(span)}, s) AS span,"
            f" arrayElement({_int_array(width)}, s) AS w"
        )
        bucket = _bucket_expression("lo", "hi", "c", "span", "w",
                                    width_mode=any(width), proportional=not all(width))
        conditions.append("k >= lo AND k <= hi")
    statement = _bucket_sql(method, row_columns, source, bucket,
                            " AND ".join(conditions) or "1")
    return statement, series


def _bucket_expression(lo: str, hi: str, count: str, span: str, width: str, *,
                       width_mode: bool, proportional: bool) -> str:
    """`BucketPlan.index_of` as SQL over columns or literals. ClickHouse evaluates both
    branches of an `if`, so a mixed statement guards each divisor (`greatest(.., 1)`); a
    plan without interior buckets has count 0, which puts every interior key in bucket 0
    (only counted, never selected from)."""
    by_width = f"intDiv(k - {lo} - 1, greatest({width}, 1))"
    by_share = f"intDiv((k - {lo} - 1) * {count}, {span})"
    if width_mode and proportional:
        interior = f"if({width} > 0, {by_width}, {by_share})"
    else:
        interior = by_width if width_mode else by_share
    return f"if(k = {lo}, -1, if(k = {hi}, -2, {interior}))"


def _bucket_sql(method: Method, row_columns: str, source: str, bucket: str,
                condition: str) -> str:
    """The bucket statement: rows of `source` with `row_columns` (s, k, v, o and whatever
    `bucket` and `condition` read), grouped by series `s` and `bucket`."""
    columns = _METHOD_COLUMNS[method]
    aggregates = ", ".join(f"{expr} AS {name}" for name, expr in columns if expr)
    # One row per series: its buckets as parallel arrays (decoding ~1000 rows of a dozen
    # fields per series costs more than the query itself; arrays of numbers are cheap).
    arrays = ", ".join(f"groupArray({name}) AS {name}_a" for name, _ in columns)
    return (
        f"SELECT s, {arrays} FROM ("
        f"SELECT s, toInt64({bucket}) AS b, {aggregates}"
        f" FROM (SELECT {row_columns} FROM ({source}))"
        f" WHERE {condition} GROUP BY s, b ORDER BY s, b) GROUP BY s"
    )


def _columns(row: dict[str, Any]) -> Columns:
    keys = [int(k) for k in row["ks"]]
    values = [float(v) for v in row["vs"]]
    others = [int(o) for o in row["os"]]
    if not (len(keys) == len(values) == len(others)):
        raise BackendError("ClickHouse returned columns of different lengths",
                           backend="clickhouse", detail=f"{len(keys)}/{len(values)}/{len(others)}")
    if any(a >= b for a, b in itertools.pairwise(keys)):
        # groupArray keeps the subquery's order in practice; never trust it blindly.
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys = [keys[i] for i in order]
        values = [values[i] for i in order]
        others = [others[i] for i in order]
    return Columns(keys=keys, values=values, others=others)


def _bucketed(method: Method, row: dict[str, Any]) -> BucketedSeries:
    """A series' bucket arrays (one row of the bucket statement) as `downsampling` records.

    Hot (a thousand buckets per series, many series per comparison): arrays are zipped once
    rather than indexed per field. Values go through float() because ClickHouse writes an
    integral Float64 as `1`, which decodes to int."""
    count = len(row["b_a"])
    none = itertools.repeat(None, count)
    zeros = itertools.repeat(0.0, count)
    lows_highs: Any = (zip(row["lk_a"], row["lv_a"], row["lo__a"], row["hk_a"], row["hv_a"],
                           row["ho_a"], strict=True) if "lk_a" in row else none)
    firsts: Any = (zip(row["fk_a"], row["fv_a"], row["fo_a"], strict=True)
                   if "fk_a" in row else itertools.repeat(None, count))
    lasts: Any = (zip(row["zk_a"], row["zv_a"], row["zo_a"], strict=True)
                  if "zk_a" in row else itertools.repeat(None, count))
    means = zip(row.get("mk_a", zeros), row.get("mv_a", itertools.repeat(0.0, count)),
                row.get("mo_a", itertools.repeat(0.0, count)), strict=True)
    first: Sample | None = None
    last: Sample | None = None
    buckets: list[Bucket] = []
    for slot, size, (mean_k, mean_v, mean_o), low_high, head, tail in zip(
        row["b_a"], row["n_a"], means, lows_highs, firsts, lasts, strict=True,
    ):
        low = high = None
        if low_high is not None:
            lk, lv, lo, hk, hv, ho = low_high
            low, high = Sample(lk, float(lv), lo), Sample(hk, float(hv), ho)
        if slot < 0:
            # One point: whichever candidate column the method computed holds it.
            point = low if low is not None else Sample(head[0], float(head[1]), head[2])
            if slot == LAST_BUCKET:
                last = point
            else:
                first = point
            continue
        candidates: tuple[Sample, ...] = ()
        if low is not None and high is not None:
            candidates = (low, high) if low.key <= high.key else (high, low)
            if head is not None and tail is not None:
                candidates = (Sample(head[0], float(head[1]), head[2]), *candidates,
                              Sample(tail[0], float(tail[1]), tail[2]))
        buckets.append(Bucket(slot, size, float(mean_k), float(mean_v), float(mean_o),
                              candidates))
    if first is None:
        # Buckets are only requested for series with rows at lo (the planned first key).
        raise BackendError("the bucketed series lost its first point", backend="clickhouse")
    if any(a.slot >= b.slot for a, b in itertools.pairwise(buckets)):
        buckets.sort(key=lambda b: b.slot)  # the inner ORDER BY keeps them sorted in practice
    return BucketedSeries(first=first, last=last, buckets=buckets)
