"""RESP2, the Redis serialization protocol, without I/O: command encoding and an incremental
reply parser.

Owns: turning a command (a sequence of arguments) into the bytes Redis reads (an array of bulk
strings), counting the commands in such bytes, and turning whatever bytes arrive back into
replies, one at a time, however the bytes were split across reads. The async client
(`mlrun.server.storage.redis`) only moves bytes between a socket and these functions.

Replies as Python values:

    +OK              -> str            (a status: "OK", "QUEUED", "PONG")
    -ERR message     -> ReplyError     (a value, not raised: a pipeline's replies come together,
                                        and one command's error must not hide the others')
    :42              -> int
    $3 abc / $-1     -> bytes / None   (bulk strings stay bytes: stream payloads are binary)
    *2 ... / *-1     -> list / None    (nested to any depth)

Must not import anyio, sockets or anything else that does I/O, nor any other part of the
server: plain functions and classes, unit-tested without an event loop.

Invariants:
- `ReplyParser.next_reply` consumes exactly one whole reply or nothing: a reply split at any
  byte arrives whole once its last byte was fed, and bytes after it stay for the next call.
- Work is linear in the bytes fed: a partly received array keeps the elements parsed so far
  (a stack of open arrays), so a large reply arriving in small reads is never re-parsed.
- Malformed input raises `ProtocolError`; a bulk string or array longer than the parser's
  bounds does too (a corrupt length must not make the client allocate gigabytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, TypeAlias

CommandArg: TypeAlias = bytes | str | int | float
Reply: TypeAlias = "bytes | str | int | ReplyError | list[Reply] | None"

# Redis's own limit for one bulk string (proto-max-bulk-len default).
MAX_BULK_BYTES: Final = 512 * 1024 * 1024
MAX_ARRAY_LENGTH: Final = 64 * 1024 * 1024
# A header line (type byte, length or status text) is short; a missing CRLF within this many
# bytes means the stream is not RESP.
_MAX_LINE_BYTES: Final = 64 * 1024

# Kinds of error replies that mean "not now", not "wrong": the server is loading its data set,
# busy with a script, a replica without its primary, or out of memory (maxmemory).
TRANSIENT_ERROR_KINDS: Final = frozenset(
    {"LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM"})


class ProtocolError(Exception):
    """The bytes are not a RESP2 reply (or exceed the parser's bounds)."""


class ReplyError:
    """An error reply (`-KIND message`). `kind` is its first word, e.g. ERR, WRONGTYPE, NOGROUP,
    BUSYGROUP, OOM, LOADING, EXECABORT, NOSCRIPT, WRONGPASS."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    @property
    def kind(self) -> str:
        return self.message.split(" ", 1)[0]

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_ERROR_KINDS

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplyError) and other.message == self.message

    def __hash__(self) -> int:
        return hash(self.message)

    def __repr__(self) -> str:
        return f"ReplyError({self.message!r})"


# --------------------------------------------------------------------------- commands


def _arg_bytes(arg: CommandArg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):  # bool is an int; Redis has no booleans, so refuse the ambiguity
        raise TypeError("a Redis command argument cannot be a bool")
    if isinstance(arg, int):
        return str(arg).encode()
    if isinstance(arg, float):
        return repr(arg).encode()  # repr round-trips; Redis parses "1e-05" and "inf" alike
    raise TypeError(f"a Redis command argument cannot be a {type(arg).__name__}")


def encode_command(*args: CommandArg) -> bytes:
    """One command as a RESP array of bulk strings: `*N\\r\\n` then `$len\\r\\narg\\r\\n` each."""
    if not args:
        raise ValueError("a command needs at least its name")
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg_bytes(arg)
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


def encode_commands(commands: Iterable[Sequence[CommandArg]]) -> bytes:
    """Several commands back to back: a pipeline sent in one write."""
    return b"".join(encode_command(*command) for command in commands)


def count_commands(data: bytes) -> int:
    """How many whole commands `data` (the output of `encode_command(s)`) holds. Walks the
    headers and jumps over every argument, so the cost is per argument, not per byte."""
    count = 0
    position = 0
    end = len(data)
    while position < end:
        if data[position:position + 1] != b"*":
            raise ProtocolError(f"expected a command array at byte {position}")
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            raise ProtocolError("truncated command header")
        arguments = int(data[position + 1:line_end])
        position = line_end + 2
        for _ in range(arguments):
            if data[position:position + 1] != b"$":
                raise ProtocolError(f"expected a bulk string at byte {position}")
            line_end = data.find(b"\r\n", position)
            if line_end < 0:
                raise ProtocolError("truncated argument header")
            position = line_end + 2 + int(data[position + 1:line_end]) + 2
            if position > end:
                raise ProtocolError("truncated argument")
        count += 1
    return count


# --------------------------------------------------------------------------- replies


class _NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = _NeedMore()


class _ArrayHeader:
    __slots__ = ("length",)

    def __init__(self, length: int) -> None:
        self.length = length


class ReplyParser:
    """Feed bytes as they arrive; take whole replies out with `next_reply()` until it answers
    `NEED_MORE`."""

    def __init__(self, *, max_bulk_bytes: int = MAX_BULK_BYTES,
                 max_array_length: int = MAX_ARRAY_LENGTH) -> None:
        self._buffer = bytearray()
        self._position = 0
        # Arrays begun but not complete: (elements so far, expected length), innermost last.
        self._open: list[tuple[list[Reply], int]] = []
        self._max_bulk_bytes = max_bulk_bytes
        self._max_array_length = max_array_length

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet part of a returned reply (an open array's parsed
        elements are held as values, not counted here)."""
        return len(self._buffer) - self._position

    def next_reply(self) -> Reply | _NeedMore:
        while True:
            element = self._read_element()
            if element is NEED_MORE:
                self._compact()
                return NEED_MORE
            value: Reply
            if isinstance(element, _ArrayHeader):
                if element.length > 0:
                    self._open.append(([], element.length))
                    continue
                value = []
            else:
                value = element  # type: ignore[assignment]
            # Hand the finished value up through every array it completes.
            while self._open:
                items, expected = self._open[-1]
                items.append(value)
                if len(items) < expected:
                    break
                self._open.pop()
                value = items
            else:
                return value

    def _compact(self) -> None:
        if self._position:
            del self._buffer[:self._position]
            self._position = 0

    def _read_element(self) -> Reply | _ArrayHeader | _NeedMore:
        """One scalar or one array header; consumes nothing unless it is whole."""
        buffer = self._buffer
        start = self._position
        line_end = buffer.find(b"\r\n", start)
        if line_end < 0:
            if len(buffer) - start > _MAX_LINE_BYTES:
                raise ProtocolError("no line end in a reply header")
            return NEED_MORE
        kind = buffer[start]
        line = bytes(buffer[start + 1:line_end])
        after_line = line_end + 2
        if kind == 0x24:  # $ bulk string
            length = _length(line)
            if length < 0:
                self._position = after_line
                return None
            if length > self._max_bulk_bytes:
                raise ProtocolError(f"bulk string of {length} bytes is over the bound")
            data_end = after_line + length
            if len(buffer) < data_end + 2:
                return NEED_MORE
            if buffer[data_end:data_end + 2] != b"\r\n":
                raise ProtocolError("bulk string not followed by CRLF")
            with memoryview(buffer) as view:
                data = view[after_line:data_end].tobytes()
            self._position = data_end + 2
            return data
        self._position = after_line
        if kind == 0x2B:  # + status
            return line.decode("utf-8", "replace")
        if kind == 0x2D:  # - error
            return ReplyError(line.decode("utf-8", "replace"))
        if kind == 0x3A:  # : integer
            return _length(line)
        if kind == 0x2A:  # * array
            length = _length(line)
            if length < 0:
                return None
            if length > self._max_array_length:
                raise ProtocolError(f"array of {length} elements is over the bound")
            return _ArrayHeader(length)
        self._position = start
        raise ProtocolError(f"unknown reply type byte {kind!r}")


def _length(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise ProtocolError(f"expected an integer, got {line[:40]!r}") from None
