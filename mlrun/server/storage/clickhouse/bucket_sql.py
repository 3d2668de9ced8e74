"""The SQL of downsampled series reads: bucketing points (or per-128-step block rollups) into
min/max, average or LTTB candidate rows inside ClickHouse, for ClickHouse 18.16 and chdb alike.

Pure statement builders (no I/O): `metric_reads` runs what these build and parses the rows.
Values are escaped client-side (`protocols.clickhouse`): 18.16 has no query parameters.
Must not import anything that does I/O, the edges or the use-cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from mlrun.server.domain.downsampling import (
    BlockPlan,
    BucketPlan,
    Method,
)
from mlrun.server.ports.metric_reads import (
    BLOCK_STEPS,
    METRICS,
    BucketRequest,
    KeyRange,
    SeriesRef,
    SeriesTable,
)
from mlrun.server.protocols.clickhouse import RowBinaryType, quote_list, quote_string


def range_condition(key: str, key_range: KeyRange, after_key: int | None) -> str:
    parts = []
    if key_range.start is not None:
        parts.append(f"{key} >= {int(key_range.start)}")
    if after_key is not None:
        parts.append(f"{key} > {int(after_key)}")
    if key_range.end is not None:
        parts.append(f"{key} <= {int(key_range.end)}")
    return " AND ".join(parts)


def series_where(
    table: SeriesTable, ref: SeriesRef, key_range: KeyRange, after_key: int | None
) -> str:
    where = f"run_id = {quote_string(ref.run_id)} AND name = {quote_string(ref.name)}"
    condition = range_condition(table.key, key_range, after_key)
    return f"{where} AND {condition}" if condition else where


def series_identity(run_ids: Sequence[str], names: Sequence[str] | None) -> tuple[str, list[str]]:
    """The series' identity as columns `sr` (run) and `sn` (name), and the GROUP BY keys for
    it (`names` None: any name). A single run or name is a constant: grouping 1M rows by a
    String column costs about as much as reading them (measured), and most reads are of one
    run. (New names, not `run_id`/`name`: an alias shadows its column in WHERE.)"""
    keys: list[str] = []
    if len(run_ids) == 1:
        run = f"{quote_string(run_ids[0])} AS sr"
    else:
        run, keys = "run_id AS sr", ["run_id"]
    if names is not None and len(names) == 1:
        name = f"{quote_string(names[0])} AS sn"
    else:
        name = "toString(name) AS sn"
        keys.append("name")
    return f"{run}, {name}", keys


def multi_source(
    table: SeriesTable,
    refs: Sequence[SeriesRef],
    key_range: KeyRange,
    after_key: int | None,
    dedup: bool,
    also: str = "",
) -> str:
    """Points of every (run, name) of `refs`' runs x names as (sr, sn, k, v, o); one row
    per key when `dedup` (last write wins); `also`: a further condition on the table's
    columns. Callers drop pairs they did not ask for."""
    run_ids = sorted({ref.run_id for ref in refs})
    names = sorted({ref.name for ref in refs})
    where = f"run_id IN {quote_list(run_ids)} AND name IN {quote_list(names)}"
    condition = range_condition(table.key, key_range, after_key)
    if condition:
        where += f" AND {condition}"
    if also:
        where += f" AND {also}"
    identity, keys = series_identity(run_ids, names)
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
LOW_HIGH = (("lk", "argMin(k, v)"), ("lv", "min(v)"), ("lo_", "argMin(o, v)"),
             ("hk", "argMax(k, v)"), ("hv", "max(v)"), ("ho", "argMax(o, v)"))


FIRST = (("fk", "min(k)"), ("fv", "argMin(v, k)"), ("fo", "argMin(o, k)"))


LAST = (("zk", "max(k)"), ("zv", "argMax(v, k)"), ("zo", "argMax(o, k)"))


MEANS = (("mk", "avg(k)"), ("mv", "avg(v)"))


HEAD = (("b", ""), ("n", "count()"))


METHOD_COLUMNS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "lttb": HEAD + MEANS + LOW_HIGH,
    "minmax": HEAD + LOW_HIGH + FIRST + LAST,
    "avg": HEAD + MEANS + (("mo", "avg(o)"),) + FIRST,
}

# Bucket columns holding keys, counts and timestamps (Int64); the rest are values and means
# (Float64). The per-series arrays are cast to exactly these types, so a bucket statement's
# result can be read as RowBinary (`bucket_row_types`): no parsed JSON number per bucket.
_INTEGER_COLUMNS: Final = frozenset({"b", "n", "lk", "lo_", "hk", "ho", "fk", "fo", "zk", "zo"})


def typed_arrays(columns: Sequence[str]) -> str:
    """`groupArray(toInt64(c)) AS c_a, ...`: each bucket column as an array of its type."""
    return ", ".join(
        f"groupArray({'toInt64' if c in _INTEGER_COLUMNS else 'toFloat64'}({c})) AS {c}_a"
        for c in columns)


def bucket_row_types(method: Method) -> tuple[RowBinaryType, ...]:
    """The RowBinary types of a (point or block) bucket statement's row: `s`, then the
    method's arrays in `METHOD_COLUMNS` order."""
    return ("Int64", *("Array(Int64)" if name in _INTEGER_COLUMNS else "Array(Float64)"
                       for name, _ in METHOD_COLUMNS[method]))


def bucket_row_names(method: Method) -> tuple[str, ...]:
    """The column names of a bucket statement's row, as `bucket_row_types` orders them."""
    return ("s", *(f"{name}_a" for name, _ in METHOD_COLUMNS[method]))


def int_array(values: Sequence[int]) -> str:
    return f"CAST([{', '.join(str(int(v)) for v in values)}], 'Array(Int64)')"


def array(values: Sequence[str | int]) -> str:
    """An array literal (`transform` wants arrays; `quote_list` writes tuples)."""
    return "[" + quote_list(values)[1:-1] + "]"


def bucket_statement(
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
    plans_of = {r.ref: point_plan(r) for r in requests}
    for request in requests:
        index = run_ids.index(request.ref.run_id) * len(names) + names.index(request.ref.name)
        plan = plans_of[request.ref]
        lo[index], hi[index], count[index] = plan.lo, plan.hi, plan.count
        span[index], width[index], wanted[index] = max(plan.span, 1), plan.width, 1
        series[index + 1] = request
    source = multi_source(table, [r.ref for r in requests],
                           KeyRange(min(lo[i - 1] for i in series),
                                    max(hi[i - 1] for i in series)), None, dedup)
    plans = {(p.lo, p.hi, p.count, p.width) for p in plans_of.values()}
    if len(requests) == 1:
        number = "1"  # one series (the metrics route): no per-row lookup at all
    else:
        number = (
            f"transform(sr, {array(run_ids)}, {array(range(len(run_ids)))}, 0)"
            f" * {len(names)} + transform(sn, {array(names)}, {array(range(len(names)))}, 0)"
            " + 1"
        )
    conditions = []
    if not all(wanted):
        conditions.append(f"arrayElement({int_array(wanted)}, s) = 1")
    if len(plans) == 1:
        # Every series has the same plan (one series, or runs of one length): literals, and
        # the source's WHERE already keeps rows to lo..hi. Per-row array lookups cost more
        # than the aggregation itself (measured ~2.5x on 200k rows).
        plan = plans_of[requests[0].ref]
        row_columns = f"{number} AS s, k, v, o"
        bucket = bucket_expression(str(int(plan.lo)), str(int(plan.hi)), str(int(plan.count)),
                                    str(max(int(plan.span), 1)), str(int(plan.width)),
                                    width_mode=bool(plan.width), proportional=not plan.width)
    else:
        row_columns = (
            f"{number} AS s, k, v, o,"
            f" arrayElement({int_array(lo)}, s) AS lo, arrayElement({int_array(hi)}, s) AS hi,"
            f" arrayElement({int_array(count)}, s) AS c,"
            f" arrayElement({int_array(span)}, s) AS span,"
            f" arrayElement({int_array(width)}, s) AS w"
        )
        bucket = bucket_expression("lo", "hi", "c", "span", "w",
                                    width_mode=any(width), proportional=not all(width))
        conditions.append("k >= lo AND k <= hi")
    statement = bucket_sql(method, row_columns, source, bucket,
                            " AND ".join(conditions) or "1")
    return statement, series


def point_plan(request: BucketRequest) -> BucketPlan:
    if not isinstance(request.plan, BucketPlan):
        raise TypeError("a block plan reached the point bucketing statement")
    return request.plan


def popcount_sql(x: str) -> str:
    """Set bits of the UInt64 `x` in SQL (18.16 has no bitCount): the SWAR popcount, whose
    final multiply wraps modulo 2^64 on both server generations (tested)."""
    m1, m2 = "toUInt64(6148914691236517205)", "toUInt64(3689348814741910323)"
    m4, h01 = "toUInt64(1085102592571150095)", "toUInt64(72340172838076673)"
    pairs = f"({x} - bitAnd(bitShiftRight({x}, 1), {m1}))"
    nibbles = f"(bitAnd({pairs}, {m2}) + bitAnd(bitShiftRight({pairs}, 2), {m2}))"
    octets = f"bitAnd({nibbles} + bitShiftRight({nibbles}, 4), {m4})"
    return f"toUInt64(bitShiftRight({octets} * {h01}, 56))"


# Per block (merged states) then per bucket (over blocks), for each bucket column the methods
# read: (column, per-block merges it needs, per-bucket aggregate). Names match METHOD_COLUMNS
# so one decoder serves both statements.
BLOCK_MERGES: Final[dict[str, str]] = {
    "bn": "countMerge(rows)", "bsk": "sumMerge(sum_step)", "bsv": "sumMerge(sum_value)",
    "bso": "sumMerge(sum_time)",
    "bfk": "minMerge(first_step)", "bfv": "argMinMerge(first_value)",
    "bfo": "argMinMerge(first_time)",
    "bzk": "maxMerge(last_step)", "bzv": "argMaxMerge(last_value)",
    "bzo": "argMaxMerge(last_time)",
    "blv": "minMerge(low_value)", "blk": "argMinMerge(low_step)", "blo": "argMinMerge(low_time)",
    "bhv": "maxMerge(high_value)", "bhk": "argMaxMerge(high_step)",
    "bho": "argMaxMerge(high_time)",
}


BLOCK_BUCKET_COLUMNS: Final[dict[str, tuple[tuple[str, ...], str]]] = {
    "n": (("bn",), "sum(bn)"),
    "mk": (("bn", "bsk"), "sum(bsk) / sum(bn)"),
    "mv": (("bn", "bsv"), "sum(bsv) / sum(bn)"),
    "mo": (("bn", "bso"), "sum(bso) / sum(bn)"),
    "fk": (("bfk",), "min(bfk)"), "fv": (("bfv", "bfk"), "argMin(bfv, bfk)"),
    "fo": (("bfo", "bfk"), "argMin(bfo, bfk)"),
    "zk": (("bzk",), "max(bzk)"), "zv": (("bzv", "bzk"), "argMax(bzv, bzk)"),
    "zo": (("bzo", "bzk"), "argMax(bzo, bzk)"),
    "lk": (("blk", "blv"), "argMin(blk, blv)"), "lv": (("blv",), "min(blv)"),
    "lo_": (("blo", "blv"), "argMin(blo, blv)"),
    "hk": (("bhk", "bhv"), "argMax(bhk, bhv)"), "hv": (("bhv",), "max(bhv)"),
    "ho": (("bho", "bhv"), "argMax(bho, bhv)"),
}


def block_bucket_statement(
    requests: Sequence[BucketRequest], method: Method
) -> tuple[str, dict[int, BucketRequest]]:
    """One statement bucketing every series of `requests` (block plans, whole series without
    duplicates) over `metric_blocks`: the states a method reads merged per block (each merge
    costs per block row), then blocks combined per bucket."""
    run_ids = sorted({r.ref.run_id for r in requests})
    names = sorted({r.ref.name for r in requests})
    series: dict[int, BucketRequest] = {}
    first_block, last_block, group = ([1] * (len(run_ids) * len(names)) for _ in range(3))
    for request in requests:
        plan = request.plan
        if not isinstance(plan, BlockPlan):
            raise TypeError("a point plan reached the block bucketing statement")
        index = run_ids.index(request.ref.run_id) * len(names) + names.index(request.ref.name)
        first_block[index], last_block[index], group[index] = (plan.first_block,
                                                               plan.last_block, plan.group)
        series[index + 1] = request
    wanted = [0] * len(first_block)
    for index in series:
        wanted[index - 1] = 1
    identity, keys = series_identity(run_ids, names)
    if len(requests) == 1:
        number, condition = "1", "1"
    else:
        number = (
            f"transform(sr, {array(run_ids)}, {array(range(len(run_ids)))}, 0)"
            f" * {len(names)} + transform(sn, {array(names)}, {array(range(len(names)))}, 0)"
            " + 1"
        )
        condition = f"arrayElement({int_array(wanted)}, s) = 1"
    columns = [name for name, _ in METHOD_COLUMNS[method] if name != "b"]
    plans = {(first_block[i - 1], last_block[i - 1], group[i - 1]) for i in series}
    if len(plans) == 1:
        ((lo_block, hi_block, width),) = plans
        first_expr, last_expr, group_expr = str(lo_block), str(hi_block), str(width)
    else:
        first_expr = f"arrayElement({int_array(first_block)}, s)"
        last_expr = f"arrayElement({int_array(last_block)}, s)"
        group_expr = f"arrayElement({int_array(group)}, s)"
    where = (f"run_id IN {quote_list(run_ids)} AND name IN {quote_list(names)}"
             f" AND block >= {min(first_block[i - 1] for i in series)}"
             f" AND block <= {max(last_block[i - 1] for i in series)}")
    merged, aggregates, arrays = block_bucket_parts(columns, BLOCK_MERGES)
    per_block = (f"SELECT {identity}, block, {merged} FROM metric_blocks WHERE {where}"
                 f" GROUP BY {', '.join([*keys, 'block'])}")
    statement = (
        f"SELECT toInt64(s) AS s, {arrays} FROM ("
        f"SELECT s, toInt64(intDiv(block - {first_expr}, {group_expr})) AS b, {aggregates}"
        f" FROM (SELECT {number} AS s, * FROM ({per_block}))"
        f" WHERE {condition} AND block >= {first_expr} AND block <= {last_expr}"
        " GROUP BY s, b ORDER BY s, b) GROUP BY s"
    )
    return statement, series


# The per-block columns of BLOCK_MERGES computed from points (k, v, o) instead of states, in
# the same order and types, so the two can be combined with UNION ALL.
BLOCK_FROM_POINTS: Final[dict[str, str]] = {
    "bn": "count()", "bsk": "sum(toFloat64(k))", "bsv": "sum(v)", "bso": "sum(toFloat64(o))",
    "bfk": "min(k)", "bfv": "argMin(v, k)", "bfo": "argMin(o, k)",
    "bzk": "max(k)", "bzv": "argMax(v, k)", "bzo": "argMax(o, k)",
    "blv": "min(v)", "blk": "argMin(k, v)", "blo": "argMin(o, v)",
    "bhv": "max(v)", "bhk": "argMax(k, v)", "bho": "argMax(o, v)",
}


def block_bucket_parts(columns: Sequence[str],
                        per_block: dict[str, str]) -> tuple[str, str, str]:
    """SQL pieces of a block bucket statement for bucket `columns`: the per-block columns
    they need (from `per_block`: states or points), the per-bucket aggregates, and the
    per-series arrays of those."""
    needed = dict.fromkeys(m for c in columns for m in BLOCK_BUCKET_COLUMNS[c][0])
    return (", ".join(f"{per_block[m]} AS {m}" for m in needed),
            ", ".join(f"{BLOCK_BUCKET_COLUMNS[c][1]} AS {c}" for c in columns),
            typed_arrays(["b", *columns]))


def dirty_block_bucket_statement(request: BucketRequest) -> str:
    """The block bucket statement of one series whose `dirty` blocks are computed from their
    points, deduplicated (last write wins), rather than from their rollups. Always carries
    the first/last columns: the series' edges may lie in a dirty block. For a step range the
    two edge blocks are among `dirty` and only their points inside the range count; every
    other block of the plan lies wholly inside the range."""
    plan = request.plan
    if not isinstance(plan, BlockPlan):
        raise TypeError("a point plan reached the block bucketing statement")
    ref, method = request.ref, request.method
    columns = list(dict.fromkeys([*(n for n, _ in METHOD_COLUMNS[method] if n != "b"),
                                  *(n for n, _ in FIRST + LAST)]))
    dirty = quote_list(list(request.dirty))
    merged, aggregates, arrays = block_bucket_parts(columns, BLOCK_MERGES)
    clean_blocks = (
        f"SELECT block, {merged} FROM metric_blocks WHERE run_id = {quote_string(ref.run_id)}"
        f" AND name = {quote_string(ref.name)} AND block >= {plan.first_block}"
        f" AND block <= {plan.last_block} AND block NOT IN {dirty} GROUP BY block"
    )
    points = multi_source(METRICS, [ref], request.key_range, None, dedup=True,
                           also=f"intDiv(step, {BLOCK_STEPS}) IN {dirty}")
    from_points, _, _ = block_bucket_parts(columns, BLOCK_FROM_POINTS)
    dirty_blocks = (f"SELECT intDiv(k, {BLOCK_STEPS}) AS block, {from_points}"
                    f" FROM ({points}) GROUP BY block")
    return (
        f"SELECT 1 AS s, {arrays} FROM ("
        f"SELECT toInt64(intDiv(block - {plan.first_block}, {plan.group})) AS b, {aggregates}"
        f" FROM ({clean_blocks} UNION ALL {dirty_blocks})"
        f" WHERE block >= {plan.first_block} AND block <= {plan.last_block}"
        " GROUP BY b ORDER BY b)"
    )


def edge_statement(requests: Sequence[BucketRequest]) -> str:
    """First and last point of the edge blocks of every block-planned series (`sr`, `sn`,
    `block`, fk/fv/fo, zk/zv/zo); callers pick each series' own two blocks."""
    run_ids = sorted({r.ref.run_id for r in requests})
    names = sorted({r.ref.name for r in requests})
    blocks = sorted({b for r in requests if isinstance(r.plan, BlockPlan)
                     for b in (r.plan.first_block, r.plan.last_block)})
    identity, keys = series_identity(run_ids, names)
    return (
        f"SELECT {identity}, block, minMerge(first_step) AS fk, argMinMerge(first_value) AS fv,"
        " argMinMerge(first_time) AS fo, maxMerge(last_step) AS zk,"
        " argMaxMerge(last_value) AS zv, argMaxMerge(last_time) AS zo FROM metric_blocks"
        f" WHERE run_id IN {quote_list(run_ids)} AND name IN {quote_list(names)}"
        f" AND block IN {quote_list(blocks)} GROUP BY {', '.join([*keys, 'block'])}"
    )


def bucket_expression(lo: str, hi: str, count: str, span: str, width: str, *,
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


def bucket_sql(method: Method, row_columns: str, source: str, bucket: str,
                condition: str) -> str:
    """The bucket statement: rows of `source` with `row_columns` (s, k, v, o and whatever
    `bucket` and `condition` read), grouped by series `s` and `bucket`."""
    columns = METHOD_COLUMNS[method]
    aggregates = ", ".join(f"{expr} AS {name}" for name, expr in columns if expr)
    # One row per series: its buckets as parallel arrays (decoding ~1000 rows of a dozen
    # fields per series costs more than the query itself; arrays of numbers are cheap).
    arrays = typed_arrays([name for name, _ in columns])
    return (
        f"SELECT toInt64(s) AS s, {arrays} FROM ("
        f"SELECT s, toInt64({bucket}) AS b, {aggregates}"
        f" FROM (SELECT {row_columns} FROM ({source}))"
        f" WHERE {condition} GROUP BY s, b ORDER BY s, b) GROUP BY s"
    )
