"""`mlrun.v1.IngestService` over the write use-cases (`mlrun.server.ingest.Ingest`).

Owns only translation: protobuf request -> builtins -> the same msgspec Structs the HTTP edge
decodes (so the same constraints are checked, by `payloads.convert`), the use-case call, and the
protobuf answer. Errors are raised from the error tree and rendered by the listener (status,
`mlrun-error-code`, `mlrun-error-field`, and for RESOURCE_EXHAUSTED a retry delay grpcio can read:
`retry-after-ms` and google.rpc.RetryInfo).

Param values arrive as google.protobuf.Value; a whole number arrives as a double and is turned
back into an int, so `7` logged over gRPC is stored as "7", as over HTTP.

Must not import trio, asyncio, storage drivers or the HTTP edge.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from google.protobuf import struct_pb2

from mlrun.server.edges import payloads
from mlrun.server.edges.grpc import artifact_methods
from mlrun.server.errors import InvalidInput
from mlrun.server.ports.keys import Principal
from mlrun.server.usecases.artifacts import Artifacts
from mlrun.server.usecases.auth import Authenticator
from mlrun.server.usecases.ingest import Ingest
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.proto.mlrun.v1 import ingest_grpc, ingest_pb2
from mlrun.wire.proto_enums import FINAL_STATUS_FROM_PROTO, RUN_STATUS_TO_PROTO
from mlrun.wire.schemas import IngestBatch, IngestResult, IngestWarning, InitRun, RunStatus

_MAX_EXACT_INT = 2**53


def scalar_from_value(value: struct_pb2.Value, *, field: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) < _MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    raise InvalidInput(f"{field} must be a string, number, bool or null (not a {kind})",
                       code=ErrorCode.INVALID_FIELD, field=field)


def _points(points: Iterable[ingest_pb2.MetricPoint]) -> list[dict[str, Any]]:
    return [
        {"name": p.name, "value": p.value, "step": p.step,
         "timestamp": p.timestamp_ms if p.HasField("timestamp_ms") else None}
        for p in points
    ]


def _columns(columns: Iterable[ingest_pb2.MetricColumn]) -> list[dict[str, Any]]:
    return [
        {"name": c.name, "steps": list(c.steps), "values": list(c.values),
         "timestamps": list(c.timestamps_ms) if len(c.timestamps_ms) else None}
        for c in columns
    ]


def _column_points(columns: Iterable[ingest_pb2.MetricColumn],
                   field: str) -> list[dict[str, Any]]:
    """System metrics have no columnar form in the JSON schema: expand to points."""
    points = []
    for index, column in enumerate(columns):
        timestamps = list(column.timestamps_ms)
        if len(column.values) != len(column.steps) or (timestamps and len(timestamps) != len(
                column.steps)):
            raise InvalidInput(f"{field}[{index}] has arrays of different lengths",
                               code=ErrorCode.SERIES_LENGTH_MISMATCH, field=f"{field}[{index}]")
        for i, (step, value) in enumerate(zip(column.steps, column.values, strict=True)):
            points.append({"name": column.name, "value": value, "step": step,
                           "timestamp": timestamps[i] if timestamps else None})
    return points


def batch_from_proto(message: ingest_pb2.LogBatchRequest) -> IngestBatch:
    data: dict[str, Any] = {
        "run_id": message.run_id,
        "batch_id": message.batch_id or None,
        "seq": message.seq if message.HasField("seq") else None,
        "metrics": _points(message.metrics),
        "series": _columns(message.metric_columns),
        "params": [{"name": p.name, "value": scalar_from_value(p.value, field=f"params[{i}]")}
                   for i, p in enumerate(message.params)],
        "tags": [{"key": t.key, "value": t.value} for t in message.tags],
        "system_metrics": _points(message.system_metrics)
        + _column_points(message.system_metric_columns, "system_metric_columns"),
    }
    return payloads.convert(data, IngestBatch)


def _warnings(warnings: Iterable[IngestWarning]) -> list[ingest_pb2.Warning]:
    return [ingest_pb2.Warning(code=w.code, field=w.field, limit=w.limit or 0,
                               dropped=w.dropped, message=w.message) for w in warnings]


def _batch_response(result: IngestResult) -> dict[str, Any]:
    return {"accepted": result.accepted, "duplicate": result.duplicate,
            "warnings": _warnings(result.warnings)}


def _status(status: RunStatus) -> ingest_pb2.RunStatus:
    return RUN_STATUS_TO_PROTO[status]


class IngestServicer(ingest_grpc.IngestServiceServicer):
    """`mlrun.v1.IngestService`; pass `IngestServicer(...).service` to `serve_grpc`.

    Every method takes a second parameter named `request`: purerpc passes the call's headers
    (the API key) to a parameter of that name. The generated base class declares one-argument
    methods, hence the `override` ignores."""

    def __init__(self, *, ingest: Ingest, authenticator: Authenticator,
                 artifacts: Artifacts) -> None:
        self._ingest = ingest
        self._authenticator = authenticator
        self._artifacts = artifacts

    def _principal(self, request: Any) -> Principal:
        return artifact_methods.principal_from_metadata(
            self._authenticator, request.custom_metadata or ())

    async def InitRun(  # type: ignore[override]
        self, message: ingest_pb2.InitRunRequest,
                      request: Any) -> ingest_pb2.InitRunResponse:
        principal = self._principal(request)
        init = payloads.convert({
            "project": message.project,
            "name": message.name if message.HasField("name") else None,
            "run_id": message.run_id if message.HasField("run_id") else None,
            "tags": dict(message.tags) or None,
            "config": {key: scalar_from_value(value, field=f"config.{key}")
                       for key, value in message.config.items()} or None,
        }, InitRun)
        created, _warnings = await self._ingest.init_run(principal, init)
        return ingest_pb2.InitRunResponse(run_id=created.run_id, project=created.project,
                                          status=_status(created.status))

    async def LogBatch(  # type: ignore[override]
        self, message: ingest_pb2.LogBatchRequest,
                       request: Any) -> ingest_pb2.LogBatchResponse:
        principal = self._principal(request)
        result = await self._ingest.log_batch(principal, batch_from_proto(message))
        return ingest_pb2.LogBatchResponse(**_batch_response(result))

    async def LogParams(  # type: ignore[override]
        self, message: ingest_pb2.LogParamsRequest,
                        request: Any) -> ingest_pb2.LogParamsResponse:
        principal = self._principal(request)
        batch = payloads.convert({
            "run_id": message.run_id, "batch_id": message.batch_id or None,
            "params": [{"name": p.name,
                        "value": scalar_from_value(p.value, field=f"params[{i}]")}
                       for i, p in enumerate(message.params)],
        }, IngestBatch)
        result = await self._ingest.log_batch(principal, batch)
        return ingest_pb2.LogParamsResponse(**_batch_response(result))

    async def LogTags(  # type: ignore[override]
        self, message: ingest_pb2.LogTagsRequest,
                      request: Any) -> ingest_pb2.LogTagsResponse:
        principal = self._principal(request)
        batch = payloads.convert({
            "run_id": message.run_id, "batch_id": message.batch_id or None,
            "tags": [{"key": t.key, "value": t.value} for t in message.tags],
        }, IngestBatch)
        result = await self._ingest.log_batch(principal, batch)
        return ingest_pb2.LogTagsResponse(**_batch_response(result))

    async def Heartbeat(  # type: ignore[override]
        self, message: ingest_pb2.HeartbeatRequest,
                        request: Any) -> ingest_pb2.HeartbeatResponse:
        principal = self._principal(request)
        state = await self._ingest.heartbeat(principal, payloads.run_id(message.run_id))
        return ingest_pb2.HeartbeatResponse(status=_status(state.status),
                                            server_time_ms=time.time_ns() // 1_000_000)

    async def FinishRun(  # type: ignore[override]
        self, message: ingest_pb2.FinishRunRequest,
                        request: Any) -> ingest_pb2.FinishRunResponse:
        principal = self._principal(request)
        status = FINAL_STATUS_FROM_PROTO.get(message.status)
        if status is None:
            raise InvalidInput("status must be FINISHED, FAILED or KILLED",
                               code=ErrorCode.INVALID_FIELD, field="status")
        state = await self._ingest.finish_run(
            principal, payloads.run_id(message.run_id), status)
        return ingest_pb2.FinishRunResponse(run_id=state.run_id, status=_status(state.status))

    async def CreateArtifactUpload(  # type: ignore[override]
        self, message: ingest_pb2.CreateArtifactUploadRequest, request: Any
    ) -> ingest_pb2.CreateArtifactUploadResponse:
        return await artifact_methods.create_artifact_upload(
            self._artifacts, self._principal(request), message)

    async def FinalizeArtifactUpload(  # type: ignore[override]
        self, message: ingest_pb2.FinalizeArtifactUploadRequest, request: Any
    ) -> ingest_pb2.FinalizeArtifactUploadResponse:
        return await artifact_methods.finalize_artifact_upload(
            self._artifacts, self._principal(request), message)
