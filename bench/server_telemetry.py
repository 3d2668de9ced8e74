"""The server's own flush counters, read from its `GET /metrics` before and after a workload.

Owns: fetching the Prometheus text (unauthenticated, one short request, not part of any
measurement), picking the `metrics` pipeline's counters out of it, and turning two readings
into `FlushStats`: how many INSERTs the group commit made, how many rows each carried, and
how long the server waited on ClickHouse for them (wall clock, on the server's clock). That
wait is what "ClickHouse wait" means in wall time; the CPU the server spends in its ClickHouse
client is the `clickhouse` stage of a breakdown (bench.stages).

A server without `/metrics`, or an answer without the counters, gives None: the report then
has no flush figures, nothing fails. Must not import anyio or the server.
"""

from __future__ import annotations

import http.client
import urllib.parse
from dataclasses import dataclass

from bench.report import FlushStats

_PIPELINE_LABEL = '{pipeline="metrics"}'
_COUNTERS = {
    "mlrun_pipeline_flushes_total": "flushes",
    "mlrun_pipeline_committed_rows_total": "rows",
    "mlrun_pipeline_flush_duration_seconds_sum": "flush_s",
}
_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class FlushCounters:
    flushes: float
    rows: float
    flush_s: float


def parse_flush_counters(text: str) -> FlushCounters | None:
    """The `metrics` pipeline's counters from Prometheus text; None when one is missing."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        field = _COUNTERS.get(name)
        if field is None or not ("{" + rest).startswith(_PIPELINE_LABEL):
            continue
        try:
            found[field] = float(rest.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
    if set(found) != set(_COUNTERS.values()):
        return None
    return FlushCounters(**found)


def read_flush_counters(base_url: str) -> FlushCounters | None:
    parts = urllib.parse.urlsplit(base_url)
    if parts.hostname is None:
        return None
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=_TIMEOUT_S)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    if response.status != 200:
        return None
    return parse_flush_counters(body.decode("utf-8", errors="replace"))


def flush_stats(before: FlushCounters | None, after: FlushCounters | None,
                elapsed_s: float) -> FlushStats | None:
    if before is None or after is None:
        return None
    flushes = int(after.flushes - before.flushes)
    rows = int(after.rows - before.rows)
    flush_s = max(after.flush_s - before.flush_s, 0.0)
    if flushes <= 0 or rows <= 0:
        return FlushStats(flushes=max(flushes, 0), rows=max(rows, 0), rows_per_flush=None,
                          mean_flush_ms=None, flush_busy_share=None,
                          clickhouse_wait_us_per_point=None)
    return FlushStats(
        flushes=flushes,
        rows=rows,
        rows_per_flush=round(rows / flushes, 1),
        mean_flush_ms=round(flush_s / flushes * 1000, 2),
        flush_busy_share=round(flush_s / elapsed_s, 3) if elapsed_s > 0 else None,
        clickhouse_wait_us_per_point=round(flush_s * 1e6 / rows, 3),
    )
