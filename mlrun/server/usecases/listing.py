"""The run-listing grammar: what `GET /api/v1/runs` and gRPC `ListRuns` accept, parsed into a
`RunListing` (a `RunFilter` of the run-read port, a sort, paging), with its limits.

    tags     comma list of `k` (has tag k) or `k=v`
    params   comma list of `k=v`, `k!=v` (text) or `k>x`, `k>=x`, `k<x`, `k<=x` (numeric)
    status   comma list of running, finished, failed, killed
    sort     created_at, updated_at, name, status, duration or metric:<name>; `-` descending
    `\\` escapes `,` `=` `\\` inside an item

Every error is 400 `invalid_field` (or `too_many_filter_terms`, `value_too_long`) naming the
parameter. Pure functions: no I/O. Must not import storage or the edges.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TypeVar, cast, get_args

from msgspec import UnsetType

from mlrun.server.errors import InvalidInput
from mlrun.server.ports.run_reads import (
    ParamFilter,
    ParamOp,
    RunFilter,
    SortColumn,
    TagFilter,
)
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.query_schemas import (
    MAX_PAGE_RUNS,
    ListRunsQuery,
)
from mlrun.wire.schemas import RunStatus

T = TypeVar("T")


RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)


SORT_COLUMNS: tuple[SortColumn, ...] = ("created_at", "updated_at", "name", "status", "duration")


METRIC_SORT_PREFIX = "metric:"


# Filter terms per listing, for tags and for params each: every term is one semi-join for
# PostgreSQL to plan and run, so their number is what makes a listing expensive (the probe kept
# PostgreSQL busy for seconds with 100-200 terms). Names and values within the stored limits.
MAX_FILTER_TERMS = 16


MAX_FILTER_NAME_CHARS = 250


MAX_FILTER_VALUE_CHARS = 2048


# A numeric param operand: a plain decimal number; exponents beyond this are refused (they
# could not match a stored value anyway, see run_queries.NUMERIC_VALUE).
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


_MAX_NUMBER_EXPONENT = 1000


_PARAM_OPERATORS: tuple[ParamOp, ...] = (">=", "<=", "!=", ">", "<", "=")


def invalid_field(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", code=ErrorCode.INVALID_FIELD, field=field)


def check_text(value: str, field: str) -> str:
    """Refuse NUL (PostgreSQL text cannot hold it, so it can never match)."""
    if "\x00" in value:
        raise invalid_field(field, "must not contain NUL characters")
    return value


def split_list(text: str, *, field: str) -> list[str]:
    """Split a comma list; `\\,` is a literal comma and `\\\\` a backslash. Escapes other than
    these stay in the items (so `\\=` still reaches `split_item`). Empty items are dropped."""
    check_text(text, field)
    items: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append(char if char in ",\\" else "\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise invalid_field(field, "ends with a lone backslash")
    items.append("".join(current))
    return [item for item in items if item]


def unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def split_item(item: str, operators: Sequence[str], *, field: str) -> tuple[str, str, str] | None:
    """(key, operator, value) at the first unescaped operator (longest first), or None."""
    index = 0
    while index < len(item):
        char = item[index]
        if char == "\\":
            index += 2
            continue
        for operator in operators:
            if item.startswith(operator, index):
                key = unescape(item[:index])
                if not key:
                    raise invalid_field(field, f"{item!r} has no name before {operator!r}")
                return key, operator, unescape(item[index + len(operator):])
        index += 1
    return None


def _check_terms(items: Sequence[str], field: str) -> None:
    if len(items) > MAX_FILTER_TERMS:
        raise InvalidInput(f"{field}: at most {MAX_FILTER_TERMS} terms per listing (got "
                           f"{len(items)}); narrow the filter",
                               code=ErrorCode.TOO_MANY_FILTER_TERMS,
                           field=field)


def _check_term_lengths(field: str, key: str, value: str | None) -> None:
    if len(key) > MAX_FILTER_NAME_CHARS or (value is not None
                                            and len(value) > MAX_FILTER_VALUE_CHARS):
        raise InvalidInput(f"{field}: names are at most {MAX_FILTER_NAME_CHARS} characters and "
                           f"values {MAX_FILTER_VALUE_CHARS}",
                               code=ErrorCode.VALUE_TOO_LONG, field=field)


def parse_tag_filters(items: Sequence[str], *, field: str = "tags") -> tuple[TagFilter, ...]:
    _check_terms(items, field)
    filters = []
    for item in items:
        check_text(item, field)
        parsed = split_item(item, ("=",), field=field)
        tag = (TagFilter(key=unescape(item)) if parsed is None
               else TagFilter(key=parsed[0], value=parsed[2]))
        _check_term_lengths(field, tag.key, tag.value)
        filters.append(tag)
    return tuple(filters)


def parse_param_filters(items: Sequence[str], *, field: str = "params") -> tuple[ParamFilter, ...]:
    _check_terms(items, field)
    filters = []
    for item in items:
        check_text(item, field)
        parsed = split_item(item, _PARAM_OPERATORS, field=field)
        if parsed is None:
            raise invalid_field(
                field, f"{item!r} is not name=value or a comparison such as lr>0.01")
        key, operator, operand = parsed
        _check_term_lengths(field, key, operand)
        op = cast(ParamOp, operator)
        if op in ("=", "!="):
            filters.append(ParamFilter(key=key, op=op, text=operand))
            continue
        number = _number(operand.strip())
        if number is None:
            raise invalid_field(field, f"{item!r}: {operand!r} is not a number")
        filters.append(ParamFilter(key=key, op=op, number=number))
    return tuple(filters)


def _number(text: str) -> Decimal | None:
    if not _NUMBER.match(text):
        return None
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    if not number.is_finite() or abs(number.adjusted()) > _MAX_NUMBER_EXPONENT:
        return None
    return number


def parse_statuses(items: Sequence[str], *, field: str = "status") -> tuple[str, ...]:
    statuses = tuple(item.strip() for item in items if item.strip())
    for status in statuses:
        if status not in RUN_STATUSES:
            raise invalid_field(field, f"{status!r} is not one of {', '.join(RUN_STATUSES)}")
    return statuses


def parse_instant(text: str, *, field: str) -> datetime:
    """An ISO-8601 date or date-time; without an offset it is UTC."""
    check_text(text, field)
    try:
        moment = datetime.fromisoformat(text.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise invalid_field(field, f"{text!r} is not an ISO-8601 date-time") from None


@dataclass(frozen=True, slots=True)
class ParsedSort:
    column: SortColumn | None  # None: a metric
    metric: str | None
    descending: bool
    text: str  # canonical form, carried in cursors


def parse_sort(text: str, *, field: str = "sort") -> ParsedSort:
    check_text(text, field)
    descending = text.startswith("-")
    key = text[1:] if descending else text
    canonical = ("-" if descending else "") + key
    if key.startswith(METRIC_SORT_PREFIX):
        metric = key[len(METRIC_SORT_PREFIX):]
        if not metric:
            raise invalid_field(field, "metric: needs a metric name (metric:loss)")
        return ParsedSort(column=None, metric=metric, descending=descending, text=canonical)
    if key not in SORT_COLUMNS:
        raise invalid_field(field, f"{text!r}: sort by {', '.join(SORT_COLUMNS)} or metric:<name>,"
                              " with a leading '-' for descending")
    column: SortColumn = key  # narrowed by the membership test above
    return ParsedSort(column=column, metric=None, descending=descending,
                      text=canonical)


@dataclass(frozen=True, slots=True)
class RunListing:
    """A run listing request, parsed: what both edges hand to `Queries.list_runs`."""

    run_filter: RunFilter
    sort: ParsedSort
    limit: int
    cursor: str | None
    include_total: bool


def build_listing(
    *,
    project: str | None,
    statuses: Sequence[str],
    tags: Sequence[str],
    params: Sequence[str],
    text: str | None,
    created_after: datetime | None,
    created_before: datetime | None,
    sort: str,
    limit: int,
    cursor: str | None,
    include_total: bool,
) -> RunListing:
    if not 1 <= limit <= MAX_PAGE_RUNS:
        raise invalid_field("limit", f"must be 1..{MAX_PAGE_RUNS}")
    return RunListing(
        run_filter=RunFilter(
            project=check_text(project, "project") if project else None,
            statuses=parse_statuses(statuses),
            tags=parse_tag_filters(tags),
            params=parse_param_filters(params),
            text=check_text(text, "q") if text else None,
            created_after=created_after,
            created_before=created_before,
        ),
        sort=parse_sort(sort or "-created_at"),
        limit=limit,
        cursor=check_text(cursor, "cursor") if cursor else None,
        include_total=include_total,
    )


def given(value: T | UnsetType) -> T | None:
    """A query-string field as None when it was not given."""
    return None if isinstance(value, UnsetType) else value


def listing_from_query(query: ListRunsQuery) -> RunListing:
    """The HTTP query string's form: comma lists and ISO-8601 strings."""
    status, tags, params = given(query.status), given(query.tags), given(query.params)
    created_after, created_before = given(query.created_after), given(query.created_before)
    return build_listing(
        project=given(query.project),
        statuses=split_list(status, field="status") if status else (),
        tags=split_list(tags, field="tags") if tags else (),
        params=split_list(params, field="params") if params else (),
        text=given(query.q),
        created_after=(parse_instant(created_after, field="created_after")
                       if created_after else None),
        created_before=(parse_instant(created_before, field="created_before")
                        if created_before else None),
        sort=query.sort,
        limit=query.limit,
        cursor=given(query.cursor),
        include_total=query.include_total,
    )
