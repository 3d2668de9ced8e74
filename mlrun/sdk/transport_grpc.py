"""The gRPC transport: the official grpcio client (the training process is synchronous) over
`mlrun.v1.IngestService`, with the same semantics as HTTP.

Calls are made with `channel.unary_unary(...)` and the generated protobuf messages
(`mlrun.wire.proto.mlrun.v1.ingest_pb2`); the purerpc service stubs generated next to them are
async and server-side, so no grpcio service stub is needed. Metric series travel in the columnar
form (`metric_columns`, packed arrays).

No message compression: the server is purerpc, whose reader inflates "gzip" messages with
`zlib.decompress` (zlib framing, not gzip), so a grpcio gzip message would fail there; packed
columns are compact anyway. grpcio's own retries are off: the sender owns retrying.

Errors: RESOURCE_EXHAUSTED carries its delay in trailing metadata `retry-after-ms` and/or
google.rpc.RetryInfo in `grpc-status-details-bin`; the server's machine code is in
`mlrun-error-code` (see `mlrun.sdk.retry.grpc_outcome`). Every call has a deadline.

Must not import `mlrun.server`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf import struct_pb2

from mlrun.sdk.ops import BatchOp, FinishOp, InitOp, Op
from mlrun.sdk.retry import Delivered, Outcome, grpc_outcome
from mlrun.sdk.settings import Settings
from mlrun.wire.proto.grpc.health.v1 import health_pb2
from mlrun.wire.proto.mlrun.v1 import ingest_pb2 as pb
from mlrun.wire.proto_enums import RUN_STATUS_TO_PROTO
from mlrun.wire.schemas import IngestBatch, InitRun, ScalarValue

_SERVICE = "/mlrun.v1.IngestService/"
_PROBE_TIMEOUT_S = 2.0
_MAX_EXACT_DOUBLE_INT = 2**53


class GrpcTransport:
    def __init__(self, settings: Settings) -> None:
        self._channel = grpc.insecure_channel(
            settings.resolved_grpc_target,
            options=[
                ("grpc.enable_retries", 0),
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 16 << 20),
                ("grpc.keepalive_time_ms", 30_000),
            ],
        )
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {settings.api_key}"),) if settings.api_key else ()
        )
        self._timeout_s = settings.request_timeout_s
        self._max_retry_after_s = settings.max_retry_after_s
        self._init_run = self._method("InitRun", pb.InitRunRequest, pb.InitRunResponse)
        self._log_batch = self._method("LogBatch", pb.LogBatchRequest, pb.LogBatchResponse)
        self._finish_run = self._method("FinishRun", pb.FinishRunRequest, pb.FinishRunResponse)
        self._heartbeat = self._method("Heartbeat", pb.HeartbeatRequest, pb.HeartbeatResponse)
        self._health = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    def _method(self, name: str, request: Any, response: Any) -> Callable[..., Any]:
        return self._channel.unary_unary(  # type: ignore[no-any-return]
            _SERVICE + name,
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )

    def deliver(self, op: Op) -> Outcome:
        if isinstance(op, BatchOp):
            return self._call(self._log_batch, log_batch_request(op.request), _batch_delivered)
        if isinstance(op, InitOp):
            return self._call(self._init_run, init_run_request(op.request), lambda _: Delivered())
        assert isinstance(op, FinishOp)
        request = pb.FinishRunRequest(run_id=op.run_id,
                                      status=RUN_STATUS_TO_PROTO[op.request.status])
        return self._call(self._finish_run, request, lambda _: Delivered())

    def heartbeat(self, run_id: str) -> Outcome:
        return self._call(self._heartbeat, pb.HeartbeatRequest(run_id=run_id),
                          lambda _: Delivered())

    def probe(self) -> bool:
        try:
            reply = self._health(health_pb2.HealthCheckRequest(service=""),
                                 timeout=_PROBE_TIMEOUT_S)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        self._channel.close()

    def _call(
        self, method: Callable[..., Any], request: Any, answer: Callable[[Any], Delivered]
    ) -> Outcome:
        try:
            reply = method(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            return self._failure(exc)
        return answer(reply)

    def _failure(self, exc: Any) -> Outcome:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        trailing: Mapping[str, str | bytes] = dict(exc.trailing_metadata() or ())
        return grpc_outcome(
            code.name,
            trailing=trailing,
            details=exc.details() or "",
            max_retry_after_s=self._max_retry_after_s,
        )


def _batch_delivered(reply: Any) -> Delivered:
    return Delivered(
        accepted=reply.accepted,
        duplicate=reply.duplicate,
        warnings=tuple((w.code, w.message) for w in reply.warnings),
    )


def log_batch_request(batch: IngestBatch) -> Any:
    """The protobuf form of an IngestBatch (same batch_id and seq: same identity)."""
    return pb.LogBatchRequest(
        run_id=batch.run_id,
        batch_id=batch.batch_id or "",
        seq=batch.seq,
        metrics=[_point(p.name, p.value, p.step, p.timestamp) for p in batch.metrics],
        metric_columns=[
            pb.MetricColumn(name=s.name, steps=s.steps, values=s.values,
                            timestamps_ms=s.timestamps or ())
            for s in batch.series
        ],
        system_metrics=[_point(p.name, p.value, p.step, p.timestamp)
                        for p in batch.system_metrics],
        params=[pb.Param(name=p.name, value=_value(p.value)) for p in batch.params],
        tags=[pb.Tag(key=t.key, value=t.value) for t in batch.tags],
    )


def init_run_request(init: InitRun) -> Any:
    return pb.InitRunRequest(
        project=init.project,
        name=init.name,
        run_id=init.run_id,
        tags=init.tags or {},
        config={key: _value(value) for key, value in (init.config or {}).items()},
    )


def _point(name: str, value: float, step: int, timestamp_ms: int | None) -> Any:
    return pb.MetricPoint(name=name, value=value, step=step, timestamp_ms=timestamp_ms)


def _value(value: ScalarValue | None) -> struct_pb2.Value:
    if value is None:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, int) and abs(value) > _MAX_EXACT_DOUBLE_INT:
        return struct_pb2.Value(string_value=str(value))  # a double would round it
    if isinstance(value, int | float):
        return struct_pb2.Value(number_value=float(value))
    return struct_pb2.Value(string_value=value)
