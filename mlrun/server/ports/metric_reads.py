"""The metric-read port: the records of series reads and the `MetricReads` interface that
`mlrun.server.usecases.queries` uses; `mlrun.server.storage.clickhouse.metric_reads.MetricQueries`
implements it. Must not import storage or edges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from mlrun.server.domain.downsampling import (
    BlockPlan,
    Bucket,
    BucketPlan,
    LttbColumns,
    Method,
    Sample,
)

# Steps per row of `metric_blocks` (sql/clickhouse/0002_metric_blocks.sql: intDiv(step, 128)).
BLOCK_STEPS: Final = 128


@dataclass(frozen=True, slots=True)
class SeriesTable:
    """A table of points: `key` is the axis a series is ordered and deduplicated by;
    `has_blocks`: the table has a summary and block rollups (metrics, not system metrics)."""

    table: str
    key: str
    other: str
    has_blocks: bool


METRICS: Final = SeriesTable("metrics", key="step", other="timestamp_ms", has_blocks=True)


SYSTEM_METRICS: Final = SeriesTable(
    "system_metrics", key="timestamp_ms", other="step", has_blocks=False
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
    """One series in the requested range: its rows, its key bounds, and whether any of its
    steps was written twice (then reads must deduplicate). `rows_distinct`: `rows` counts
    distinct keys (else rows, duplicates included). `dirty_blocks`: the blocks of the range
    to compute from points, sorted (the others can be read from the block rollups): the
    series' dirty blocks in range, and for a step range also its two edge blocks (partly
    outside the range); None for system metrics, or when the dirty blocks are too many to
    list."""

    rows: int
    lo: int
    hi: int
    has_duplicates: bool
    rows_distinct: bool = False
    dirty_blocks: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class BlockStats:
    """A series as its block rollups see it: rows ever written, distinct steps, first and last
    step, and the dirty blocks (a step written twice), None when more than we list."""

    rows: int
    distinct: int
    lo: int
    hi: int
    dirty: tuple[int, ...] | None


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
    """Bucket statistics of one series: as `Bucket` records, or for lttb as columns
    (`lttb`, with `buckets` empty)."""

    first: Sample
    last: Sample | None
    buckets: list[Bucket]
    total: int  # points of the series in the planned range
    lttb: LttbColumns | None = None


@dataclass(frozen=True, slots=True)
class BucketRequest:
    """A series to bucket: over its points (`BucketPlan`) or over its block rollups
    (`BlockPlan`, only for a whole series: see `SeriesStats.dirty_blocks`; `dirty` are the blocks
    to compute from points instead)."""

    ref: SeriesRef
    plan: BucketPlan | BlockPlan
    method: Method
    dedup: bool
    dirty: tuple[int, ...] = ()
    # The step range read: under a BlockPlan the blocks computed from points (`dirty`, which
    # then include the range's two edge blocks) count only their points inside it.
    key_range: KeyRange = KeyRange()


def whole_series_stats(blocks: dict[SeriesRef, BlockStats]) -> dict[SeriesRef, SeriesStats]:
    """`SeriesStats` of whole series (no key range) from their `BlockStats`."""
    return {
        ref: SeriesStats(rows=b.distinct, lo=b.lo, hi=b.hi, has_duplicates=b.dirty != (),
                         rows_distinct=True,
                         dirty_blocks=b.dirty)
        for ref, b in blocks.items() if b.distinct > 0
    }


class MetricReads(Protocol):
    """Metric series reads (ClickHouse): summaries, block statistics, pages and buckets."""

    async def summaries(
        self, run_ids: Sequence[str], names: Sequence[str] | None = None, *,
        with_counts: bool = True,
    ) -> list[SummaryRow]:
        """min/max/last per (run, metric) from the AggregatingMergeTree, merged now; the count
        (distinct steps) from the block rollups. `with_counts=False` (callers that show no
        count, like the MLflow edge) skips the block rollups' statement: `count` is then 0."""
        ...

    async def block_stats(
        self, run_ids: Sequence[str], names: Sequence[str] | None
    ) -> dict[SeriesRef, BlockStats]:
        """`BlockStats` of every series of `run_ids` (x `names`, all names when None).

        Computing them merges five states per block (~13 ms for a 1M-step series on 18.16);
        counting a series' rows merges one state over all its blocks at once (~3 ms). The rows
        a series was ever written grow with every insert and nothing else changes its blocks,
        so stats computed at a row count stay exact while that count does: they are cached
        per series (LRU) and recomputed only for series whose count moved."""
        ...

    async def series_names(self, table: SeriesTable, run_ids: Sequence[str]) -> list[SeriesRef]:
        """Every (run, series name) that has points."""
        ...

    async def last_values(self, name: str, run_ids: Sequence[str]) -> dict[str, float]:
        """The last value (highest step, then latest write) of metric `name` per run."""
        ...

    async def stats(
        self, table: SeriesTable, refs: Sequence[SeriesRef], key_range: KeyRange
    ) -> dict[SeriesRef, SeriesStats]:
        """Rows and key bounds in `key_range` per series, and whether the series holds
        duplicate rows (a step written twice, not yet merged away by ReplacingMergeTree).

        Metrics answer from the block rollups (see `block_stats`), exact and cheap: a series
        has duplicates when a block in range is dirty. A whole-series read needs nothing else;
        a range also counts its rows in `metrics`. System metrics have no rollups: their reads
        always deduplicate. Series without rows in range are absent from the result."""
        ...

    async def distinct_keys(
        self, table: SeriesTable, ref: SeriesRef, key_range: KeyRange
    ) -> int:
        """Distinct keys of one series in range (what `rows` means once duplicates collapse)."""
        ...

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
        ...

    async def buckets(
        self, table: SeriesTable, requests: Sequence[BucketRequest]
    ) -> dict[SeriesRef, BucketedSeries]:
        """Per-bucket statistics of each series under its plan (see `downsampling`), over the
        plan's keys lo..hi (rows written since the plan was made beyond them are left out).
        One statement per (dedup, method) group, all its series in it."""
        ...
