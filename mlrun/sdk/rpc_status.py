"""Reading `google.rpc.RetryInfo` out of a gRPC `grpc-status-details-bin` trailer, without the
googleapis-common-protos package (not a dependency; three tiny messages do not justify one).

    google.rpc.Status    { int32 code = 1; string message = 2;
                           repeated google.protobuf.Any details = 3; }
    google.protobuf.Any  { string type_url = 1; bytes value = 2; }
    google.rpc.RetryInfo { google.protobuf.Duration retry_delay = 1; }
    google.protobuf.Duration { int64 seconds = 1; int32 nanos = 2; }

A small protobuf wire-format reader (varints and length-delimited fields; other wire types are
skipped). Anything malformed yields None: the caller falls back to its default delay.

Pure functions; must not import grpc or protobuf.
"""

from __future__ import annotations

from collections.abc import Iterator

RETRY_INFO_TYPE_URL = "type.googleapis.com/google.rpc.RetryInfo"

_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_FIXED32 = 5


class _Malformed(Exception):
    pass


def retry_delay_s_from_status_details(data: bytes) -> float | None:
    """The RetryInfo delay carried by a serialized google.rpc.Status, in seconds, or None."""
    try:
        for number, value in _fields(data):
            if number != 3 or not isinstance(value, bytes):
                continue
            type_url, payload = "", b""
            for any_number, any_value in _fields(value):
                if any_number == 1 and isinstance(any_value, bytes):
                    type_url = any_value.decode("utf-8", "replace")
                elif any_number == 2 and isinstance(any_value, bytes):
                    payload = any_value
            if type_url == RETRY_INFO_TYPE_URL:
                return _retry_info_delay_s(payload)
    except _Malformed:
        return None
    return None


def _retry_info_delay_s(data: bytes) -> float | None:
    for number, value in _fields(data):
        if number == 1 and isinstance(value, bytes):
            seconds = nanos = 0
            for d_number, d_value in _fields(value):
                if d_number == 1 and isinstance(d_value, int):
                    seconds = _signed64(d_value)
                elif d_number == 2 and isinstance(d_value, int):
                    nanos = _signed64(d_value)
            return max(0.0, seconds + nanos / 1e9)
    return None


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    offset = 0
    while offset < len(data):
        key, offset = _varint(data, offset)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, offset = _varint(data, offset)
            yield number, value
        elif wire_type == _LENGTH_DELIMITED:
            length, offset = _varint(data, offset)
            if offset + length > len(data):
                raise _Malformed("length-delimited field runs past the end")
            yield number, data[offset : offset + length]
            offset += length
        elif wire_type == _FIXED64:
            offset += 8
        elif wire_type == _FIXED32:
            offset += 4
        else:
            raise _Malformed(f"unsupported wire type {wire_type}")
        if offset > len(data):
            raise _Malformed("field runs past the end")


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise _Malformed("truncated varint")
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, offset
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value
