"""The read API's payloads as msgspec Structs: query-string records, request bodies and responses
of run listing, run detail, metric series, system metrics and run comparison (rendered into
/openapi.json like every other schema).

Conventions (as in `mlrun.wire.schemas`): fields ending in `_at` are ISO-8601 UTC strings with
milliseconds and a `Z`; `timestamp` fields are epoch milliseconds. Query-string records forbid
unknown parameters, so a misspelt filter is a 400 naming it instead of a silently unfiltered
listing. Their optional fields default to `UNSET`, never None: a query string has no null, and
`start_step=null` must be a 400, not "no bound". Limits are declared here with `Meta` so they
appear in the OpenAPI document; the grammar of the filter strings (`tags`, `params`, `sort`)
is parsed by `mlrun.server.usecases.queries`.

Must not import anything from `mlrun.server` or `mlrun.sdk`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from mlrun.wire.schemas import Name, Request, RunId, RunStatus

MAX_PAGE_RUNS = 1000
DEFAULT_PAGE_RUNS = 100
MAX_SERIES_POINTS = 100_000
DEFAULT_MAX_POINTS = 1000
DEFAULT_RAW_PAGE_POINTS = 10_000
MAX_COMPARE_RUNS = 100
MAX_COMPARE_POINTS = 10_000
DEFAULT_COMPARE_POINTS = 500
MAX_NAMES_PER_QUERY = 100
MAX_FILTER_CHARS = 2048

DownsampleMethod = Literal["lttb", "minmax", "avg", "raw"]
# How a series' points travel: `points`, one object per point (the default), or `columns`,
# three arrays `steps`, `values`, `timestamps` (about 2.4x smaller; what the web UI reads).
SeriesLayout = Literal["points", "columns"]
CompareMethod = Literal["lttb", "minmax", "avg"]
Alignment = Literal["step", "relative_time", "absolute_time"]

IsoTimestamp = Annotated[
    str,
    Meta(
        max_length=64,
        description="ISO-8601 date-time; without an offset it is taken as UTC",
        extra_json_schema={"format": "date-time"},
    ),
]
FilterText = Annotated[str, Meta(max_length=MAX_FILTER_CHARS)]
Cursor = Annotated[str, Meta(max_length=4096, pattern=r"^[A-Za-z0-9_-]*$",
                             description="next_cursor of the previous page (opaque)")]
NonNegative = Annotated[int, Meta(ge=0, le=2**63 - 1)]


class Query(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of query-string records: unknown parameters are refused."""


# --- run listing ------------------------------------------------------------------------------


class ListRunsQuery(Query, frozen=True):
    project: Annotated[str, Meta(max_length=100, description="project name")] | UnsetType = UNSET
    status: Annotated[
        str, Meta(max_length=64, description="comma list of running, finished, failed, killed")
    ] | UnsetType = UNSET
    tags: Annotated[
        FilterText,
        Meta(description="comma list of `k` (has tag k) or `k=v`; `\\` escapes `,` `=` `\\`"),
    ] | UnsetType = UNSET
    params: Annotated[
        FilterText,
        Meta(description="comma list of `k=v`, `k!=v` (text), or `k>x`, `k>=x`, `k<x`, `k<=x`"
             " (numeric: matches params whose stored value is a number)"),
    ] | UnsetType = UNSET
    q: Annotated[
        FilterText, Meta(description="case-insensitive substring of the run name or id")
    ] | UnsetType = UNSET
    created_after: IsoTimestamp | UnsetType = UNSET
    created_before: IsoTimestamp | UnsetType = UNSET
    sort: Annotated[
        str,
        Meta(max_length=300,
             description="created_at, updated_at, name, status, duration or metric:<name>;"
                         " a leading `-` sorts descending"),
    ] = "-created_at"
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE_RUNS)] = DEFAULT_PAGE_RUNS
    cursor: Cursor | UnsetType = UNSET
    include_total: bool = False


class RunSummary(Struct, frozen=True, kw_only=True):
    run_id: str
    project: str
    name: str
    status: RunStatus
    created_at: str
    updated_at: str
    finished_at: str | None
    duration_s: float | None
    tags: dict[str, str]
    params: dict[str, str]


class RunPage(Struct, frozen=True, kw_only=True):
    runs: list[RunSummary]
    next_cursor: str | None
    total: int | None = None


# --- run detail -------------------------------------------------------------------------------


class MetricSummary(Struct, frozen=True, kw_only=True):
    name: str
    last_value: float
    last_step: int
    min: float
    max: float
    count: int


class RunDetail(Struct, frozen=True, kw_only=True):
    run_id: str
    project: str
    name: str
    status: RunStatus
    created_at: str
    updated_at: str
    finished_at: str | None
    last_heartbeat_at: str | None
    duration_s: float | None
    tags: dict[str, str]
    params: dict[str, str]
    artifacts_count: int
    metrics_summary: list[MetricSummary]


# --- metric series ----------------------------------------------------------------------------

_NAMES_DESCRIPTION = "comma list of series names (`\\` escapes `,`); empty: every series"
_MAX_POINTS_DESCRIPTION = (
    "downsampling budget per series (raw: page size; default 1000, raw 10000)"
)
_LAYOUT_DESCRIPTION = (
    "points (default): `points: [{step, value, timestamp}]` per series; columns: the same"
    " points as `steps`, `values`, `timestamps` arrays of equal length instead"
)
Layout = Annotated[SeriesLayout, Meta(description=_LAYOUT_DESCRIPTION)]


class MetricsQuery(Query, frozen=True):
    names: Annotated[FilterText, Meta(description=_NAMES_DESCRIPTION)] | UnsetType = UNSET
    max_points: Annotated[
        int, Meta(ge=2, le=MAX_SERIES_POINTS, description=_MAX_POINTS_DESCRIPTION)
    ] | UnsetType = UNSET
    start_step: NonNegative | UnsetType = UNSET
    end_step: NonNegative | UnsetType = UNSET
    method: DownsampleMethod = "lttb"
    cursor: Cursor | UnsetType = UNSET
    layout: Layout = "points"


class SystemMetricsQuery(Query, frozen=True):
    names: Annotated[FilterText, Meta(description=_NAMES_DESCRIPTION)] | UnsetType = UNSET
    max_points: Annotated[
        int, Meta(ge=2, le=MAX_SERIES_POINTS, description=_MAX_POINTS_DESCRIPTION)
    ] | UnsetType = UNSET
    start_ms: Annotated[NonNegative, Meta(description="epoch ms, inclusive")] | UnsetType = UNSET
    end_ms: Annotated[NonNegative, Meta(description="epoch ms, inclusive")] | UnsetType = UNSET
    method: DownsampleMethod = "lttb"
    cursor: Cursor | UnsetType = UNSET
    layout: Layout = "points"


class SeriesPoint(Struct, frozen=True, gc=False):
    """A stored point, or (method avg) a bucket's mean: step and timestamp are then rounded
    means. In a comparison aligned by relative time, `timestamp` is ms since the run's start."""

    step: int
    value: float
    timestamp: int


class Series(Struct, frozen=True, kw_only=True):
    """A series' points in one of two layouts (`SeriesLayout`): `points`, or `steps`, `values`
    and `timestamps`; the fields of the other layout are left out of the answer."""

    name: str
    points: list[SeriesPoint] | UnsetType = UNSET
    steps: list[int] | UnsetType = UNSET
    values: list[float] | UnsetType = UNSET
    timestamps: list[int] | UnsetType = UNSET
    # Points stored in the requested range, each step (system metrics: timestamp) once.
    total_points: int
    downsampled: bool
    method: DownsampleMethod
    # Raw paging only: pass as `cursor` for the next page; null on the last page.
    next_cursor: str | None = None

    def as_columns(self) -> tuple[list[int], list[float], list[int]]:
        """(steps, values, timestamps), whichever layout the series holds."""
        if isinstance(self.points, list):
            return ([p.step for p in self.points], [p.value for p in self.points],
                    [p.timestamp for p in self.points])
        return (self.steps if isinstance(self.steps, list) else [],
                self.values if isinstance(self.values, list) else [],
                self.timestamps if isinstance(self.timestamps, list) else [])

    def as_points(self) -> list[SeriesPoint]:
        """The points, whichever layout the series holds."""
        if isinstance(self.points, list):
            return self.points
        return list(map(SeriesPoint, *self.as_columns()))


class MetricsResult(Struct, frozen=True, kw_only=True):
    run_id: str
    series: list[Series]
    available_metrics: list[str]


# --- comparison -------------------------------------------------------------------------------


class CompareRuns(Request, frozen=True):
    run_ids: Annotated[list[RunId], Meta(min_length=1, max_length=MAX_COMPARE_RUNS)]
    metric_names: Annotated[list[Name], Meta(max_length=MAX_NAMES_PER_QUERY)] | None = None
    alignment: Alignment = "step"
    max_points: Annotated[int, Meta(ge=2, le=MAX_COMPARE_POINTS)] = DEFAULT_COMPARE_POINTS
    method: CompareMethod = "lttb"
    layout: Layout = "points"


class ComparedRun(Struct, frozen=True, kw_only=True):
    run_id: str
    project: str
    name: str
    status: RunStatus
    started_at: str
    series: list[Series]


class CompareResult(Struct, frozen=True, kw_only=True):
    alignment: Alignment
    # Metric names every compared run has.
    common_metrics: list[str]
    runs: list[ComparedRun]
