"""`mlrun.v1.QueryService` over the read use-cases (`mlrun.server.queries.Queries`) and the
artifact use-cases (`mlrun.server.artifacts.Artifacts`, through `grpc.artifact_methods`).

Owns only translation: protobuf request -> the same parsed records the HTTP edge builds (filter
strings go through the one grammar of `queries`; the comparison request is converted into the
`CompareRuns` Struct, so its limits are checked as over HTTP), the use-case call, and the
protobuf answer. Errors are raised from the error tree and rendered by the listener.

Differences from HTTP, on purpose: timestamps are epoch milliseconds; a series is columnar
(`steps`, `values`, `timestamps_ms` as packed repeated fields); enums' UNSPECIFIED means the
HTTP default (sort `-created_at`, method `lttb`, alignment `step`); `limit` 0 means the default
page size; an empty string means "not given" (cursor, project, q). With `system_metrics`,
`start_step` / `end_step` bound the series' key, which for system metrics is the timestamp
(epoch ms), as the HTTP route's `start_ms` / `end_ms` do.

Must not import trio, asyncio, storage drivers or the HTTP edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2

from mlrun.server.edges import payloads
from mlrun.server.edges.grpc import artifact_methods
from mlrun.server.errors import InvalidInput
from mlrun.server.ports.keys import Principal
from mlrun.server.usecases.artifacts import Artifacts
from mlrun.server.usecases.auth import Authenticator
from mlrun.server.usecases.listing import build_listing
from mlrun.server.usecases.queries import Queries, SeriesRequest, epoch_ms
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.proto.mlrun.v1 import ingest_pb2, query_grpc, query_pb2
from mlrun.wire.proto_enums import RUN_STATUS_FROM_PROTO, RUN_STATUS_TO_PROTO
from mlrun.wire.query_schemas import (
    DEFAULT_PAGE_RUNS,
    CompareRuns,
    DownsampleMethod,
    RunDetail,
    RunSummary,
    Series,
)

_METHOD_FROM_PROTO: dict[int, DownsampleMethod] = {
    query_pb2.DOWNSAMPLE_METHOD_UNSPECIFIED: "lttb",
    query_pb2.DOWNSAMPLE_METHOD_LTTB: "lttb",
    query_pb2.DOWNSAMPLE_METHOD_MINMAX: "minmax",
    query_pb2.DOWNSAMPLE_METHOD_AVG: "avg",
    query_pb2.DOWNSAMPLE_METHOD_RAW: "raw",
}
_METHOD_TO_PROTO: dict[str, Any] = {
    name: number for number, name in _METHOD_FROM_PROTO.items() if number}
_ALIGNMENT_FROM_PROTO: dict[int, str] = {
    query_pb2.ALIGNMENT_UNSPECIFIED: "step",
    query_pb2.ALIGNMENT_STEP: "step",
    query_pb2.ALIGNMENT_RELATIVE_TIME: "relative_time",
    query_pb2.ALIGNMENT_ABSOLUTE_TIME: "absolute_time",
}
_ALIGNMENT_TO_PROTO: dict[str, Any] = {
    name: number for number, name in _ALIGNMENT_FROM_PROTO.items() if number}


def _enum(table: dict[int, Any], value: int, field: str) -> Any:
    if value not in table:
        raise InvalidInput(f"{field}: unknown enum value {value}", code=ErrorCode.INVALID_FIELD,
                           field=field)
    return table[value]


def _instant(ms: int, field: str) -> datetime:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, ValueError, OSError):
        raise InvalidInput(f"{field}: {ms} is not an epoch-ms instant",
                           code=ErrorCode.INVALID_FIELD,
                           field=field) from None


def _ms(iso: str | None) -> int | None:
    return None if iso is None else epoch_ms(datetime.fromisoformat(iso))


def _run(run: RunSummary | RunDetail) -> query_pb2.Run:
    message = query_pb2.Run(
        run_id=run.run_id, project=run.project, name=run.name,
        status=RUN_STATUS_TO_PROTO[run.status], created_at_ms=_ms(run.created_at),
        updated_at_ms=_ms(run.updated_at), tags=run.tags,
        params=[ingest_pb2.Param(name=key, value=struct_pb2.Value(string_value=value))
                for key, value in run.params.items()],
    )
    finished = _ms(run.finished_at)
    if finished is not None:
        message.finished_at_ms = finished
    if isinstance(run, RunDetail):
        heartbeat = _ms(run.last_heartbeat_at)
        if heartbeat is not None:
            message.heartbeat_at_ms = heartbeat
        message.artifacts_count = run.artifacts_count
        message.metrics_summary.extend(
            query_pb2.MetricSummary(name=s.name, last_value=s.last_value,
                                    last_step=s.last_step, min=s.min, max=s.max,
                                    count=s.count)
            for s in run.metrics_summary)
    return message


def _series(series: Series) -> query_pb2.MetricSeries:
    # The use-case is asked for the columns layout: the message's arrays, without a Python
    # object per point.
    steps, values, timestamps = series.as_columns()
    return query_pb2.MetricSeries(
        name=series.name,
        steps=steps,
        values=values,
        timestamps_ms=timestamps,
        total_points=series.total_points,
        downsampled=series.downsampled,
        method=_METHOD_TO_PROTO[series.method],
        next_cursor=series.next_cursor or "",
    )


def _texts(values: Sequence[str]) -> list[str]:
    return [value for value in values if value]


class QueryServicer(query_grpc.QueryServiceServicer):
    """`mlrun.v1.QueryService`; pass `QueryServicer(...).service` to `serve_grpc`.

    Every method takes a second parameter named `request`: purerpc passes the call's headers
    (the API key) to a parameter of that name. The generated base class declares one-argument
    methods, hence the `override` ignores."""

    def __init__(self, *, queries: Queries, authenticator: Authenticator,
                 artifacts: Artifacts) -> None:
        self._queries = queries
        self._authenticator = authenticator
        self._artifacts = artifacts

    def _principal(self, request: Any) -> Principal:
        return artifact_methods.principal_from_metadata(
            self._authenticator, request.custom_metadata or ())

    async def ListRuns(  # type: ignore[override]
        self, message: query_pb2.ListRunsRequest, request: Any
    ) -> query_pb2.ListRunsResponse:
        principal = self._principal(request)
        statuses = ([_enum(RUN_STATUS_FROM_PROTO, message.status, "status")]
                    if message.status else [])
        listing = build_listing(
            project=message.project or None,
            statuses=statuses,
            tags=_texts(message.tags),
            params=_texts(message.params),
            text=message.q or None,
            created_after=(_instant(message.created_after_ms, "created_after_ms")
                           if message.HasField("created_after_ms") else None),
            created_before=(_instant(message.created_before_ms, "created_before_ms")
                            if message.HasField("created_before_ms") else None),
            sort=message.sort or "-created_at",
            limit=message.limit or DEFAULT_PAGE_RUNS,
            cursor=message.cursor or None,
            include_total=message.include_total,
        )
        page = await self._queries.list_runs(principal, listing)
        response = query_pb2.ListRunsResponse(runs=[_run(run) for run in page.runs],
                                              next_cursor=page.next_cursor or "")
        if page.total is not None:
            response.total = page.total
        return response

    async def GetRun(  # type: ignore[override]
        self, message: query_pb2.GetRunRequest, request: Any
    ) -> query_pb2.GetRunResponse:
        principal = self._principal(request)
        detail = await self._queries.get_run(principal, payloads.run_id(message.run_id))
        return query_pb2.GetRunResponse(run=_run(detail))

    async def GetMetrics(  # type: ignore[override]
        self, message: query_pb2.GetMetricsRequest, request: Any
    ) -> query_pb2.GetMetricsResponse:
        principal = self._principal(request)
        run_id = payloads.run_id(message.run_id)
        series_request = SeriesRequest(
            system=message.system_metrics,
            names=tuple(dict.fromkeys(_texts(message.names))),
            max_points=message.max_points if message.HasField("max_points") else None,
            start=message.start_step if message.HasField("start_step") else None,
            end=message.end_step if message.HasField("end_step") else None,
            method=_enum(_METHOD_FROM_PROTO, message.method, "method"),
            cursor=message.cursor or None,
            layout="columns",
        )
        result = await self._queries.series(principal, run_id, series_request)
        return query_pb2.GetMetricsResponse(
            run_id=result.run_id, series=[_series(s) for s in result.series],
            available_metrics=result.available_metrics)

    async def CompareRuns(  # type: ignore[override]
        self, message: query_pb2.CompareRunsRequest, request: Any
    ) -> query_pb2.CompareRunsResponse:
        principal = self._principal(request)
        method = _enum(_METHOD_FROM_PROTO, message.method, "method")
        data: dict[str, Any] = {
            "run_ids": list(message.run_ids),
            "metric_names": list(message.metric_names) or None,
            "alignment": _enum(_ALIGNMENT_FROM_PROTO, message.alignment, "alignment"),
            "method": method,
            "layout": "columns",
        }
        if message.HasField("max_points"):
            data["max_points"] = message.max_points
        result = await self._queries.compare(principal, payloads.convert(data, CompareRuns))
        return query_pb2.CompareRunsResponse(
            runs=[query_pb2.RunSeries(
                run_id=run.run_id, name=run.name, started_at_ms=_ms(run.started_at),
                series=[_series(s) for s in run.series]) for run in result.runs],
            common_metrics=result.common_metrics,
            alignment=_ALIGNMENT_TO_PROTO[result.alignment],
        )

    async def ListArtifacts(  # type: ignore[override]
        self, message: query_pb2.ListArtifactsRequest, request: Any
    ) -> query_pb2.ListArtifactsResponse:
        return await artifact_methods.list_artifacts(
            self._artifacts, self._principal(request), message)

    async def GetArtifactDownloadUrl(  # type: ignore[override]
        self, message: query_pb2.GetArtifactDownloadUrlRequest, request: Any
    ) -> query_pb2.GetArtifactDownloadUrlResponse:
        return await artifact_methods.get_artifact_download_url(
            self._artifacts, self._principal(request), message)
