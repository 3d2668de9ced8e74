"""`GET /metrics`: the process's telemetry in Prometheus text format.

Public like /health (no API key): it carries counts and latencies, never names, keys or
payloads, so a scraper needs no credentials; restrict it at the network if that matters.
Pipeline gauges are read from each pipeline's `statistics()` at scrape time.

Must not import storage drivers or pipelines: it reads whatever has the `PipelineGauges` shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from mlrun.server.edges.http.app import Request, Response, Router, RouteSpec
from mlrun.server.telemetry import Exposition, Histogram, Telemetry, render_counters


class PipelineGauges(Protocol):
    """A write pipeline as /metrics sees it: `statistics()` returns a record with the fields of
    `_PIPELINE_FAMILIES`."""

    @property
    def name(self) -> str: ...

    @property
    def flush_latency(self) -> Histogram: ...

    def statistics(self) -> object: ...


# Adds more families to a scrape (e.g. the queue's, `edges.http.queue_metrics`).
ExtraFamilies = Callable[[Exposition], None]

_PIPELINE_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    # (metric name, type, PipelineStatistics field, help)
    ("mlrun_pipeline_queued_rows", "gauge", "queued_rows",
     "Rows admitted to the pipeline and not yet committed or dropped."),
    ("mlrun_pipeline_queued_bytes", "gauge", "queued_bytes",
     "Encoded bytes admitted to the pipeline and not yet committed or dropped."),
    ("mlrun_pipeline_capacity_rows", "gauge", "max_rows", "Pipeline capacity in rows."),
    ("mlrun_pipeline_capacity_bytes", "gauge", "max_bytes", "Pipeline capacity in bytes."),
    ("mlrun_pipeline_admitted_total", "counter", "admitted_requests",
     "Requests admitted to the pipeline."),
    ("mlrun_pipeline_rejected_total", "counter", "rejected_requests",
     "Requests refused because the pipeline was full (answered 429 / RESOURCE_EXHAUSTED)."),
    ("mlrun_pipeline_committed_rows_total", "counter", "committed_rows",
     "Rows committed to the backend."),
    ("mlrun_pipeline_flushes_total", "counter", "flushes", "Successful flushes."),
    ("mlrun_pipeline_flush_errors_total", "counter", "flush_errors",
     "Failed flush attempts (each is retried while someone waits for it)."),
    ("mlrun_pipeline_abandoned_total", "counter", "abandoned_requests",
     "Requests that stopped waiting for their commit (answered a retryable 503)."),
    ("mlrun_pipeline_drain_rate_rows_per_second", "gauge", "drain_rate_rows_per_s",
     "Smoothed rows per second of recent flushes (what Retry-After is derived from)."),
    ("mlrun_pipeline_waiting_requests", "gauge", "waiting_requests",
     "Requests waiting for room (pipelines that wait instead of answering 429 at once)."),
    ("mlrun_pipeline_admitted_after_wait_total", "counter", "admitted_after_wait",
     "Requests admitted after waiting for room."),
    ("mlrun_pipeline_wait_timeouts_total", "counter", "wait_timeouts",
     "Requests that waited for room in vain (then answered 429)."),
)


class ClaimGroupView(Protocol):
    """The metadata store as /metrics sees it: `claim_statistics()` returns a record with the
    fields of `_CLAIM_GROUP_FAMILIES` (`storage.postgres.statement_groups`)."""

    def claim_statistics(self) -> object: ...


_CLAIM_GROUP_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    # (metric name, type, StatementGroupStatistics field, help)
    ("mlrun_ledger_claim_statements_total", "counter", "statements",
     "Statements that claimed common batches in the ledger (the claims that arrive while one"
     " is in flight go together in the next)."),
    ("mlrun_ledger_claims_total", "counter", "items", "Ledger claims those statements carried."),
    ("mlrun_ledger_claim_group_largest", "gauge", "largest",
     "The most claims one statement carried since start."),
    ("mlrun_ledger_claim_overflows_total", "counter", "overflows",
     "Claims sent alone because the queue behind the statement in flight was full."),
    ("mlrun_ledger_claim_abandoned_total", "counter", "abandoned",
     "Queued claims whose request stopped waiting (cancelled or out of time)."),
)


def claim_group_families(view: ClaimGroupView) -> ExtraFamilies:
    def add(exposition: Exposition) -> None:
        stats = view.claim_statistics()
        for name, kind, attribute, help_text in _CLAIM_GROUP_FAMILIES:
            exposition.family(name, kind, help_text, [((), getattr(stats, attribute))])

    return add


class PrometheusBody(msgspec.Struct, frozen=True):
    """Placeholder type for the OpenAPI document: the body is text/plain, not JSON."""




def render_metrics(telemetry: Telemetry, pipelines: Sequence[PipelineGauges],
                   extra: Sequence[ExtraFamilies] = ()) -> bytes:
    exposition = Exposition()
    stats = [(pipeline.name, pipeline.statistics()) for pipeline in pipelines]
    for name, kind, attribute, help_text in _PIPELINE_FAMILIES:
        exposition.family(name, kind, help_text,
                          [((("pipeline", pipeline),), getattr(s, attribute))
                           for pipeline, s in stats])
    exposition.histogram(
        "mlrun_pipeline_flush_duration_seconds", "Duration of successful flushes.",
        [((("pipeline", p.name),), p.flush_latency) for p in pipelines])
    for add_families in extra:
        add_families(exposition)
    render_counters(exposition, telemetry)
    return exposition.render()


def add_metrics_route(router: Router, telemetry: Telemetry,
                      pipelines: Sequence[PipelineGauges],
                      extra: Sequence[ExtraFamilies] = ()) -> None:
    async def metrics(request: Request) -> Response:
        return Response(status=200, body=render_metrics(telemetry, pipelines, extra),
                        content_type="text/plain; version=0.0.4; charset=utf-8")

    router.add("GET", "/metrics", metrics, RouteSpec(
        summary="Prometheus metrics: pipeline depth and capacity, admissions, 429s, flushes, "
                "flush latency, requests by route and status, gRPC calls by method and code",
        scope=None, response=None, tags=("health",)))
