"""The reply shapes of the Redis commands queued ingest uses, as records, without I/O.

Owns: reading XREADGROUP, XAUTOCLAIM, XINFO GROUPS and INFO replies (already parsed into
Python values by `protocols.resp`) into plain records, and refusing any other shape with
`ProtocolError`. What an entry's fields *mean* is the write path's business
(`mlrun.server.pipelines.stream_entries`), not this module's.

    XREADGROUP ... STREAMS s1 s2 > >   -> [[s1, [[id, [f, v, ...]], ...]], ...] | nil
    XAUTOCLAIM s g c idle cursor       -> [next_cursor, [[id, [f, v, ...]], ...], [deleted ids]]
    XINFO GROUPS s                     -> [[name, g, consumers, n, pending, n, ..., lag, n], ...]
    INFO memory                        -> "# Memory\\r\\nused_memory:123\\r\\n..."

An entry whose id is pending but whose data was deleted comes back with fields nil
(`StreamEntry.fields` None).

Must not import anyio or anything that does I/O, nor any other part of the server.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlrun.server.protocols.resp import ProtocolError, Reply


@dataclass(frozen=True, slots=True)
class StreamEntry:
    stream: bytes
    entry_id: bytes
    fields: dict[bytes, bytes] | None  # None: the id is pending but its entry was deleted


def _entries(stream: bytes, reply: Reply) -> list[StreamEntry]:
    if not isinstance(reply, list):
        raise ProtocolError("stream entries: expected an array")
    entries = []
    for item in reply:
        if not (isinstance(item, list) and len(item) == 2):
            raise ProtocolError("stream entry: expected [id, fields]")
        entry_id, flat = item
        if not isinstance(entry_id, bytes):
            raise ProtocolError("stream entry: expected an id")
        if flat is None:
            entries.append(StreamEntry(stream, entry_id, None))
            continue
        if not isinstance(flat, list) or len(flat) % 2:
            raise ProtocolError("stream entry: expected an even list of fields and values")
        if not all(isinstance(part, bytes) for part in flat):
            raise ProtocolError("stream entry: fields and values must be bulk strings")
        fields: dict[bytes, bytes] = dict(zip(flat[::2], flat[1::2], strict=True))  # type: ignore[arg-type]
        entries.append(StreamEntry(stream, entry_id, fields))
    return entries


def parse_read_reply(reply: Reply) -> list[StreamEntry]:
    """XREAD / XREADGROUP: every entry of every stream, in the order Redis sent them (nil, when
    a BLOCK ran out with nothing new, is no entries)."""
    if reply is None:
        return []
    if not isinstance(reply, list):
        raise ProtocolError("XREADGROUP: expected an array or nil")
    entries: list[StreamEntry] = []
    for stream_reply in reply:
        if not (isinstance(stream_reply, list) and len(stream_reply) == 2
                and isinstance(stream_reply[0], bytes)):
            raise ProtocolError("XREADGROUP: expected [stream, entries]")
        entries.extend(_entries(stream_reply[0], stream_reply[1]))
    return entries


@dataclass(frozen=True, slots=True)
class AutoclaimResult:
    next_cursor: bytes  # b"0-0" once the whole pending list was scanned
    entries: list[StreamEntry]
    deleted_ids: list[bytes]  # pending ids whose entries were gone (Redis dropped them)


def parse_autoclaim_reply(stream: bytes, reply: Reply) -> AutoclaimResult:
    if not (isinstance(reply, list) and len(reply) in (2, 3) and isinstance(reply[0], bytes)):
        raise ProtocolError("XAUTOCLAIM: expected [cursor, entries, deleted]")
    deleted = reply[2] if len(reply) == 3 else []
    if not (isinstance(deleted, list) and all(isinstance(i, bytes) for i in deleted)):
        raise ProtocolError("XAUTOCLAIM: expected a list of deleted ids")
    return AutoclaimResult(reply[0], _entries(stream, reply[1]), deleted)  # type: ignore[arg-type]


def _pairs(reply: Reply, what: str) -> dict[str, Reply]:
    if not isinstance(reply, list) or len(reply) % 2:
        raise ProtocolError(f"{what}: expected an even list of names and values")
    info: dict[str, Reply] = {}
    for name, value in zip(reply[::2], reply[1::2], strict=True):
        if not isinstance(name, bytes | str):
            raise ProtocolError(f"{what}: expected a name")
        info[name.decode() if isinstance(name, bytes) else name] = value
    return info


@dataclass(frozen=True, slots=True)
class GroupInfo:
    name: str
    consumers: int
    pending: int
    lag: int | None  # None: Redis cannot tell (entries were deleted out of order)


def parse_xinfo_groups(reply: Reply) -> list[GroupInfo]:
    if not isinstance(reply, list):
        raise ProtocolError("XINFO GROUPS: expected an array")
    groups = []
    for item in reply:
        info = _pairs(item, "XINFO GROUPS")
        name, consumers, pending = info.get("name"), info.get("consumers"), info.get("pending")
        lag = info.get("lag")
        if not (isinstance(name, bytes) and isinstance(consumers, int)
                and isinstance(pending, int) and (lag is None or isinstance(lag, int))):
            raise ProtocolError("XINFO GROUPS: missing name, consumers or pending")
        groups.append(GroupInfo(name.decode(), consumers, pending, lag))
    return groups


def parse_info(reply: Reply) -> dict[str, str]:
    """INFO's `name:value` lines (section headers and blank lines skipped)."""
    if not isinstance(reply, bytes):
        raise ProtocolError("INFO: expected a bulk string")
    info = {}
    for line in reply.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#") and ":" in line:
            name, value = line.split(":", 1)
            info[name] = value
    return info
