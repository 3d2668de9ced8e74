"""What a delivery attempt's answer means, and how long to wait before the next one.

Pure decisions, no I/O: both transports turn their answers into one `Outcome`, and the sender
acts on the outcome alone, so HTTP and gRPC behave the same by construction.

    answer                                        outcome       sender's action
    2xx / OK                                      Delivered     settle the operation
    429 + Retry-After / RESOURCE_EXHAUSTED        Overloaded    wait the server's delay (+ jitter),
      + retry-after-ms or google.rpc.RetryInfo                  retry the same batch, indefinitely
    5xx, 408, timeouts, connection errors /       Unavailable   exponential backoff with jitter,
      UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL,                 capped; past `offline_after_s`
      UNKNOWN, ABORTED, CANCELLED                               the run spools and probes
    other 4xx (400 401 403 404 409 413 ...) /     Rejected      not retried: reported once and
      INVALID_ARGUMENT, UNAUTHENTICATED, ...                    kept in a dead-letter file

Must not import httpx or grpc (the transports adapt their own types to these functions).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

from mlrun.wire.rpc_status import retry_delay_s_from_status_details

DEFAULT_RETRY_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class Delivered:
    accepted: int = 0
    duplicate: bool = False
    warnings: tuple[tuple[str, str], ...] = ()  # (code, message) from the server
    run_name: str | None = None


@dataclass(frozen=True, slots=True)
class Overloaded:
    retry_after_s: float


@dataclass(frozen=True, slots=True)
class Unavailable:
    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    status: str  # "HTTP 404" or "gRPC NOT_FOUND"
    code: str  # the server's machine code
    message: str


Outcome = Delivered | Overloaded | Unavailable | Rejected

_RETRYABLE_GRPC = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "ABORTED", "CANCELLED"}
)


def http_outcome(
    status: int, *, retry_after: str | None, code: str, message: str, max_retry_after_s: float
) -> Outcome:
    """The outcome of a non-2xx HTTP answer (`code`/`message` from the error body, if any)."""
    if status == 429:
        delay_s = parse_retry_after(retry_after)
        return Overloaded(_clamp(delay_s, max_retry_after_s))
    if status >= 500 or status == 408:
        return Unavailable(f"HTTP {status} {code}".rstrip())
    return Rejected(f"HTTP {status}", code or "http_error", message)


def grpc_outcome(
    code_name: str, *, trailing: Mapping[str, str | bytes], details: str, max_retry_after_s: float
) -> Outcome:
    """The outcome of a failed gRPC call (`code_name` is the grpc.StatusCode's name)."""
    machine_code = _text(trailing.get("mlrun-error-code")) or code_name.lower()
    if code_name == "RESOURCE_EXHAUSTED":
        delay_s = _retry_after_ms(trailing.get("retry-after-ms"))
        if delay_s is None:
            details_bin = trailing.get("grpc-status-details-bin")
            if isinstance(details_bin, bytes):
                delay_s = retry_delay_s_from_status_details(details_bin)
        return Overloaded(_clamp(delay_s, max_retry_after_s))
    if code_name in _RETRYABLE_GRPC:
        return Unavailable(f"gRPC {code_name} {machine_code}")
    return Rejected(f"gRPC {code_name}", machine_code, details)


def parse_retry_after(value: str | None, *, now_s: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3); None if absent
    or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils  # rare (HTTP-date form), and a 10 ms import: kept off `import mlrun`

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now_s is None else now_s))


def _retry_after_ms(value: str | bytes | None) -> float | None:
    text = _text(value)
    try:
        return max(0.0, float(text) / 1000.0) if text else None
    except ValueError:
        return None


def _text(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value or ""


def _clamp(delay_s: float | None, max_s: float) -> float:
    # A server that names no delay gets the default; an absurd one is capped so a misconfigured
    # proxy cannot park the run for hours.
    return min(max_s, DEFAULT_RETRY_AFTER_S if delay_s is None else delay_s)


class Backoff:
    """Delays with jitter. `rng` is injectable so tests can pin the jitter."""

    def __init__(self, *, base_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self._rng = rng or random.Random()

    def unavailable_delay_s(self, attempt: int) -> float:
        """Exponential, capped, "equal jitter": in [cap/2, cap] so retries spread out but
        never collapse to zero."""
        cap = min(self.max_s, self.base_s * (2 ** min(attempt, 32)))
        return self._rng.uniform(cap / 2, cap)

    def overloaded_delay_s(self, retry_after_s: float) -> float:
        """At least what the server asked for, plus up to 10% (and 50 ms) so clients told the
        same delay do not come back in one burst."""
        return retry_after_s + self._rng.uniform(0.0, 0.1 * retry_after_s + 0.05)
