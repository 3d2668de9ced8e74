"""`mlrun export` and `mlrun import`: the command lines, the file (gzip, written and read in
worker threads), progress bars, and the storage they run on.

Both talk straight to the backends (PostgreSQL, ClickHouse), configured exactly like
`mlrun serve` (the same environment variables): the HTTP API cannot set what a faithful copy
needs (creation and finish times, row versions, statuses), caps batches at 100k points, and a
backup tool must work while no server runs. Whoever holds the backends' credentials already
holds all the data, so no API key is involved. With the embedded defaults, stop `mlrun serve`
first (chdb and the embedded PostgreSQL belong to one process).

Exit codes: 0 done; 1 a backend failed; 2 a usage or configuration error, a file that is not a
whole export, or a conflict in the target (in those cases nothing was written).

Must not import trio or hypercorn (the entry point runs this on the default backend).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import gzip
import logging
import os
import sys
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, Final

import anyio

from mlrun.server.errors import ConfigError, InvalidInput, MlrunError
from mlrun.server.ports.run_reads import RunFilter
from mlrun.server.protocols.export_file import ExportFileError, Points
from mlrun.server.runtime.config import Config, load_config
from mlrun.server.runtime.logs import configure_logging
from mlrun.server.runtime.supervisor import StartupError, open_prepared_storage
from mlrun.server.storage.clickhouse.series_archive import SeriesArchive
from mlrun.server.storage.postgres.run_archive import PostgresRunArchive
from mlrun.server.storage.postgres.run_reads import RunQueries
from mlrun.server.usecases.archive import (
    ArchiveConflict,
    ArchiveTotals,
    Exporter,
    ExportSelection,
    Importer,
    RunMissing,
)
from mlrun.server.usecases.listing import (
    check_text,
    parse_instant,
    parse_param_filters,
    parse_statuses,
    parse_tag_filters,
    split_list,
)

logger = logging.getLogger("mlrun.archive")

# Bytes gathered before one write to the gzip file, and read per call when importing.
_IO_CHUNK_BYTES: Final = 1 << 20
_COMPRESS_LEVEL: Final = 3  # ~3x faster than 9 on this data, ~15 % larger
_REDRAW_S: Final = 0.2
# glibc's mallopt parameters (malloc.h) and the fixed threshold we set: see _flat_heap.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_MMAP_THRESHOLD_BYTES: Final = 1 << 20


def _flat_heap() -> None:
    """Keep the resident size flat over a long import or export. Both churn through buffers of
    a few MB (a chunk's JSON line, its RowBinary, the compressed request); glibc serves those
    from mmap at first, but raises its mmap threshold each time one is freed, after which they
    come from the heap, fragment it and stay resident (measured: 10M points imported grew to
    ~300 MB, with a fixed 1 MiB threshold it stays ~120 MB). A fixed threshold turns that
    adjustment off. Not glibc (musl, macOS): nothing to do."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _MMAP_THRESHOLD_BYTES)


class ProgressBar:
    """A one-line progress bar on stderr (only when it is a terminal, or when forced)."""

    def __init__(self, label: str, *, enabled: bool, stream: IO[str] = sys.stderr) -> None:
        self._label = label
        self._enabled = enabled
        self._stream = stream
        self._total = 0
        self._done = 0
        self._started = time.monotonic()
        self._drawn = 0.0
        self._closed = False

    def add_total(self, points: int) -> None:
        self._total += points

    def advance(self, points: int) -> None:
        self._done += points
        now = time.monotonic()
        if self._enabled and now - self._drawn >= _REDRAW_S:
            self._drawn = now
            self._draw(now)

    def close(self) -> None:
        if self._enabled and not self._closed:
            self._closed = True
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self, now: float) -> None:
        rate = self._done / max(now - self._started, 1e-6)
        if self._total:
            share = min(self._done / self._total, 1.0)
            filled = int(share * 30)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {share:4.0%} "
            count = f"{self._done:,}/{self._total:,}"
        else:
            bar, count = "", f"{self._done:,}"
        self._stream.write(f"\r{self._label:<8} {bar}{count} points  {rate:,.0f} points/s ")
        self._stream.flush()


class GzipLineSink:
    """Lines gathered into ~1 MiB writes, each compressed and written in a worker thread."""

    def __init__(self, handle: gzip.GzipFile) -> None:
        self._handle = handle
        self._buffer: list[bytes] = []
        self._size = 0

    async def write(self, line: bytes) -> None:
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= _IO_CHUNK_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            data = b"".join(self._buffer)
            self._buffer, self._size = [], 0
            await anyio.to_thread.run_sync(self._handle.write, data)


def _read_lines(handle: gzip.GzipFile) -> list[bytes]:
    try:
        return handle.readlines(_IO_CHUNK_BYTES)
    except gzip.BadGzipFile as exc:
        raise ExportFileError(f"not an MLRun export file (not gzip-compressed: {exc})") from None
    except EOFError:
        raise ExportFileError("the file is truncated (its compressed stream ends early)"
                              ) from None
    except zlib.error as exc:
        raise ExportFileError(f"the file is corrupt ({exc})") from None


async def gzip_lines(path: Path) -> AsyncIterator[bytes]:
    handle = await anyio.to_thread.run_sync(gzip.GzipFile, path, "rb")
    try:
        while True:
            lines = await anyio.to_thread.run_sync(_read_lines, handle)
            if not lines:
                return
            for line in lines:
                yield line
    finally:
        await anyio.to_thread.run_sync(handle.close)


def _parser(command: str) -> argparse.ArgumentParser:
    if command == "export":
        parser = argparse.ArgumentParser(
            prog="mlrun export",
            description="Write runs (fields, params, tags, every metric and system-metric "
            "point, summaries, the artifacts' manifest) to a gzip JSON-lines file. Storage is "
            "configured as for `mlrun serve`. Select runs by id, or by the listing's filters "
            "(all runs when none is given).")
        parser.add_argument("-o", "--output", required=True, type=Path,
                            help="file to write (written as FILE.partial, renamed when whole)")
        parser.add_argument("--run", action="append", default=[], metavar="RUN_ID",
                            help="a run to export (repeatable)")
        parser.add_argument("--project", help="only runs of this project")
        parser.add_argument("--status", help="comma list of running, finished, failed, killed")
        parser.add_argument("--tags", help="as the listing's `tags`: k or k=v, comma list")
        parser.add_argument("--params", help="as the listing's `params`: k=v, k>=x, ...")
        parser.add_argument("--q", help="case-insensitive substring of the name or run id")
        parser.add_argument("--created-after", help="ISO-8601, inclusive")
        parser.add_argument("--created-before", help="ISO-8601, exclusive")
    else:
        parser = argparse.ArgumentParser(
            prog="mlrun import",
            description="Load an export file into the configured storage. Checks the whole "
            "file first; run ids are kept; a run already imported from the same content is "
            "skipped, any other run of the same id makes the import refuse the file.")
        parser.add_argument("file", type=Path, help="an export file")
    parser.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                        help="progress bar on stderr (auto: when stderr is a terminal)")
    return parser


def _selection(args: argparse.Namespace) -> ExportSelection:
    if args.run:
        return ExportSelection(run_ids=tuple(check_text(run, "run") for run in args.run))
    return ExportSelection(run_filter=RunFilter(
        project=check_text(args.project, "project") if args.project else None,
        statuses=parse_statuses(split_list(args.status, field="status")) if args.status else (),
        tags=parse_tag_filters(split_list(args.tags, field="tags")) if args.tags else (),
        params=(parse_param_filters(split_list(args.params, field="params"))
                if args.params else ()),
        text=check_text(args.q, "q") if args.q else None,
        created_after=(parse_instant(args.created_after, field="created_after")
                       if args.created_after else None),
        created_before=(parse_instant(args.created_before, field="created_before")
                        if args.created_before else None),
    ))


class _CollectingSeries:
    """`SeriesArchive` whose inserts are followed by a garbage collection. httpx's request and
    response objects form reference cycles that keep each insert's body (a few MB) alive until
    a full collection, and an import allocates too few container objects to trigger one: without
    this, 10M points imported held ~7 bodies at a time and grew past 300 MB (measured with
    tracemalloc). A collection costs a few ms per insert of 131k points."""

    def __init__(self, series: SeriesArchive) -> None:
        self._series = series
        self.series_names = series.series_names
        self.read_chunk = series.read_chunk
        self.summaries = series.summaries
        self.restore_summary = series.restore_summary

    async def write_points(self, chunks: Sequence[Points]) -> None:
        await self._series.write_points(chunks)
        gc.collect()


def archive_main(command: str, argv: Sequence[str]) -> int:
    args = _parser(command).parse_args(argv)
    try:
        config = load_config()
        selection = _selection(args) if command == "export" else None
    except (ConfigError, InvalidInput) as exc:
        print(f"mlrun {command}: {exc}", file=sys.stderr)
        return 2
    configure_logging("warning", config.log_format)
    _flat_heap()
    enabled = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    started = time.monotonic()
    try:
        if command == "export":
            assert selection is not None
            totals = anyio.run(_export, config, selection, args.output, enabled)
            verb, where = "exported", f"to {args.output}"
        else:
            totals = anyio.run(_import, config, args.file, enabled)
            verb, where = "imported", f"from {args.file}"
    except (ExportFileError, ArchiveConflict, RunMissing) as exc:
        print(f"mlrun {command}: {exc}", file=sys.stderr)
        return 2
    except (StartupError, MlrunError) as exc:
        print(f"mlrun {command}: {exc}", file=sys.stderr)
        return 1
    elapsed_s = time.monotonic() - started
    moved = totals.points + totals.system_points
    skipped = f", skipped {totals.skipped_runs} already imported" if totals.skipped_runs else ""
    print(f"{verb} {totals.runs} runs{skipped}, {totals.points} points, {totals.system_points} "
          f"system points {where} in {elapsed_s:.1f} s ({moved / max(elapsed_s, 1e-6):,.0f} "
          "points/s)")
    return 0


def _open_for_writing(path: Path) -> gzip.GzipFile:
    return gzip.open(path, "wb", compresslevel=_COMPRESS_LEVEL)


async def _export(config: Config, selection: ExportSelection, output: Path,
                  progress_enabled: bool) -> ArchiveTotals:
    partial = output.with_name(output.name + ".partial")
    progress = ProgressBar("export", enabled=progress_enabled)
    async with open_prepared_storage(config, public_base_url="http://127.0.0.1") as storage:
        exporter = Exporter(RunQueries(storage.postgres), PostgresRunArchive(storage.postgres),
                            SeriesArchive(storage.clickhouse))
        handle = await anyio.to_thread.run_sync(_open_for_writing, partial)
        try:
            sink = GzipLineSink(handle)
            totals = await exporter.export(selection, sink, progress)
            await sink.flush()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(handle.close)
                await anyio.to_thread.run_sync(lambda: partial.unlink(missing_ok=True))
            raise
        finally:
            progress.close()
        await anyio.to_thread.run_sync(handle.close)
        await anyio.to_thread.run_sync(os.replace, partial, output)
    return totals


async def _import(config: Config, path: Path, progress_enabled: bool) -> ArchiveTotals:
    if not await anyio.Path(path).is_file():
        raise ExportFileError(f"{path}: no such file")
    check = ProgressBar("check", enabled=progress_enabled)
    load = ProgressBar("import", enabled=progress_enabled)
    async with open_prepared_storage(config, public_base_url="http://127.0.0.1") as storage:
        importer = Importer(PostgresRunArchive(storage.postgres),
                            _CollectingSeries(SeriesArchive(storage.clickhouse)))
        try:
            return await importer.import_file(lambda: gzip_lines(path), load, check)
        finally:
            check.close()
            load.close()
