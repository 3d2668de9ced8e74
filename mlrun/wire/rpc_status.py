"""The `grpc-status-details-bin` trailer: a `google.rpc.Status` carrying a `google.rpc.RetryInfo`,
encoded by the server (`encode_retry_status`) and read by the SDK
(`retry_delay_s_from_status_details`), in one place for both sides, without the
googleapis-common-protos package (not a dependency; four tiny messages do not justify one).

    google.rpc.Status    { int32 code = 1; string message = 2;
                           repeated google.protobuf.Any details = 3; }
    google.protobuf.Any  { string type_url = 1; bytes value = 2; }
    google.rpc.RetryInfo { google.protobuf.Duration retry_delay = 1; }
    google.protobuf.Duration { int64 seconds = 1; int32 nanos = 2; }

A small protobuf wire-format writer and reader (varints and length-delimited fields; other wire
types are skipped when reading). Anything malformed reads as None: the caller falls back to its
default delay. The tests decode what is written with descriptors built from the published
.proto definitions.

Pure functions; must not import grpc, protobuf, the server or the SDK.
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


def encode_retry_status(code: int, message: str, retry_after_ms: int) -> bytes:
    """google.rpc.Status{code, message, details: [Any(google.rpc.RetryInfo{retry_delay})]}."""
    retry_after_ms = max(0, retry_after_ms)
    seconds, nanos = retry_after_ms // 1000, (retry_after_ms % 1000) * 1_000_000
    duration = _tagged_varint(1, seconds) if seconds else b""  # Duration.seconds = 1
    duration += _tagged_varint(2, nanos) if nanos else b""  # Duration.nanos = 2
    retry_info = _length_delimited(1, duration)  # RetryInfo.retry_delay = 1
    detail = (_length_delimited(1, RETRY_INFO_TYPE_URL.encode())  # Any.type_url = 1
              + _length_delimited(2, retry_info))  # Any.value = 2
    return (_tagged_varint(1, code)  # Status.code = 1
            + _length_delimited(2, message.encode())  # Status.message = 2
            + _length_delimited(3, detail))  # Status.details = 3 (repeated Any)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tagged_varint(field_number: int, value: int) -> bytes:
    return _encode_varint(field_number << 3 | _VARINT) + _encode_varint(value)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return (_encode_varint(field_number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(payload))
            + payload)


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
