"""The archive ports: what `mlrun export` reads from the backends and what `mlrun import` writes
to them (`usecases.archive` drives both). PostgreSQL implements `RunArchiveRows`
(`storage.postgres.run_archive`), ClickHouse `SeriesArchive` (`storage.clickhouse.series_archive`).

The records that cross these ports are the export file's own (`protocols.export_file`): the
file is a transcript of the backends' rows, so one record type serves both sides.

Must not import storage, edges or use-cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from mlrun.server.protocols.export_file import Artifact, Points, RunFields, SeriesTable, Summary

ImportState = Literal["absent", "imported", "other"]


@dataclass(frozen=True, slots=True)
class ExistingRun:
    """What the target holds under a run id: nothing, a run imported from a file (with the
    digest of the export it came from), or a run of its own."""

    state: ImportState
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class SeriesCursor:
    """Where the next chunk of a series starts: strictly after this (key, version)."""

    key: int
    step: int
    version: int


class RunArchiveRows(Protocol):
    """A run's PostgreSQL side, read for export and written for import (which runs match a
    selection is the listing's: `ports.run_reads.RunReads.page`)."""

    async def run_fields(self, run_id: str) -> RunFields | None:
        ...

    async def artifacts(self, run_id: str) -> list[Artifact]:
        """The run's finalized artifacts, oldest first."""
        ...

    async def existing_runs(self, run_ids: Sequence[str]) -> dict[str, ExistingRun]:
        ...

    async def commit_run(self, run: RunFields, artifacts: Sequence[Artifact], *,
                         digest: str) -> bool:
        """Create the run, its project when missing, params, tags, metric names, artifact rows
        and the import record, in one transaction: the run becomes visible whole or not at all.
        False (and nothing written) when a run with that id appeared meanwhile."""
        ...


class SeriesArchive(Protocol):
    """A run's ClickHouse side: its series and summaries, read in chunks and written back."""

    async def series_names(self, table: SeriesTable, run_id: str) -> list[str]:
        ...

    async def read_chunk(self, table: SeriesTable, run_id: str, name: str, *,
                         after: SeriesCursor | None, limit: int
                         ) -> tuple[Points, SeriesCursor | None]:
        """Up to `limit` stored rows (every version not merged away) in key order after
        `after`, and where the next chunk starts (None when this was the last)."""
        ...

    async def summaries(self, run_id: str) -> list[Summary]:
        ...

    async def write_points(self, chunks: Sequence[Points]) -> None:
        """Insert the rows as they are (same versions): every read deduplicates by version."""
        ...

    async def restore_summary(self, summary: Summary) -> None:
        """Make the run's summary of `summary.name` cover `min`/`max` (values the source saw but
        whose points were replaced and merged away), changing nothing else it answers."""
        ...
