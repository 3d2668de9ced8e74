"""The gRPC transport (official grpcio client) against a grpcio server in this process that
records requests and injects failures on cue: the request mapping (columnar batches, params as
google.protobuf.Value, auth metadata), how each status becomes an outcome — including the
retry delay in `retry-after-ms` and in google.rpc.RetryInfo inside `grpc-status-details-bin` —
and a whole run over gRPC with the same retry semantics as HTTP."""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from fault_server import closed_port_url
from status_details import RETRY_INFO_TYPE_URL, retry_info, status_details

import mlrun
from mlrun.sdk.ops import BatchOp, FinishOp, InitOp
from mlrun.sdk.retry import Delivered, Overloaded, Rejected, Unavailable
from mlrun.sdk.settings import Settings
from mlrun.sdk.transport_grpc import GrpcTransport
from mlrun.wire.proto.grpc.health.v1 import health_pb2
from mlrun.wire.proto.mlrun.v1 import ingest_pb2 as pb
from mlrun.wire.schemas import (
    FinishRun,
    IngestBatch,
    InitRun,
    MetricPoint,
    MetricSeries,
    Param,
    Tag,
)

pytestmark = pytest.mark.timeout(60)

Fault = tuple[grpc.StatusCode, list[tuple[str, str | bytes]]]


class FaultGrpcServer:
    """IngestService + health on loopback; `faults` are applied to LogBatch calls in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.faults: deque[Fault] = deque()
        self.batches: list[Any] = []  # every LogBatch request that arrived
        self.ledger: set[str] = set()
        self.stored: list[Any] = []
        self.inits: list[Any] = []
        self.finishes: list[Any] = []
        self.metadata: list[dict[str, str]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "InitRun": self._unary(self._init_run, pb.InitRunRequest, pb.InitRunResponse),
            "LogBatch": self._unary(self._log_batch, pb.LogBatchRequest, pb.LogBatchResponse),
            "FinishRun": self._unary(self._finish, pb.FinishRunRequest, pb.FinishRunResponse),
            "Heartbeat": self._unary(lambda r, c: pb.HeartbeatResponse(), pb.HeartbeatRequest,
                                     pb.HeartbeatResponse),
        }
        health = {"Check": self._unary(
            lambda r, c: health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.SERVING),
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse)}
        self.server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("mlrun.v1.IngestService", handlers),
            grpc.method_handlers_generic_handler("grpc.health.v1.Health", health),
        ))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @staticmethod
    def _unary(fn: Callable[[Any, Any], Any], request: Any, response: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request.FromString,
            response_serializer=response.SerializeToString)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _init_run(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.inits.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
        return pb.InitRunResponse(run_id=request.run_id, project=request.project,
                                  status=pb.RUN_STATUS_RUNNING)

    def _log_batch(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.batches.append(request)
            fault = self.faults.popleft() if self.faults else None
        if fault is not None:
            code, trailing = fault
            context.set_trailing_metadata(trailing)
            context.abort(code, f"injected {code.name}")
        with self.lock:
            duplicate = request.batch_id in self.ledger
            if not duplicate:
                self.ledger.add(request.batch_id)
                self.stored.append(request)
        points = sum(len(c.steps) for c in request.metric_columns)
        return pb.LogBatchResponse(accepted=points, duplicate=duplicate)

    def _finish(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.finishes.append(request)
        return pb.FinishRunResponse(run_id=request.run_id, status=request.status)


@pytest.fixture
def fake() -> Iterator[FaultGrpcServer]:
    server = FaultGrpcServer()
    server.server.start()
    yield server
    server.server.stop(grace=None)


def settings_for(target: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "transport": "grpc", "grpc_target": target, "api_key": "key-1", "spool_dir": tmp_path,
        "request_timeout_s": 5.0, "backoff_base_s": 0.01, "backoff_max_s": 0.1,
        "max_batch_age_s": 0.02, "max_batch_points": 1000, **overrides,
    }
    return Settings.load(environ={}, **values)


def sample_batch() -> BatchOp:
    request = IngestBatch(
        run_id="run-1", batch_id="batch-1", seq=4,
        series=[MetricSeries(name="loss", steps=[0, 1], values=[0.5, 0.25],
                             timestamps=[1000, 2000])],
        system_metrics=[MetricPoint(name="cpu.percent", value=12.5, step=0, timestamp=1000)],
        params=[Param(name="lr", value=0.1), Param(name="opt", value="adam"),
                Param(name="layers", value=3), Param(name="fp16", value=True)],
        tags=[Tag(key="team", value="cv")],
    )
    return BatchOp(request=request, points=3)


def test_requests_carry_the_batch_identity_columns_params_and_auth(
    fake: FaultGrpcServer, tmp_path: Path
) -> None:
    transport = GrpcTransport(settings_for(fake.target, tmp_path))
    try:
        init = InitOp(request=InitRun(project="p", run_id="run-1", tags={"a": "b"},
                                      config={"lr": 0.1, "name": "x", "none": None}))
        assert transport.deliver(init) == Delivered()
        assert transport.deliver(sample_batch()) == Delivered(accepted=2, duplicate=False)
        assert transport.deliver(sample_batch()) == Delivered(accepted=2, duplicate=True)
        finish = FinishOp(run_id="run-1", request=FinishRun(status="failed"))
        assert transport.deliver(finish) == Delivered()
        assert transport.probe()
    finally:
        transport.close()
    (init_request,) = fake.inits
    assert init_request.run_id == "run-1" and dict(init_request.tags) == {"a": "b"}
    assert init_request.config["lr"].number_value == 0.1
    assert init_request.config["none"].WhichOneof("kind") == "null_value"
    assert fake.metadata[0]["authorization"] == "Bearer key-1"
    sent = fake.stored[0]
    assert (sent.run_id, sent.batch_id, sent.seq) == ("run-1", "batch-1", 4)
    (column,) = sent.metric_columns
    assert (column.name, list(column.steps), list(column.values),
            list(column.timestamps_ms)) == ("loss", [0, 1], [0.5, 0.25], [1000, 2000])
    assert [(p.name, p.timestamp_ms) for p in sent.system_metrics] == [("cpu.percent", 1000)]
    assert {p.name: p.value.WhichOneof("kind") for p in sent.params} == {
        "lr": "number_value", "opt": "string_value", "layers": "number_value",
        "fp16": "bool_value"}
    assert fake.finishes[0].status == pb.RUN_STATUS_FAILED


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ((grpc.StatusCode.RESOURCE_EXHAUSTED, [("retry-after-ms", "1500")]), Overloaded(1.5)),
        ((grpc.StatusCode.RESOURCE_EXHAUSTED,
          [("grpc-status-details-bin",
            status_details((RETRY_INFO_TYPE_URL, retry_info(2, 500_000_000))))]),
         Overloaded(2.5)),
        ((grpc.StatusCode.UNAVAILABLE, [("mlrun-error-code", "backend_unavailable")]),
         Unavailable("gRPC UNAVAILABLE backend_unavailable")),
        ((grpc.StatusCode.NOT_FOUND, [("mlrun-error-code", "run_not_found")]),
         Rejected("gRPC NOT_FOUND", "run_not_found", "injected NOT_FOUND")),
    ],
)
def test_failures_become_outcomes(
    fake: FaultGrpcServer, tmp_path: Path, fault: Fault, expected: object
) -> None:
    fake.faults.append(fault)
    transport = GrpcTransport(settings_for(fake.target, tmp_path))
    try:
        assert transport.deliver(sample_batch()) == expected
    finally:
        transport.close()


def test_an_unreachable_target_is_unavailable(tmp_path: Path) -> None:
    target = closed_port_url().removeprefix("http://")
    transport = GrpcTransport(settings_for(target, tmp_path))
    try:
        outcome = transport.deliver(sample_batch())
        assert isinstance(outcome, Unavailable) and "UNAVAILABLE" in outcome.reason
        assert not transport.probe()
    finally:
        transport.close()


def test_a_run_over_grpc_waits_on_resource_exhausted_and_stores_once(
    fake: FaultGrpcServer, tmp_path: Path
) -> None:
    fake.faults.extend([(grpc.StatusCode.RESOURCE_EXHAUSTED, [("retry-after-ms", "200")]),
                        (grpc.StatusCode.UNAVAILABLE, [])])
    run = mlrun.init("p", settings=settings_for(fake.target, tmp_path))
    for step in range(5000):
        run.log({"loss": step * 0.5}, step=step)
    run.finish()
    stats = run.statistics()
    assert stats.overloaded_responses == 1 and stats.transient_errors == 1
    assert stats.pending_operations == 0
    first = fake.batches[0].batch_id
    assert [b.batch_id for b in fake.batches[:3]] == [first] * 3  # the same batch, retried
    steps = Counter(s for b in fake.stored for c in b.metric_columns for s in c.steps)
    assert steps == Counter(range(5000))
    assert [f.run_id for f in fake.finishes] == [run.run_id]


def test_grpc_without_grpcio_is_one_clear_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The README's install has no grpcio; MLRUN_TRANSPORT=grpc then says what to install
    instead of a raw ModuleNotFoundError (the missing module is injected on cue)."""
    import sys

    from mlrun.sdk.errors import SettingsError
    from mlrun.sdk.transport import open_transport

    monkeypatch.setitem(sys.modules, "grpc", None)  # `import grpc` now fails as if absent
    monkeypatch.delitem(sys.modules, "mlrun.sdk.transport_grpc", raising=False)
    settings = Settings(transport="grpc", spool_dir=tmp_path)
    with pytest.raises(SettingsError) as caught:
        open_transport(settings)
    assert "pip install 'mlrun-tracking[grpc]'" in str(caught.value)
    assert "\n" not in str(caught.value)
