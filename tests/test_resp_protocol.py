"""RESP2 without I/O: command encoding, command counting, and the incremental reply parser fed
every possible split of its input; the stream reply shapes. No event loop, no server."""

from __future__ import annotations

import pytest

from mlrun.server.protocols.redis_streams import (
    GroupInfo,
    StreamEntry,
    parse_autoclaim_reply,
    parse_info,
    parse_read_reply,
    parse_xinfo_groups,
)
from mlrun.server.protocols.resp import (
    NEED_MORE,
    ProtocolError,
    Reply,
    ReplyError,
    ReplyParser,
    count_commands,
    encode_command,
    encode_commands,
)


def test_a_command_is_an_array_of_bulk_strings() -> None:
    assert encode_command("SET", "k", b"\x00\r\n", 42, 1.5) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n\x00\r\n\r\n$2\r\n42\r\n$3\r\n1.5\r\n")
    assert encode_command("GET", "é") == b"*2\r\n$3\r\nGET\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(TypeError):
        encode_command("SET", "k", True)
    with pytest.raises(ValueError):
        encode_command()


def test_commands_are_counted_without_reading_their_arguments() -> None:
    tricky = b"*1\r\n$4\r\nPING\r\n" * 3  # an argument that looks like commands
    payload = encode_commands([("PING",), ("SET", "k", tricky), ("XADD", "s", "*", "f", b"")])
    assert count_commands(payload) == 3
    assert count_commands(b"") == 0
    with pytest.raises(ProtocolError):
        count_commands(payload[:-3])
    with pytest.raises(ProtocolError):
        count_commands(b"+OK\r\n")


REPLIES: list[tuple[bytes, Reply]] = [
    (b"+OK\r\n", "OK"),
    (b"-ERR unknown command 'X'\r\n", ReplyError("ERR unknown command 'X'")),
    (b":-12\r\n", -12),
    (b"$5\r\nab\r\nc\r\n", b"ab\r\nc"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n*0\r\n$-1\r\n", [1, [b"a", []], None]),
    (b"*2\r\n*1\r\n*1\r\n:7\r\n+QUEUED\r\n", [[[7]], "QUEUED"]),
]


@pytest.mark.parametrize(("data", "expected"), REPLIES)
def test_every_reply_type_parses_whole_and_at_every_split(data: bytes, expected: Reply) -> None:
    for split in range(len(data) + 1):
        parser = ReplyParser()
        parser.feed(data[:split])
        first = parser.next_reply()
        if first is NEED_MORE:
            parser.feed(data[split:])
            first = parser.next_reply()
        assert first == expected, split
        assert parser.next_reply() is NEED_MORE
        assert parser.buffered_bytes == 0


def test_byte_by_byte_feeding_of_a_pipeline_yields_each_reply_once_in_order() -> None:
    stream = b"".join(data for data, _ in REPLIES)
    parser = ReplyParser()
    got: list[Reply] = []
    for byte in stream:
        parser.feed(bytes([byte]))
        while (reply := parser.next_reply()) is not NEED_MORE:
            got.append(reply)  # type: ignore[arg-type]
    assert got == [expected for _, expected in REPLIES]


def test_error_replies_know_their_kind_and_whether_they_pass() -> None:
    assert ReplyError("OOM command not allowed").transient
    assert ReplyError("LOADING Redis is loading").kind == "LOADING"
    assert not ReplyError("WRONGTYPE Operation against a key").transient


@pytest.mark.parametrize("data", [b"?x\r\n", b":abc\r\n", b"$3\r\nabcde\r\n", b"$x\r\n"])
def test_malformed_input_is_a_protocol_error(data: bytes) -> None:
    parser = ReplyParser()
    parser.feed(data)
    with pytest.raises(ProtocolError):
        parser.next_reply()


def test_lengths_over_the_bounds_are_refused_before_allocating() -> None:
    parser = ReplyParser(max_bulk_bytes=10, max_array_length=3)
    parser.feed(b"$11\r\n")
    with pytest.raises(ProtocolError):
        parser.next_reply()
    parser = ReplyParser(max_bulk_bytes=10, max_array_length=3)
    parser.feed(b"*4\r\n")
    with pytest.raises(ProtocolError):
        parser.next_reply()
    parser = ReplyParser()
    parser.feed(b"+" + b"x" * 70_000)
    with pytest.raises(ProtocolError):
        parser.next_reply()


def test_stream_read_and_autoclaim_replies_become_entries() -> None:
    read = [[b"s:0", [[b"1-0", [b"a", b"1", b"b", b"2"]], [b"2-0", None]]],
            [b"s:1", [[b"3-0", []]]]]
    assert parse_read_reply(read) == [
        StreamEntry(b"s:0", b"1-0", {b"a": b"1", b"b": b"2"}),
        StreamEntry(b"s:0", b"2-0", None),
        StreamEntry(b"s:1", b"3-0", {}),
    ]
    assert parse_read_reply(None) == []
    claimed = parse_autoclaim_reply(b"s:0", [b"0-0", [[b"1-0", [b"a", b"1"]]], [b"2-0"]])
    assert claimed.next_cursor == b"0-0" and claimed.deleted_ids == [b"2-0"]
    assert claimed.entries == [StreamEntry(b"s:0", b"1-0", {b"a": b"1"})]
    for bad in ([b"s", [[b"1-0", [b"odd"]]]], "OK", [[b"s"]]):
        with pytest.raises(ProtocolError):
            parse_read_reply([bad] if not isinstance(bad, str) else bad)


def test_group_and_memory_info() -> None:
    groups = [[b"name", b"g", b"consumers", 2, b"pending", 5, b"last-delivered-id", b"9-0",
               b"entries-read", 9, b"lag", 3]]
    assert parse_xinfo_groups(groups) == [GroupInfo("g", 2, 5, 3)]
    info = parse_info(b"# Memory\r\nused_memory:1024\r\nmaxmemory:0\r\n\r\n")
    assert info == {"used_memory": "1024", "maxmemory": "0"}
