"""The queued-ingest stream entry: what a server XADDs for one batch and a processor reads back.

Owns: the stream and counter key names of a deployment (`StreamKeys`), which stream a run's
batches go to, the entry's fields, the command that adds one (XADD plus the queue's byte
counter), and decoding an entry back into a `QueuedBatch`, refusing anything that is not one
(`MalformedEntry`: the processor moves it to the dead-letter stream).

Fields, always in this order (so Redis keeps the names once per listpack node, not per entry):

    format          b"mlrun.batch.2" (b"mlrun.batch.1" from older servers is still read;
                    anything else is a foreign entry)
    run             run_id
    batch           batch_id, empty for a batch without one (a batch id is never empty)
    first_version   the version of the batch's first row (decimal)
    metrics_rows    rows in `metrics` (decimal)
    system_rows     rows in `system_metrics` (decimal)
    metrics         the `metrics` rows as columns (below); format 1: their RowBinary
    system_metrics  the `system_metrics` rows, the same way
    crc32           CRC-32 of metrics + system_metrics (decimal): a truncated or altered
                    payload is refused here instead of running into the next entry's rows
                    in a grouped INSERT

Columns (format 2) are one MessagePack array: names, steps, values, timestamps (ms), the
first row's version and the versions (empty when they are first, first + 1, ...). Why not the
RowBinary the processor inserts: a server spends its event loop on every batch, a processor
only on its rounds; RowBinary takes ~0.6 ms of Python per 1000 points (a row at a time), the
columns ~0.04 ms (msgspec, in C). `decode_entry` turns them into RowBinary on the processor.
Either way every row carries its own version (assigned at admission), so inserting an entry
twice, or a resent batch's second entry, writes the very same rows.

The queue's byte counter (`StreamKeys.bytes_counter`) counts `entry_bytes`: the two payloads'
lengths. The server adds them in the same MULTI/EXEC as the XADD; a processor subtracts them
when it acknowledges the entry, computed from the fields it read, so the two always agree.

The processor inserts RowBinary (`protocols.clickhouse.encode_metric_rows`), which entries of
format 1 already carry; the in-process write path sends Native blocks instead, a choice that
only matters for the server's CPU, not for what the tables hold.

Must not import storage drivers or the edges, nor do I/O: plain functions, unit-tested without
a loop.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from typing import Final

import msgspec

from mlrun.server.ports.write_path import BatchIdentity, BatchWrite, PointColumns
from mlrun.server.protocols.clickhouse import encode_metric_rows
from mlrun.server.protocols.redis_streams import StreamEntry
from mlrun.server.protocols.resp import encode_command

ENTRY_FORMAT: Final = b"mlrun.batch.2"
# Entries of servers before the columnar payload: RowBinary payloads, read as they are.
ROWBINARY_ENTRY_FORMAT: Final = b"mlrun.batch.1"
_FORMATS: Final = frozenset({ENTRY_FORMAT, ROWBINARY_ENTRY_FORMAT})
# Fields of the processing hash (`StreamKeys.processing_stats`): rows acknowledged (added by the
# processors' ack script), redeliveries, inserts, their total time in microseconds, and per
# latency bucket of `telemetry.DEFAULT_LATENCY_BUCKETS_S` (by index) the inserts in it.
STAT_ROWS: Final = b"rows"
STAT_REDELIVERED: Final = b"redelivered"
STAT_INSERTS: Final = b"inserts"
STAT_INSERT_US: Final = b"insert_us"
STAT_INSERT_BUCKET: Final = b"insert_bucket:"
# The fewest RowBinary bytes a metric row takes beyond its run id's: two string length
# prefixes (a byte each at least) and four 8-byte numbers; a name only adds to it.
_MIN_ROW_BYTES: Final = 34


@dataclass(frozen=True)  # not slots: `streams` is a cached_property
class StreamKeys:
    """Key names of one deployment's queue; every server and processor must agree on them."""

    prefix: str
    partitions: int

    def stream_of(self, run_id: str) -> bytes:
        """A run's batches all go to one stream (CRC-32 of the run id: stable everywhere)."""
        return self.streams[zlib.crc32(run_id.encode()) % self.partitions]

    @cached_property
    def streams(self) -> tuple[bytes, ...]:
        return tuple(f"{self.prefix}:{index}".encode() for index in range(self.partitions))

    @property
    def bytes_counter(self) -> bytes:
        return f"{self.prefix}:queued-bytes".encode()

    @property
    def drained_counter(self) -> bytes:
        return f"{self.prefix}:drained-entries".encode()

    @property
    def dead_letters(self) -> bytes:
        return f"{self.prefix}:dead-letter".encode()

    @property
    def processing_stats(self) -> bytes:
        """A hash every processor adds to: rows acknowledged, redeliveries, its inserts'
        count, time and latency buckets (telemetry of all processors, for every /metrics)."""
        return f"{self.prefix}:processing".encode()


class _Columns(msgspec.Struct, array_like=True, frozen=True):
    """A payload of format 2 (see the module docstring)."""

    names: list[str]
    steps: list[int]
    values: list[float]
    timestamps_ms: list[int]
    first_version: int
    versions: list[int]  # empty: first_version, first_version + 1, ...


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Columns)


def _listed(values: Sequence[int] | Sequence[float] | Sequence[str]) -> list[object]:
    return values if isinstance(values, list) else list(values)


def encode_payload(columns: PointColumns) -> bytes:
    """One table's rows as format-2 columns (b"" for none)."""
    if not len(columns):
        return b""
    versions = columns.versions
    first = versions[0]
    contiguous = (isinstance(versions, range) and versions.step == 1) or all(
        version == first + index for index, version in enumerate(versions))
    return _encoder.encode((_listed(columns.names), _listed(columns.steps),
                            _listed(columns.values), _listed(columns.timestamps_ms), first,
                            [] if contiguous else _listed(versions)))


def encode_xadd(keys: StreamKeys, write: BatchWrite) -> tuple[bytes, int]:
    """The commands that queue `write`: XADD of its entry, then INCRBY of the byte counter.
    Returns (the encoded commands, the entry's bytes as the queue bound counts them)."""
    identity = write.identity
    metrics = encode_payload(write.metrics)
    system = encode_payload(write.system_metrics)
    crc = zlib.crc32(system, zlib.crc32(metrics))
    xadd = encode_command(
        "XADD", keys.stream_of(identity.run_id), "*",
        "format", ENTRY_FORMAT,
        "run", identity.run_id,
        "batch", identity.batch_id or b"",
        "first_version", identity.first_version,
        "metrics_rows", len(write.metrics),
        "system_rows", len(write.system_metrics),
        "metrics", metrics,
        "system_metrics", system,
        "crc32", crc,
    )
    size = len(metrics) + len(system)
    return xadd + encode_command("INCRBY", keys.bytes_counter, size), size


@dataclass(frozen=True, slots=True)
class QueuedBatch:
    """One decoded entry: a batch's rows for both tables (RowBinary, whatever the entry's
    format), and where it came from."""

    stream: bytes
    entry_id: bytes
    identity: BatchIdentity
    metrics_rows: int
    system_rows: int
    metrics: bytes
    system_metrics: bytes

    @property
    def rows(self) -> int:
        return self.metrics_rows + self.system_rows


class MalformedEntry(Exception):
    """An entry that is not a batch of this format; the message says why (for the dead
    letter), never quoting the payload."""


def entry_bytes(entry: StreamEntry) -> int:
    """What the byte counter holds for this entry (0 for one that no server counted)."""
    fields = entry.fields or {}
    if fields.get(b"format") not in _FORMATS:
        return 0
    return len(fields.get(b"metrics", b"")) + len(fields.get(b"system_metrics", b""))


def decode_entry(entry: StreamEntry) -> QueuedBatch:
    fields = entry.fields
    if fields is None:
        raise MalformedEntry("the entry was deleted")
    entry_format = fields.get(b"format")
    if entry_format not in _FORMATS:
        raise MalformedEntry("not an mlrun batch entry (format field missing or unknown)")
    try:
        run = fields[b"run"].decode()
        batch = fields[b"batch"].decode()
        first_version = int(fields[b"first_version"])
        metrics_rows = int(fields[b"metrics_rows"])
        system_rows = int(fields[b"system_rows"])
        metrics = fields[b"metrics"]
        system = fields[b"system_metrics"]
        crc = int(fields[b"crc32"])
    except KeyError as exc:
        raise MalformedEntry(f"field {exc.args[0].decode(errors='replace')!r} is missing"
                             ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedEntry(f"a field does not parse ({type(exc).__name__})") from None
    if not run:
        raise MalformedEntry("empty run id")
    if min(first_version, metrics_rows, system_rows) < 0:
        raise MalformedEntry("negative version or row count")
    if zlib.crc32(system, zlib.crc32(metrics)) != crc:
        raise MalformedEntry("payload checksum mismatch (truncated or altered)")
    if entry_format == ENTRY_FORMAT:
        metrics = _rowbinary(run, metrics, metrics_rows, "metrics")
        system = _rowbinary(run, system, system_rows, "system_metrics")
    row_floor = _MIN_ROW_BYTES + len(run.encode())
    for rows, payload, table in ((metrics_rows, metrics, "metrics"),
                                 (system_rows, system, "system_metrics")):
        if (rows == 0) != (not payload) or len(payload) < rows * row_floor:
            raise MalformedEntry(f"{table}: {len(payload)} bytes cannot hold {rows} rows")
    return QueuedBatch(stream=entry.stream, entry_id=entry.entry_id,
                       identity=BatchIdentity(run, batch or None, first_version),
                       metrics_rows=metrics_rows, system_rows=system_rows,
                       metrics=metrics, system_metrics=system)


def _rowbinary(run_id: str, payload: bytes, rows: int, table: str) -> bytes:
    """A format-2 payload as the RowBinary of its `rows` rows (checked to be exactly that)."""
    if not payload:
        return b""
    try:
        columns = _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedEntry(f"{table}: the columns do not decode ({type(exc).__name__})"
                             ) from None
    versions = columns.versions or range(columns.first_version,
                                         columns.first_version + len(columns.steps))
    lengths = {len(columns.names), len(columns.steps), len(columns.values),
               len(columns.timestamps_ms), len(versions)}
    if lengths != {rows}:
        raise MalformedEntry(f"{table}: {len(payload)} bytes cannot hold {rows} rows")
    try:
        return encode_metric_rows(zip(repeat(run_id), columns.names, columns.steps,
                                      columns.values, columns.timestamps_ms, versions,
                                      strict=False))  # lengths checked above
    except ValueError as exc:
        raise MalformedEntry(f"{table}: a row does not fit its columns ({exc})") from None
