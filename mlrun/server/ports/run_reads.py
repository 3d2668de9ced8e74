"""The run-read port: filters, sorts, keysets and run records, and the `RunReads` interface that
`mlrun.server.usecases.queries` uses; `mlrun.server.storage.postgres.run_reads.RunQueries`
implements it. Must not import storage or edges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal, Protocol

ParamOp = Literal["=", "!=", ">", ">=", "<", "<="]


SortColumn = Literal["created_at", "updated_at", "name", "status", "duration"]


KeysetValue = datetime | str | timedelta | None


@dataclass(frozen=True, slots=True)
class TagFilter:
    """Has tag `key` (any value when `value` is None)."""

    key: str
    value: str | None = None


@dataclass(frozen=True, slots=True)
class ParamFilter:
    """`key op text` for = and != (text comparison), `key op number` for the others."""

    key: str
    op: ParamOp
    text: str | None = None
    number: Decimal | None = None


@dataclass(frozen=True, slots=True)
class RunFilter:
    project: str | None = None
    statuses: tuple[str, ...] = ()
    tags: tuple[TagFilter, ...] = ()
    params: tuple[ParamFilter, ...] = ()
    text: str | None = None
    created_after: datetime | None = None  # inclusive
    created_before: datetime | None = None  # exclusive


@dataclass(frozen=True, slots=True)
class RunSort:
    column: SortColumn = "created_at"
    descending: bool = True


@dataclass(frozen=True, slots=True)
class Keyset:
    """The last row of the previous page: its sort value and run_id."""

    value: KeysetValue
    run_id: str


@dataclass(slots=True)
class RunRecord:
    run_id: str
    project: str
    name: str
    status: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    last_heartbeat_at: datetime | None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    artifacts_count: int = 0

    def sort_value(self, column: SortColumn) -> KeysetValue:
        if column == "duration":
            return None if self.finished_at is None else self.finished_at - self.created_at
        value: KeysetValue = getattr(self, column)
        return value


@dataclass(frozen=True, slots=True)
class RunPageRows:
    rows: list[RunRecord]
    has_more: bool
    total: int | None


class RunReads(Protocol):
    """Run listings and details (PostgreSQL)."""

    async def page(
        self,
        run_filter: RunFilter,
        sort: RunSort,
        *,
        after: Keyset | None,
        limit: int,
        include_total: bool,
    ) -> RunPageRows:
        """Up to `limit` runs in `sort` order after `after`; `has_more` when another page
        follows; `total` (every match, ignoring `after`) when asked."""
        ...

    async def matching_ids(self, run_filter: RunFilter, *, max_runs: int) -> list[str]:
        """Ids of matching runs, at most `max_runs + 1` (so a caller can tell "too many")."""
        ...

    async def by_ids(
        self, run_ids: Sequence[str], *, with_children: bool = True
    ) -> dict[str, RunRecord]:
        """The runs among `run_ids` that exist (with tags and params when asked)."""
        ...

    async def detail(self, run_id: str) -> RunRecord | None:
        """One run with tags, params and its count of finalized artifacts."""
        ...
