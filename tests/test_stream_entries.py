"""The queued-ingest stream entry without Redis: the XADD a server sends decodes back into the
same batch (rows, identity, versions), a run always maps to one stream, and every kind of
malformed or foreign entry is refused with a reason instead of reaching ClickHouse."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest

from mlrun.server.pipelines.stream_entries import (
    ENTRY_FORMAT,
    ROWBINARY_ENTRY_FORMAT,
    MalformedEntry,
    StreamKeys,
    decode_entry,
    encode_xadd,
    entry_bytes,
)
from mlrun.server.ports.write_path import EMPTY_COLUMNS, BatchIdentity, BatchWrite, PointColumns
from mlrun.server.protocols.clickhouse import encode_metric_rows
from mlrun.server.protocols.redis_streams import StreamEntry
from mlrun.server.protocols.resp import NEED_MORE, ReplyParser

KEYS = StreamKeys("t:ingest", 4)


def rowbinary(run_id: str, columns: PointColumns) -> bytes:
    return encode_metric_rows(zip([run_id] * len(columns), columns.names, columns.steps,
                                  columns.values, columns.timestamps_ms, columns.versions,
                                  strict=True))


def columns(names: list[str], first_version: int) -> PointColumns:
    count = len(names)
    return PointColumns(names=names, steps=list(range(count)),
                        values=[i / 3 for i in range(count)],
                        timestamps_ms=[1_700_000_000_000 + i for i in range(count)],
                        versions=range(first_version, first_version + count))


def commands_of(encoded: bytes) -> list[list[Any]]:
    """Encoded commands read back with the reply parser (a command is a RESP array too)."""
    parser = ReplyParser()
    parser.feed(encoded)
    commands = []
    while (command := parser.next_reply()) is not NEED_MORE:
        commands.append(command)
    return commands  # type: ignore[return-value]


def as_entry(xadd: list[bytes], entry_id: bytes = b"1-0") -> StreamEntry:
    flat = xadd[3:]
    return StreamEntry(xadd[1], entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))


def decode_rows(payload: bytes) -> list[tuple[str, str, int, float, int, int]]:
    rows, position = [], 0
    while position < len(payload):
        strings = []
        for _ in range(2):
            length = payload[position]  # short strings: a one-byte varint
            strings.append(payload[position + 1:position + 1 + length].decode())
            position += 1 + length
        step, value, timestamp_ms, version = struct.unpack_from("<qdqQ", payload, position)
        position += 32
        rows.append((strings[0], strings[1], step, value, timestamp_ms, version))
    return rows


def test_an_entry_carries_the_batch_rows_identity_and_versions() -> None:
    write = BatchWrite(identity=BatchIdentity("run-1", "b-7", 1000),
                       metrics=columns(["loss", "acc", "loss"], 1000),
                       system_metrics=columns(["cpu"], 1003))
    encoded, size = encode_xadd(KEYS, write)
    xadd, incrby = commands_of(encoded)
    assert xadd[:3] == [b"XADD", KEYS.stream_of("run-1"), b"*"]
    assert incrby == [b"INCRBY", b"t:ingest:queued-bytes", str(size).encode()]
    batch = decode_entry(as_entry(xadd))
    assert batch.identity == BatchIdentity("run-1", "b-7", 1000)
    assert (batch.metrics_rows, batch.system_rows) == (3, 1)
    assert entry_bytes(as_entry(xadd)) == size == len(xadd[16]) + len(xadd[18])
    assert decode_rows(batch.metrics) == [
        ("run-1", name, step, step / 3, 1_700_000_000_000 + step, 1000 + step)
        for step, name in enumerate(["loss", "acc", "loss"])]
    assert decode_rows(batch.system_metrics) == [
        ("run-1", "cpu", 0, 0.0, 1_700_000_000_000, 1003)]
    # The processor inserts the RowBinary of exactly the batch's rows.
    assert batch.metrics == rowbinary("run-1", write.metrics)


def test_versions_that_are_not_contiguous_are_carried_one_by_one() -> None:
    """Cardinality limits drop rows: the versions of the rest have gaps."""
    kept = PointColumns(names=["a", "c"], steps=[0, 2], values=[0.5, 2.5],
                        timestamps_ms=[7, 9], versions=[40, 42])
    write = BatchWrite(BatchIdentity("r", "b", 40), kept, EMPTY_COLUMNS)
    xadd, _ = commands_of(encode_xadd(KEYS, write)[0])
    batch = decode_entry(as_entry(xadd))
    assert decode_rows(batch.metrics) == [("r", "a", 0, 0.5, 7, 40), ("r", "c", 2, 2.5, 9, 42)]


def test_an_entry_of_an_older_server_in_rowbinary_is_still_read() -> None:
    metrics = rowbinary("run-1", columns(["loss", "acc"], 50))
    crc = zlib.crc32(b"", zlib.crc32(metrics))
    fields = {b"format": ROWBINARY_ENTRY_FORMAT, b"run": b"run-1", b"batch": b"b",
              b"first_version": b"50", b"metrics_rows": b"2", b"system_rows": b"0",
              b"metrics": metrics, b"system_metrics": b"", b"crc32": str(crc).encode()}
    batch = decode_entry(StreamEntry(b"s", b"1-0", fields))
    assert batch.metrics == metrics and batch.rows == 2
    assert entry_bytes(StreamEntry(b"s", b"1-0", fields)) == len(metrics)


def test_a_batch_without_id_or_system_metrics() -> None:
    write = BatchWrite(BatchIdentity("r", None, 5), columns(["m"], 5), EMPTY_COLUMNS)
    xadd, _ = commands_of(encode_xadd(KEYS, write)[0])
    batch = decode_entry(as_entry(xadd))
    assert batch.identity.batch_id is None and batch.system_metrics == b""


def test_a_run_always_goes_to_the_same_stream() -> None:
    assert KEYS.streams == (b"t:ingest:0", b"t:ingest:1", b"t:ingest:2", b"t:ingest:3")
    assert KEYS.stream_of("run-1") == StreamKeys("t:ingest", 4).stream_of("run-1")
    assert len({KEYS.stream_of(f"run-{i}") for i in range(100)}) == 4


def good_fields() -> dict[bytes, bytes]:
    write = BatchWrite(BatchIdentity("run-1", "b", 10), columns(["loss"] * 3, 10),
                       EMPTY_COLUMNS)
    xadd, _ = commands_of(encode_xadd(KEYS, write)[0])
    return as_entry(xadd).fields or {}


@pytest.mark.parametrize(("change", "reason"), [
    ({b"format": b"something.else"}, "not an mlrun batch entry"),
    ({b"run": None}, "'run' is missing"),
    ({b"first_version": b"ten"}, "does not parse"),
    ({b"metrics_rows": b"-1"}, "negative"),
    ({b"run": b""}, "empty run id"),
    ({b"metrics": b"\x05run-1\x04loss"}, "checksum mismatch"),
    ({b"metrics_rows": b"9"}, "cannot hold 9 rows"),
    ({b"system_rows": b"1"}, "cannot hold 1 rows"),
    ({b"metrics": b"\x93\x01\x02\x03", b"crc32": str(zlib.crc32(b"\x93\x01\x02\x03")).encode()},
     "columns do not decode"),
])
def test_malformed_entries_are_refused_with_a_reason(change: dict[bytes, bytes | None],
                                                     reason: str) -> None:
    fields = good_fields()
    decode_entry(StreamEntry(b"s", b"1-0", fields))
    for name, value in change.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    with pytest.raises(MalformedEntry, match=reason):
        decode_entry(StreamEntry(b"s", b"1-0", fields))


def test_foreign_and_deleted_entries() -> None:
    with pytest.raises(MalformedEntry, match="not an mlrun batch"):
        decode_entry(StreamEntry(b"s", b"1-0", {b"hello": b"world"}))
    with pytest.raises(MalformedEntry, match="deleted"):
        decode_entry(StreamEntry(b"s", b"1-0", None))
    assert entry_bytes(StreamEntry(b"s", b"1-0", {b"metrics": b"xx"})) == 0  # nobody counted it
    assert entry_bytes(StreamEntry(b"s", b"1-0", {b"format": ENTRY_FORMAT,
                                                  b"metrics": b"xx"})) == 2
