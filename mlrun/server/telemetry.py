"""Process telemetry: counters and histograms, rendered as Prometheus text for `GET /metrics`.

Owns: request counters of the HTTP and gRPC edges (by route template or method, never by raw
path, so label cardinality stays bounded), the flush-latency histogram type the pipelines use,
and the text exposition format (version 0.0.4). Pipeline gauges come from each pipeline's
`statistics()` at scrape time, so nothing is double-booked.

All updates happen on the event loop thread (no locks needed); a scrape reads a consistent
snapshot because rendering never awaits.

Must not import the edges, storage or the pipelines (they import this module, not the reverse).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DEFAULT_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class Histogram:
    buckets_s: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: int = 0
    sum_s: float = 0.0
    # The slowest observation since start: the answer-time bound is checked against it.
    max_s: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets_s)

    def observe(self, value_s: float) -> None:
        index = bisect.bisect_left(self.buckets_s, value_s)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += 1
        self.sum_s += value_s
        self.max_s = max(self.max_s, value_s)

    def cumulative(self) -> list[tuple[str, int]]:
        running = 0
        rows = []
        for bound, count in zip(self.buckets_s, self.counts, strict=True):
            running += count
            rows.append((_number(bound), running))
        rows.append(("+Inf", self.total))
        return rows


Labels = tuple[tuple[str, str], ...]


class Telemetry:
    """Counters of one server process."""

    def __init__(self) -> None:
        self.http_requests: dict[Labels, int] = {}
        self.http_latency: dict[Labels, Histogram] = {}
        self.grpc_calls: dict[Labels, int] = {}

    def observe_http(self, route: str, method: str, status: int, duration_s: float) -> None:
        key = (("route", route), ("method", method), ("status", str(status)))
        self.http_requests[key] = self.http_requests.get(key, 0) + 1
        latency_key = (("route", route), ("method", method))
        histogram = self.http_latency.get(latency_key)
        if histogram is None:
            histogram = self.http_latency[latency_key] = Histogram()
        histogram.observe(duration_s)

    def observe_grpc(self, method: str, code: str) -> None:
        key = (("method", method), ("code", code))
        self.grpc_calls[key] = self.grpc_calls.get(key, 0) + 1


class Exposition:
    """Builds the Prometheus text format, one metric family at a time."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[Labels, float]]) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self._lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str,
                  series: Iterable[tuple[Labels, Histogram]]) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} histogram")
        for labels, histogram in series:
            for bound, count in histogram.cumulative():
                self._lines.append(f"{name}_bucket{_labels((*labels, ('le', bound)))} {count}")
            self._lines.append(f"{name}_sum{_labels(labels)} {_number(histogram.sum_s)}")
            self._lines.append(f"{name}_count{_labels(labels)} {histogram.total}")

    def render(self) -> bytes:
        return ("\n".join(self._lines) + "\n").encode()


def render_counters(exposition: Exposition, telemetry: Telemetry) -> None:
    exposition.family("mlrun_http_requests_total", "counter",
                      "HTTP requests answered, by route template, method and status.",
                      sorted(telemetry.http_requests.items()))
    exposition.histogram("mlrun_http_request_duration_seconds",
                         "HTTP request handling time, by route template and method.",
                         sorted(telemetry.http_latency.items()))
    exposition.family("mlrun_http_request_duration_max_seconds", "gauge",
                      "Slowest HTTP request handling time since start, by route and method.",
                      [(labels, histogram.max_s)
                       for labels, histogram in sorted(telemetry.http_latency.items())])
    exposition.family("mlrun_grpc_calls_total", "counter",
                      "gRPC calls answered, by method and status code.",
                      sorted(telemetry.grpc_calls.items()))


def _labels(labels: Sequence[tuple[str, str]]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
