"""The write path over gRPC, end to end, with the official grpcio client and with purerpc's.

Same server, same backends, same checks as the HTTP tests: what ClickHouse and PostgreSQL hold
afterwards. Also: RESOURCE_EXHAUSTED carries a retry delay grpcio can read, errors carry their
machine code, a malformed protobuf is INVALID_ARGUMENT, and the server keeps serving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import psycopg
import purerpc
import pytest
from google.protobuf import struct_pb2

from mlrun.wire.proto.mlrun.v1 import ingest_grpc, ingest_pb2

from readback import ClickHouseReader
from server_process import TEST_API_KEY, ServerProcess, clean_server

pytestmark = pytest.mark.timeout(120)
METADATA = (("authorization", f"Bearer {TEST_API_KEY}"),)
SERVICE = "/mlrun.v1.IngestService/"


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    server_env["MLRUN_PIPELINE_MAX_ROWS"] = "5000"
    with clean_server(server_env, tmp_path / "server.log", servers) as process:
        yield process


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as open_channel:
        yield open_channel


def method(channel: grpc.Channel, name: str, response: Any) -> Callable[..., Any]:
    """A grpcio unary call of IngestService (our stubs are purerpc's; grpcio needs only the
    message classes)."""
    call: Callable[..., Any] = channel.unary_unary(
        SERVICE + name, request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response.FromString)
    return call


def columns(name: str, steps: range) -> ingest_pb2.MetricColumn:
    return ingest_pb2.MetricColumn(name=name, steps=list(steps),
                                   values=[step / 4 for step in steps])


def test_grpcio_init_three_batches_finish_and_everything_is_stored(
    channel: grpc.Channel, clickhouse_reader: ClickHouseReader, server_env: dict[str, str]
) -> None:
    init = method(channel, "InitRun", ingest_pb2.InitRunResponse)
    log_batch = method(channel, "LogBatch", ingest_pb2.LogBatchResponse)
    finish = method(channel, "FinishRun", ingest_pb2.FinishRunResponse)
    started = init(ingest_pb2.InitRunRequest(
        project="grpc", run_id="g-1", tags={"team": "cv"},
        config={"lr": struct_pb2.Value(number_value=0.01),
                "epochs": struct_pb2.Value(number_value=3)}), metadata=METADATA, timeout=10)
    assert (started.run_id, started.status) == ("g-1", ingest_pb2.RUN_STATUS_RUNNING)
    for index in range(3):
        reply = log_batch(ingest_pb2.LogBatchRequest(
            run_id="g-1", batch_id=f"b{index}",
            metric_columns=[columns("loss", range(index * 100, index * 100 + 100))],
            params=[ingest_pb2.Param(name="seed", value=struct_pb2.Value(number_value=7))],
            tags=[ingest_pb2.Tag(key="stage", value="train")],
            system_metrics=[ingest_pb2.MetricPoint(name="cpu", value=5.0, step=index)],
        ), metadata=METADATA, timeout=10)
        assert (reply.accepted, reply.duplicate, list(reply.warnings)) == (101, False, [])
    again = log_batch(ingest_pb2.LogBatchRequest(
        run_id="g-1", batch_id="b0", metric_columns=[columns("loss", range(0, 100))],
        params=[ingest_pb2.Param(name="seed", value=struct_pb2.Value(number_value=7))],
        tags=[ingest_pb2.Tag(key="stage", value="train")],
        system_metrics=[ingest_pb2.MetricPoint(name="cpu", value=5.0, step=0)],
    ), metadata=METADATA, timeout=10)
    assert again.duplicate is True
    done = finish(ingest_pb2.FinishRunRequest(run_id="g-1", status=ingest_pb2.RUN_STATUS_FINISHED),
                  metadata=METADATA, timeout=10)
    assert done.status == ingest_pb2.RUN_STATUS_FINISHED

    rows = clickhouse_reader.rows(
        "SELECT step, value FROM metrics WHERE run_id = 'g-1' ORDER BY step")
    assert [(r["step"], r["value"]) for r in rows] == [(s, s / 4) for s in range(300)]
    with psycopg.connect(server_env["DATABASE_URL"]) as conn:
        params = dict(conn.execute("SELECT key, value FROM run_params WHERE run_id = 'g-1'"))
        tags = dict(conn.execute("SELECT key, value FROM run_tags WHERE run_id = 'g-1'"))
    assert params == {"lr": "0.01", "epochs": "3", "seed": "7"}
    assert tags == {"team": "cv", "stage": "train"}


def test_purerpc_client_logs_the_same_way(
    server: ServerProcess, clickhouse_reader: ClickHouseReader
) -> None:
    async def scenario() -> None:
        with anyio.fail_after(30):
            async with purerpc.insecure_channel("127.0.0.1", server.grpc_port) as channel:
                stub = ingest_grpc.IngestServiceStub(channel)
                await stub.InitRun(ingest_pb2.InitRunRequest(project="grpc", run_id="p-1"),
                                   metadata=METADATA)
                for index in range(3):
                    reply = await stub.LogBatch(ingest_pb2.LogBatchRequest(
                        run_id="p-1", batch_id=f"b{index}",
                        metrics=[ingest_pb2.MetricPoint(name="acc", value=0.5, step=index)]),
                        metadata=METADATA)
                    assert reply.accepted == 1
                await stub.FinishRun(ingest_pb2.FinishRunRequest(
                    run_id="p-1", status=ingest_pb2.RUN_STATUS_FAILED), metadata=METADATA)

    anyio.run(scenario, backend="trio")
    assert clickhouse_reader.scalar("SELECT count() FROM metrics WHERE run_id = 'p-1'") == 3


def test_errors_carry_codes_and_the_server_keeps_serving(
    channel: grpc.Channel, server: ServerProcess
) -> None:
    init = method(channel, "InitRun", ingest_pb2.InitRunResponse)
    log_batch = method(channel, "LogBatch", ingest_pb2.LogBatchResponse)
    init(ingest_pb2.InitRunRequest(project="grpc", run_id="e-1"), metadata=METADATA, timeout=10)

    def failure(call: Callable[..., Any], message: Any,
                metadata: tuple[tuple[str, str], ...] = METADATA) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            call(message, metadata=metadata, timeout=10)
        return caught.value

    unauthenticated = failure(log_batch, ingest_pb2.LogBatchRequest(run_id="e-1"), metadata=())
    assert unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong_key = failure(log_batch, ingest_pb2.LogBatchRequest(run_id="e-1"),
                        metadata=(("x-api-key", "mlrun_nope"),))
    assert wrong_key.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "mlrun_nope" not in (wrong_key.details() or "")

    negative = failure(log_batch, ingest_pb2.LogBatchRequest(
        run_id="e-1", metrics=[ingest_pb2.MetricPoint(name="l", value=1.0, step=-5)]))
    assert negative.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailing = dict(negative.trailing_metadata() or ())
    assert trailing["mlrun-error-code"] == "invalid_field"
    assert trailing["mlrun-error-field"] == "metrics[0].step"

    unknown = failure(log_batch, ingest_pb2.LogBatchRequest(run_id="nope", batch_id="x"))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND

    log_batch(ingest_pb2.LogBatchRequest(run_id="e-1", batch_id="c",
                                         metrics=[ingest_pb2.MetricPoint(name="l", step=1)]),
              metadata=METADATA, timeout=10)
    conflict = failure(log_batch, ingest_pb2.LogBatchRequest(
        run_id="e-1", batch_id="c", metrics=[ingest_pb2.MetricPoint(name="l", step=2)]))
    assert conflict.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(conflict.trailing_metadata() or ())["mlrun-error-code"] == "batch_conflict"

    # Bytes that are not a LogBatchRequest at all.
    raw = channel.unary_unary(SERVICE + "LogBatch", request_serializer=None,
                              response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\xff\xff\xff\xff garbage", metadata=METADATA, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Larger than the whole pipeline (5000 rows): refused at admission with a readable delay.
    exhausted = failure(log_batch, ingest_pb2.LogBatchRequest(
        run_id="e-1", batch_id="big", metric_columns=[columns("loss", range(6000))]))
    assert exhausted.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(exhausted.trailing_metadata() or ())
    assert int(trailing["retry-after-ms"]) >= 1000
    assert "grpc-status-details-bin" in trailing

    ok = log_batch(ingest_pb2.LogBatchRequest(
        run_id="e-1", batch_id="after", metrics=[ingest_pb2.MetricPoint(name="l", step=3)]),
        metadata=METADATA, timeout=10)
    assert ok.accepted == 1
