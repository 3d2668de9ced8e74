"""`mlrun.v1.QueryService` end to end with the official grpcio client: a real `mlrun serve` on
real PostgreSQL, ClickHouse 18.16 and S3, fed over HTTP, read over gRPC. The same query code as
HTTP underneath, so these tests check the translation: filters and paging, run detail with
summaries, downsampled and raw series as packed columns, comparison, artifacts, and errors with
their codes (`mlrun-error-code`, `mlrun-error-field`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from test_queries_http import module_server_env, start_module_server

from mlrun.wire.proto.mlrun.v1 import ingest_pb2, query_pb2

from backends.postgres import fresh_database
from server_process import TEST_API_KEY, ServerProcess

pytestmark = pytest.mark.timeout(180)

METADATA = (("authorization", f"Bearer {TEST_API_KEY}"),)
SERVICE = "/mlrun.v1.QueryService/"
T0_MS = 1_700_000_000_000
RUNS = [f"gq-{i}" for i in range(6)]


@pytest.fixture(scope="module")
def server(postgres_server: Any, clickhouse_server: Any, s3_server: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with fresh_database(postgres_server.dsn()) as dsn:
        process = start_module_server(module_server_env(dsn, clickhouse_server, s3_server),
                                      tmp_path_factory.mktemp("grpc-query-server"))
        try:
            seed(process.base_url)
            yield process
        finally:
            code = process.stop()
        assert code == 0, process.log_text()[-3000:]
        assert "Traceback" not in process.log_text(), process.log_text()[-3000:]


def seed(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30,
                      headers={"Authorization": f"Bearer {TEST_API_KEY}"}) as client:
        for index, run_id in enumerate(RUNS):
            created = client.post("/api/v1/runs", json={
                "project": "grpc-q", "run_id": run_id, "name": f"trial {index}",
                "tags": {"team": "cv" if index % 2 else "nlp"},
                "config": {"lr": [0.1, 0.01, 0.001, 0.0001, 0.5, 0.05][index]}})
            assert created.status_code == 201, created.text
            steps = list(range(2000 * (index + 1)))
            logged = client.post("/api/v1/ingest/batch", json={
                "run_id": run_id, "batch_id": "b",
                "series": [{"name": "loss", "steps": steps,
                            "values": [1.0 / (s + 1) for s in steps],
                            "timestamps": [T0_MS + s for s in steps]}],
                "system_metrics": [{"name": "gpu", "step": s, "value": float(s),
                                    "timestamp": T0_MS + s * 1000} for s in range(50)]})
            assert logged.status_code == 200, logged.text
        finished = client.post(f"/api/v1/runs/{RUNS[0]}/finish", json={"status": "failed"})
        assert finished.status_code == 200, finished.text


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as open_channel:
        yield open_channel


def method(channel: grpc.Channel, name: str, response: Any) -> Callable[..., Any]:
    call: Callable[..., Any] = channel.unary_unary(
        SERVICE + name, request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response.FromString)
    return call


def call(channel: grpc.Channel, name: str, request: Any, response: Any) -> Any:
    return method(channel, name, response)(request, metadata=METADATA, timeout=30)


def failure(channel: grpc.Channel, name: str, request: Any, response: Any,
            metadata: Any = METADATA) -> tuple[grpc.StatusCode, dict[str, Any]]:
    with pytest.raises(grpc.RpcError) as caught:
        method(channel, name, response)(request, metadata=metadata, timeout=30)
    error: Any = caught.value
    return error.code(), dict(error.trailing_metadata() or ())


def test_list_runs_filters_and_pages(channel: grpc.Channel) -> None:
    everything = call(channel, "ListRuns", query_pb2.ListRunsRequest(
        project="grpc-q", include_total=True), query_pb2.ListRunsResponse)
    assert [r.run_id for r in everything.runs] == list(reversed(RUNS))
    assert everything.total == 6 and everything.next_cursor == ""
    failed = everything.runs[-1]
    assert failed.status == ingest_pb2.RUN_STATUS_FAILED and failed.HasField("finished_at_ms")
    assert failed.tags == {"team": "nlp"} and failed.created_at_ms > T0_MS
    assert [(p.name, p.value.string_value) for p in failed.params] == [("lr", "0.1")]

    filtered = call(channel, "ListRuns", query_pb2.ListRunsRequest(
        project="grpc-q", tags=["team=cv"], params=["lr<0.05"], sort="name"),
        query_pb2.ListRunsResponse)
    assert [r.run_id for r in filtered.runs] == ["gq-1", "gq-3"]
    assert not filtered.HasField("total")

    seen, cursor = [], ""
    for _ in range(10):
        page = call(channel, "ListRuns", query_pb2.ListRunsRequest(
            project="grpc-q", limit=4, sort="-metric:loss", cursor=cursor),
            query_pb2.ListRunsResponse)
        seen += [r.run_id for r in page.runs]
        cursor = page.next_cursor
        if not cursor:
            break
    # The last loss is 1/(n) for a run of n steps: longer runs end lower.
    assert seen == RUNS
    running = call(channel, "ListRuns", query_pb2.ListRunsRequest(
        project="grpc-q", status=ingest_pb2.RUN_STATUS_RUNNING), query_pb2.ListRunsResponse)
    assert len(running.runs) == 5


def test_get_run_has_the_summary(channel: grpc.Channel) -> None:
    run = call(channel, "GetRun", query_pb2.GetRunRequest(run_id="gq-2"),
               query_pb2.GetRunResponse).run
    assert (run.run_id, run.project, run.name) == ("gq-2", "grpc-q", "trial 2")
    (summary,) = run.metrics_summary
    assert (summary.name, summary.count, summary.last_step) == ("loss", 6000, 5999)
    assert summary.last_value == pytest.approx(1 / 6000) and summary.max == 1.0
    assert run.artifacts_count == 0 and not run.HasField("finished_at_ms")


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, payload) of a serialized protobuf message."""
    def varint(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[at]
            value |= (byte & 0x7F) << shift
            at += 1
            shift += 7
            if not byte & 0x80:
                return value, at
    at = 0
    while at < len(data):
        key, at = varint(at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = varint(at)
            yield number, wire, value
        elif wire == 1:
            yield number, wire, data[at:at + 8]
            at += 8
        elif wire == 2:
            length, at = varint(at)
            yield number, wire, data[at:at + length]
            at += length
        else:
            raise AssertionError(f"unexpected wire type {wire}")


def test_get_metrics_downsampled_raw_paged_and_packed(channel: grpc.Channel) -> None:
    raw_call = channel.unary_unary(SERVICE + "GetMetrics",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=lambda data: data)
    request = query_pb2.GetMetricsRequest(run_id="gq-5", names=["loss"], max_points=500,
                                          method=query_pb2.DOWNSAMPLE_METHOD_MINMAX)
    raw: bytes = raw_call(request, metadata=METADATA, timeout=30)
    response = query_pb2.GetMetricsResponse.FromString(raw)
    (series,) = response.series
    assert series.downsampled and series.total_points == 12_000
    assert 2 < len(series.steps) == len(series.values) == len(series.timestamps_ms) <= 500
    assert series.steps[0] == 0 and series.steps[-1] == 11_999
    assert series.timestamps_ms[-1] == T0_MS + 11_999
    # Packed: each point array is ONE length-delimited field, not one tagged field per point.
    (series_bytes,) = [p for n, _, p in _fields(raw) if n == 2]
    assert isinstance(series_bytes, bytes)
    arrays = [(n, w) for n, w, _ in _fields(series_bytes) if n in (2, 3, 4)]
    assert arrays == [(2, 2), (3, 2), (4, 2)]

    steps: list[int] = []
    cursor = ""
    for _ in range(10):
        page = call(channel, "GetMetrics", query_pb2.GetMetricsRequest(
            run_id="gq-0", names=[] if cursor else ["loss"], max_points=700, cursor=cursor,
            method=query_pb2.DOWNSAMPLE_METHOD_RAW), query_pb2.GetMetricsResponse)
        steps += list(page.series[0].steps)
        cursor = page.series[0].next_cursor
        if not cursor:
            break
    assert steps == list(range(2000))

    system = call(channel, "GetMetrics", query_pb2.GetMetricsRequest(
        run_id="gq-0", system_metrics=True, start_step=T0_MS + 10_000, end_step=T0_MS + 12_000,
        method=query_pb2.DOWNSAMPLE_METHOD_RAW), query_pb2.GetMetricsResponse)
    assert system.available_metrics == ["gpu"]
    assert list(system.series[0].steps) == [10, 11, 12]


def test_compare_runs(channel: grpc.Channel) -> None:
    result = call(channel, "CompareRuns", query_pb2.CompareRunsRequest(
        run_ids=RUNS[:3], max_points=100, alignment=query_pb2.ALIGNMENT_RELATIVE_TIME),
        query_pb2.CompareRunsResponse)
    assert result.common_metrics == ["loss"]
    assert result.alignment == query_pb2.ALIGNMENT_RELATIVE_TIME
    assert [r.run_id for r in result.runs] == RUNS[:3]
    for run in result.runs:
        (loss,) = run.series
        assert len(loss.steps) <= 100 and loss.timestamps_ms[0] == T0_MS - run.started_at_ms


def test_artifacts_of_a_run_without_any(channel: grpc.Channel) -> None:
    listed = call(channel, "ListArtifacts", query_pb2.ListArtifactsRequest(run_id="gq-1"),
                  query_pb2.ListArtifactsResponse)
    assert list(listed.artifacts) == []


def test_errors_carry_their_codes(channel: grpc.Channel) -> None:
    code, trailing = failure(channel, "GetRun", query_pb2.GetRunRequest(run_id="nope"),
                             query_pb2.GetRunResponse)
    assert code == grpc.StatusCode.NOT_FOUND and trailing["mlrun-error-code"] == "run_not_found"
    code, trailing = failure(channel, "ListRuns", query_pb2.ListRunsRequest(params=["lr>x"]),
                             query_pb2.ListRunsResponse)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing["mlrun-error-field"] == "params"
    code, _ = failure(channel, "GetMetrics", query_pb2.GetMetricsRequest(
        run_id="gq-1", start_step=-5), query_pb2.GetMetricsResponse)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, trailing = failure(channel, "CompareRuns", query_pb2.CompareRunsRequest(
        run_ids=[f"r{i}" for i in range(101)]), query_pb2.CompareRunsResponse)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and trailing["mlrun-error-field"] == "run_ids"
    code, _ = failure(channel, "ListRuns", query_pb2.ListRunsRequest(),
                      query_pb2.ListRunsResponse, metadata=())
    assert code == grpc.StatusCode.UNAUTHENTICATED
