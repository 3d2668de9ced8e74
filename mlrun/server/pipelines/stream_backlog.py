"""`QueueBacklog` on the Redis streams of queued ingest: what a purge waits for before it
deletes a run's rows in ClickHouse (ports/queue_backlog.py says why).

Owns: the mark (`XREVRANGE <stream> + - COUNT 1` of every stream, one pipelined round trip) and
the check (`XRANGE <stream> - <mark> COUNT 1`: is an entry at or before the mark still there?).
It relies on the processors' acknowledgement deleting an entry from its stream (XACK + XDEL in
one script, pipelines/stream_processor.py) and on dead-lettered entries being moved out of it.
Must not import the edges, the use-cases or the runtime.
"""

from __future__ import annotations

from mlrun.server.errors import BackendError
from mlrun.server.pipelines.stream_entries import StreamKeys
from mlrun.server.ports.queue_backlog import BacklogMark
from mlrun.server.protocols.resp import Reply
from mlrun.server.storage.redis.client import BACKEND, RedisClient, raise_for_reply

_EMPTY_STREAM_MARK = b"0-0"


class StreamBacklog:
    def __init__(self, redis: RedisClient, keys: StreamKeys, *, timeout_s: float = 5.0) -> None:
        self._redis = redis
        self._keys = keys
        self._timeout_s = timeout_s

    async def newest(self) -> BacklogMark:
        replies = await self._redis.pipeline(
            [("XREVRANGE", stream, "+", "-", "COUNT", "1") for stream in self._keys.streams],
            timeout_s=self._timeout_s)
        return tuple(_first_entry_id(raise_for_reply(reply, "XREVRANGE")) or _EMPTY_STREAM_MARK
                     for reply in replies)

    async def left_up_to(self, mark: BacklogMark) -> int:
        if len(mark) != len(self._keys.streams):
            raise ValueError("a backlog mark of another queue layout")
        pending = [(stream, newest) for stream, newest in zip(self._keys.streams, mark, strict=True)
                   if newest != _EMPTY_STREAM_MARK]
        if not pending:
            return 0
        replies = await self._redis.pipeline(
            [("XRANGE", stream, "-", newest, "COUNT", "1") for stream, newest in pending],
            timeout_s=self._timeout_s)
        return sum(1 for reply in replies
                   if _first_entry_id(raise_for_reply(reply, "XRANGE")) is not None)


def _first_entry_id(reply: Reply) -> bytes | None:
    """The id of the first entry of an XRANGE/XREVRANGE reply ([[id, fields], ...]), if any."""
    if not isinstance(reply, list):
        raise BackendError("redis answered XRANGE with no array", backend=BACKEND,
                           detail=type(reply).__name__)
    if not reply:
        return None
    entry = reply[0]
    if not isinstance(entry, list) or not entry or not isinstance(entry[0], bytes):
        raise BackendError("redis answered XRANGE with an entry without an id",
                           backend=BACKEND, detail=repr(entry)[:100])
    return entry[0]
