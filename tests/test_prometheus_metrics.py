"""`GET /metrics` parses as Prometheus text, and its counters move as a test ingests and
overloads a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlrun.wire.proto.mlrun.v1 import ingest_pb2

from server_process import TEST_API_KEY, ServerProcess

pytestmark = pytest.mark.timeout(120)
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


def scrape(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    server_env["MLRUN_PIPELINE_MAX_ROWS"] = "1500"
    process = ServerProcess(server_env, tmp_path / "server.log")
    servers.append(process)
    process.start()
    yield process
    assert process.stop() == 0


def test_counters_move_with_ingest_and_overload(server: ServerProcess) -> None:
    before = scrape(server.base_url)
    metrics = (("pipeline", "metrics"),)
    assert before[("mlrun_pipeline_capacity_rows", metrics)] == 1500
    assert before[("mlrun_pipeline_committed_rows_total", metrics)] == 0

    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=10) as client:
        assert client.post("/api/v1/runs", json={"project": "p", "run_id": "r"}).status_code == 201
        for index in range(3):
            ok = client.post("/api/v1/ingest/batch", json={
                "run_id": "r", "batch_id": f"b{index}",
                "series": [{"name": "loss", "steps": list(range(index * 500, index * 500 + 500)),
                            "values": [1.0] * 500}]})
            assert ok.status_code == 200
        # Larger than the whole pipeline: refused at admission, without waiting.
        too_big = client.post("/api/v1/ingest/batch", json={
            "run_id": "r", "batch_id": "big",
            "series": [{"name": "loss", "steps": list(range(2000)), "values": [1.0] * 2000}]})
        assert too_big.status_code == 429 and int(too_big.headers["retry-after"]) >= 1
        assert client.get("/api/v1/nope").status_code == 404

    after = scrape(server.base_url)
    assert after[("mlrun_pipeline_committed_rows_total", metrics)] == 1500
    assert after[("mlrun_pipeline_admitted_total", metrics)] == 3
    assert after[("mlrun_pipeline_rejected_total", metrics)] == 1
    assert after[("mlrun_pipeline_queued_rows", metrics)] == 0
    assert after[("mlrun_pipeline_flush_duration_seconds_count", metrics)] >= 1
    batch_route = (("method", "POST"), ("route", "/api/v1/ingest/batch"))
    assert after[("mlrun_http_requests_total", (*batch_route, ("status", "200")))] == 3
    assert after[("mlrun_http_requests_total", (*batch_route, ("status", "429")))] == 1
    unmatched = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
    assert after[("mlrun_http_requests_total", unmatched)] == 1
    assert after[("mlrun_http_request_duration_seconds_count", batch_route)] == 4
    # One grouped ledger-claim statement per batch here (sent one at a time); the refused
    # batch never reached PostgreSQL.
    assert after[("mlrun_ledger_claim_statements_total", ())] == 3
    assert after[("mlrun_ledger_claims_total", ())] == 3
    assert after[("mlrun_ledger_claim_overflows_total", ())] == 0
    # gRPC calls are counted by method and status code.
    with grpc.insecure_channel(server.grpc_target) as channel:
        heartbeat = channel.unary_unary("/mlrun.v1.IngestService/Heartbeat",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=ingest_pb2.HeartbeatResponse.FromString)
        heartbeat(ingest_pb2.HeartbeatRequest(run_id="r"), timeout=10,
                  metadata=(("authorization", AUTH["Authorization"]),))
        with pytest.raises(grpc.RpcError):
            heartbeat(ingest_pb2.HeartbeatRequest(run_id="r"), timeout=10)
    grpc_samples = scrape(server.base_url)
    method = ("method", "/mlrun.v1.IngestService/Heartbeat")
    assert grpc_samples[("mlrun_grpc_calls_total", (("code", "OK"), method))] == 1
    assert grpc_samples[("mlrun_grpc_calls_total", (("code", "UNAUTHENTICATED"), method))] == 1
    # No raw path or run id ever becomes a label.
    assert not any("/r/" in value or value == "r" for _, labels in after for _, value in labels)
