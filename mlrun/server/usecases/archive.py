"""Export and import of runs (`mlrun export` / `mlrun import`): the order of the work and the
rules that make import idempotent and all-or-nothing. The file format and its checks are
`protocols.export_file`; the backends are reached through `ports.run_archive` and
`ports.run_reads`; bytes reach and leave a file through the `LineSink` / line iterators the
caller (runtime.archive_command) provides. No I/O of its own.

Decisions (README "Export and import"):
- Run ids are kept. They are what links a run to its artifacts' object keys, to training code
  and notes; an id that exists in the target already is never merged into: the file is
  refused before anything is written (unless that run came from an import of the very same
  content, which is then skipped: importing twice stores nothing twice).
- A run becomes visible whole or not at all: its points go to ClickHouse first (no read route
  shows points of a run PostgreSQL does not know), then one PostgreSQL transaction creates the
  run with everything else and the import record. A file is read twice: once to check all of
  it (a truncated, edited or foreign file is refused before anything is written), once to
  import.
- Memory is bounded by the chunk size (points are streamed chunk by chunk both ways) and by
  the number of runs in one file (their ids and digests are kept between the two passes).

Must not import storage, pipelines or edges.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Protocol

from mlrun.server.ports.run_archive import RunArchiveRows, SeriesArchive, SeriesCursor
from mlrun.server.ports.run_reads import Keyset, RunFilter, RunReads, RunSort
from mlrun.server.protocols.export_file import (
    Artifact,
    ExportChecker,
    ExportFileError,
    FileDigest,
    Points,
    Record,
    RunDigest,
    RunEnd,
    RunFields,
    SeriesTable,
    Summary,
    encode_line,
    new_header,
)

# Points per `points` record: ~2.5 MB of JSON, a few tens of MB of Python objects at most.
CHUNK_POINTS: Final = 65_536
# Points gathered into one ClickHouse INSERT on import: larger inserts make fewer parts, but
# their rows are held as Python objects and RowBinary at once (2 chunks: ~60 MB at the peak).
INSERT_POINTS: Final = 2 * CHUNK_POINTS
_RUNS_PER_PAGE: Final = 200
_TABLES: Final[tuple[SeriesTable, ...]] = ("metrics", "system_metrics")


class ArchiveConflict(Exception):
    """The target holds runs with ids from the file that were not imported from this content;
    nothing was written."""


class RunMissing(Exception):
    """A run named for export does not exist."""


class LineSink(Protocol):
    async def write(self, line: bytes) -> None: ...


class Progress(Protocol):
    def add_total(self, points: int) -> None: ...

    def advance(self, points: int) -> None: ...

    def close(self) -> None:
        """The work it measured is over (idempotent)."""


@dataclass(frozen=True, slots=True)
class ExportSelection:
    """Explicit run ids, or every run the listing filter matches (oldest first)."""

    run_ids: tuple[str, ...] = ()
    run_filter: RunFilter = field(default_factory=RunFilter)

    def describe(self) -> dict[str, str]:
        if self.run_ids:
            return {"run_ids": ",".join(self.run_ids)}
        described = {}
        for name in ("project", "text", "created_after", "created_before"):
            value = getattr(self.run_filter, name)
            if value is not None:
                described[name] = str(value)
        if self.run_filter.statuses:
            described["status"] = ",".join(self.run_filter.statuses)
        if self.run_filter.tags:
            described["tags"] = repr(self.run_filter.tags)
        if self.run_filter.params:
            described["params"] = repr(self.run_filter.params)
        return described


@dataclass(frozen=True, slots=True)
class ArchiveTotals:
    runs: int
    points: int
    system_points: int
    skipped_runs: int = 0


class Exporter:
    def __init__(self, runs: RunReads, rows: RunArchiveRows, series: SeriesArchive) -> None:
        self._runs = runs
        self._rows = rows
        self._series = series

    async def export(self, selection: ExportSelection, sink: LineSink,
                     progress: Progress) -> ArchiveTotals:
        file_digest = FileDigest()

        async def emit(record: Record, run_digest: RunDigest | None = None) -> None:
            line = encode_line(record)
            if run_digest is not None:
                run_digest.add(line, record)
            file_digest.add(line, record)
            await sink.write(line)

        await emit(new_header(created_at=datetime.now(UTC), selection=selection.describe(),
                              artifact_bytes=False))
        async for run_id in self._selected_run_ids(selection):
            fields = await self._rows.run_fields(run_id)
            if fields is None:
                if selection.run_ids:
                    raise RunMissing(f"run {run_id!r} does not exist")
                continue  # deleted since it was listed
            run_digest = RunDigest(run_id)
            await emit(fields, run_digest)
            for table in _TABLES:
                for name in await self._series.series_names(table, run_id):
                    cursor: SeriesCursor | None = None
                    while True:
                        chunk, cursor = await self._series.read_chunk(
                            table, run_id, name, after=cursor, limit=CHUNK_POINTS)
                        if chunk.steps:
                            await emit(chunk, run_digest)
                            progress.advance(len(chunk.steps))
                        if cursor is None:
                            break
            for summary in await self._series.summaries(run_id):
                await emit(summary, run_digest)
            for artifact in await self._rows.artifacts(run_id):
                await emit(artifact, run_digest)
            await emit(run_digest.end())
        end = file_digest.end()
        await emit(end)
        return ArchiveTotals(runs=end.runs, points=end.points, system_points=end.system_points)

    async def _selected_run_ids(self, selection: ExportSelection) -> AsyncIterator[str]:
        if selection.run_ids:
            for run_id in dict.fromkeys(selection.run_ids):
                yield run_id
            return
        after: Keyset | None = None
        sort = RunSort(column="created_at", descending=False)
        while True:
            page = await self._runs.page(selection.run_filter, sort, after=after,
                                         limit=_RUNS_PER_PAGE, include_total=False)
            for record in page.rows:
                yield record.run_id
            if not page.has_more or not page.rows:
                return
            last = page.rows[-1]
            after = Keyset(value=last.sort_value(sort.column), run_id=last.run_id)


@dataclass(frozen=True, slots=True)
class CheckedFile:
    """What the first pass learnt: each run's digest, in file order, and the file's totals."""

    runs: dict[str, str]
    points: int
    system_points: int


LineSource = Callable[[], AsyncIterator[bytes]]


async def check_export(lines: AsyncIterator[bytes], progress: Progress) -> CheckedFile:
    """Read a whole file through `ExportChecker`; ExportFileError unless it is whole and valid."""
    checker = ExportChecker()
    runs: dict[str, str] = {}
    async for line in lines:
        record = checker.check(line)
        if isinstance(record, Points):
            progress.advance(len(record.steps))
        elif isinstance(record, RunEnd):
            if record.run_id in runs:
                raise ExportFileError(f"line {checker.line_number}: run {record.run_id} appears "
                                      "twice in the file")
            runs[record.run_id] = record.sha256
    end = checker.finish()
    return CheckedFile(runs=runs, points=end.points, system_points=end.system_points)


class Importer:
    def __init__(self, rows: RunArchiveRows, series: SeriesArchive) -> None:
        self._rows = rows
        self._series = series

    async def import_file(self, lines: LineSource, progress: Progress,
                          check_progress: Progress) -> ArchiveTotals:
        try:
            checked = await check_export(lines(), check_progress)
        finally:
            check_progress.close()
        existing = await self._rows.existing_runs(list(checked.runs))
        conflicts = [
            run_id for run_id, found in existing.items()
            if found.state == "other"
            or (found.state == "imported" and found.digest != checked.runs[run_id])
        ]
        if conflicts:
            shown = ", ".join(sorted(conflicts)[:5])
            more = f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
            raise ArchiveConflict(
                f"{len(conflicts)} run id(s) of the file exist in the target with other content"
                f" (or are being deleted there): {shown}{more}; nothing was imported (delete"
                " them there first, and let the purge finish)")
        wanted = {run_id for run_id, found in existing.items() if found.state == "absent"}
        progress.add_total(checked.points + checked.system_points)
        totals = await self._load(lines(), wanted, progress)
        return ArchiveTotals(runs=totals.runs, points=totals.points,
                             system_points=totals.system_points,
                             skipped_runs=len(checked.runs) - len(wanted))

    async def _load(self, lines: AsyncIterator[bytes], wanted: set[str],
                    progress: Progress) -> ArchiveTotals:
        checker = ExportChecker()  # checks again: the file could have changed since pass one
        run: _RunLoad | None = None
        runs = points = system_points = 0
        async for line in lines:
            record = checker.check(line)
            if isinstance(record, RunFields):
                run = _RunLoad(record) if record.run_id in wanted else None
            elif run is None:
                if isinstance(record, Points):
                    progress.advance(len(record.steps))
            elif isinstance(record, Points):
                run.add_points(record)
                if run.pending_points >= INSERT_POINTS:
                    await self._flush(run, progress)
            elif isinstance(record, Summary):
                run.summaries.append(record)
            elif isinstance(record, Artifact):
                run.artifacts.append(record)
            elif isinstance(record, RunEnd):
                await self._flush(run, progress)
                for summary in run.summaries_to_restore():
                    await self._series.restore_summary(summary)
                if not await self._rows.commit_run(run.fields, run.artifacts,
                                                   digest=record.sha256):
                    raise ArchiveConflict(f"run {record.run_id} was created (or deleted) in the "
                                          "target while it was being imported; it was left as "
                                          "it was")
                runs += 1
                points += record.points
                system_points += record.system_points
                run = None
        checker.finish()
        return ArchiveTotals(runs=runs, points=points, system_points=system_points)

    async def _flush(self, run: _RunLoad, progress: Progress) -> None:
        if run.pending:
            await self._series.write_points(run.pending)
            progress.advance(run.pending_points)
            run.pending = []
            run.pending_points = 0


class _RunLoad:
    """One run being imported: its buffered chunks, and per metric the lowest and highest value
    among its points (to tell whether the source's summary saw values merged away since)."""

    def __init__(self, fields: RunFields) -> None:
        self.fields = fields
        self.pending: list[Points] = []
        self.pending_points = 0
        self.summaries: list[Summary] = []
        self.artifacts: list[Artifact] = []
        self._ranges: dict[str, tuple[float, float]] = {}

    def add_points(self, chunk: Points) -> None:
        self.pending.append(chunk)
        self.pending_points += len(chunk.steps)
        if chunk.table == "metrics" and chunk.values:
            low, high = min(chunk.values), max(chunk.values)
            known = self._ranges.get(chunk.name)
            if known is not None:
                low, high = min(low, known[0]), max(high, known[1])
            self._ranges[chunk.name] = (low, high)

    def summaries_to_restore(self) -> Sequence[Summary]:
        restore = []
        for summary in self.summaries:
            known = self._ranges.get(summary.name)
            if known is None:
                continue  # no points of it left: nothing a summary could be built on
            if summary.min < known[0] or summary.max > known[1]:
                restore.append(summary)
        return restore
