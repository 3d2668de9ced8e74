"""Building a serialized google.rpc.Status carrying google.rpc.RetryInfo, by hand (the
googleapis-common-protos package is not a dependency), for the SDK's gRPC retry tests."""

from __future__ import annotations

from google.protobuf import any_pb2, duration_pb2

RETRY_INFO_TYPE_URL = "type.googleapis.com/google.rpc.RetryInfo"


def retry_info(seconds: int, nanos: int) -> bytes:
    duration = bytes(duration_pb2.Duration(seconds=seconds, nanos=nanos).SerializeToString())
    return b"\x0a" + bytes([len(duration)]) + duration


def status_details(*details: tuple[str, bytes]) -> bytes:
    """google.rpc.Status {code: 8, message: "full", details: [Any(type_url, value)...]}."""
    out = b"\x08\x08" + b"\x12\x04full"
    for type_url, value in details:
        packed = bytes(any_pb2.Any(type_url=type_url, value=value).SerializeToString())
        out += b"\x1a" + bytes([len(packed)]) + packed
    return out
