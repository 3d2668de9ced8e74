"""Retry policy decisions: the table of answers -> outcomes for HTTP and gRPC, Retry-After in
both forms, RetryInfo decoding, and the backoff's bounds."""

from __future__ import annotations

import email.utils
import random

import pytest
from status_details import RETRY_INFO_TYPE_URL, retry_info, status_details

from mlrun.sdk.retry import (
    DEFAULT_RETRY_AFTER_S,
    Backoff,
    Overloaded,
    Rejected,
    Unavailable,
    grpc_outcome,
    http_outcome,
    parse_retry_after,
)
from mlrun.wire.rpc_status import retry_delay_s_from_status_details


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (429, "3", Overloaded(3.0)),
        (429, None, Overloaded(DEFAULT_RETRY_AFTER_S)),
        (429, "9999", Overloaded(60.0)),  # capped by max_retry_after_s
        (500, None, Unavailable("HTTP 500 internal")),
        (502, None, Unavailable("HTTP 502 internal")),
        (503, "5", Unavailable("HTTP 503 internal")),
        (504, None, Unavailable("HTTP 504 internal")),
        (408, None, Unavailable("HTTP 408 internal")),
        (400, None, Rejected("HTTP 400", "internal", "msg")),
        (401, None, Rejected("HTTP 401", "internal", "msg")),
        (403, None, Rejected("HTTP 403", "internal", "msg")),
        (404, None, Rejected("HTTP 404", "internal", "msg")),
        (409, None, Rejected("HTTP 409", "internal", "msg")),
        (413, None, Rejected("HTTP 413", "internal", "msg")),
    ],
)
def test_http_status_table(status: int, retry_after: str | None, expected: object) -> None:
    outcome = http_outcome(status, retry_after=retry_after, code="internal", message="msg",
                           max_retry_after_s=60.0)
    assert outcome == expected


def test_http_rejection_keeps_the_servers_code() -> None:
    outcome = http_outcome(409, retry_after=None, code="batch_conflict", message="different",
                           max_retry_after_s=60)
    assert outcome == Rejected("HTTP 409", "batch_conflict", "different")


def test_retry_after_forms() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after(date, now_s=now) == pytest.approx(7.0)


def test_retry_info_is_read_from_status_details() -> None:
    data = status_details(("type.googleapis.com/google.rpc.DebugInfo", b"\x0a\x01x"),
                          (RETRY_INFO_TYPE_URL, retry_info(2, 500_000_000)))
    assert retry_delay_s_from_status_details(data) == pytest.approx(2.5)
    assert retry_delay_s_from_status_details(status_details()) is None
    assert retry_delay_s_from_status_details(data[:-3]) is None  # truncated: no guess
    assert retry_delay_s_from_status_details(b"\xff\xff\xff") is None


@pytest.mark.parametrize(
    ("code", "trailing", "expected"),
    [
        ("RESOURCE_EXHAUSTED", {"retry-after-ms": "1500"}, Overloaded(1.5)),
        ("RESOURCE_EXHAUSTED",
         {"grpc-status-details-bin": status_details((RETRY_INFO_TYPE_URL, retry_info(3, 0)))},
         Overloaded(3.0)),
        ("RESOURCE_EXHAUSTED", {}, Overloaded(DEFAULT_RETRY_AFTER_S)),
        ("UNAVAILABLE", {}, Unavailable("gRPC UNAVAILABLE unavailable")),
        ("DEADLINE_EXCEEDED", {}, Unavailable("gRPC DEADLINE_EXCEEDED deadline_exceeded")),
        ("INTERNAL", {"mlrun-error-code": "backend_error"},
         Unavailable("gRPC INTERNAL backend_error")),
        ("INVALID_ARGUMENT", {"mlrun-error-code": "invalid_field"},
         Rejected("gRPC INVALID_ARGUMENT", "invalid_field", "details")),
        ("UNAUTHENTICATED", {}, Rejected("gRPC UNAUTHENTICATED", "unauthenticated", "details")),
        ("PERMISSION_DENIED", {}, Rejected("gRPC PERMISSION_DENIED", "permission_denied",
                                           "details")),
        ("NOT_FOUND", {}, Rejected("gRPC NOT_FOUND", "not_found", "details")),
        ("FAILED_PRECONDITION", {"mlrun-error-code": "run_finished"},
         Rejected("gRPC FAILED_PRECONDITION", "run_finished", "details")),
        ("ALREADY_EXISTS", {"mlrun-error-code": "batch_conflict"},
         Rejected("gRPC ALREADY_EXISTS", "batch_conflict", "details")),
    ],
)
def test_grpc_status_table(code: str, trailing: dict[str, str | bytes], expected: object) -> None:
    assert grpc_outcome(code, trailing=trailing, details="details",
                        max_retry_after_s=60.0) == expected


def test_backoff_grows_is_capped_and_jittered() -> None:
    backoff = Backoff(base_s=0.1, max_s=2.0, rng=random.Random(7))
    for attempt in range(40):
        cap = min(2.0, 0.1 * 2**attempt)
        delays = {backoff.unavailable_delay_s(attempt) for _ in range(20)}
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(delays) > 1  # jittered, not a fixed schedule
    for retry_after in (0.0, 1.0, 30.0):
        delay = backoff.overloaded_delay_s(retry_after)
        assert retry_after <= delay <= retry_after * 1.1 + 0.05
