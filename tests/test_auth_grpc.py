"""The auth matrix over gRPC, end to end: a real `mlrun serve` on real PostgreSQL, ClickHouse and
S3, spoken to by the official grpcio client (metadata `authorization` or `x-api-key`), with keys
minted through the HTTP key API. Revocation is checked on a second server process sharing the
PostgreSQL database, through its gRPC port."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from mlrun.wire.proto.mlrun.v1 import ingest_pb2, query_pb2

from server_process import TEST_API_KEY, ServerProcess, clean_server

pytestmark = pytest.mark.timeout(180)

CALL_TIMEOUT_S = 15.0
PROPAGATION_DEADLINE_S = 8.0
OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND

METHODS: dict[str, tuple[str, Any]] = {
    "InitRun": ("/mlrun.v1.IngestService/InitRun", ingest_pb2.InitRunResponse),
    "LogBatch": ("/mlrun.v1.IngestService/LogBatch", ingest_pb2.LogBatchResponse),
    "Heartbeat": ("/mlrun.v1.IngestService/Heartbeat", ingest_pb2.HeartbeatResponse),
    "FinishRun": ("/mlrun.v1.IngestService/FinishRun", ingest_pb2.FinishRunResponse),
    "CreateArtifactUpload": ("/mlrun.v1.IngestService/CreateArtifactUpload",
                             ingest_pb2.CreateArtifactUploadResponse),
    "ListRuns": ("/mlrun.v1.QueryService/ListRuns", query_pb2.ListRunsResponse),
    "GetRun": ("/mlrun.v1.QueryService/GetRun", query_pb2.GetRunResponse),
    "ListArtifacts": ("/mlrun.v1.QueryService/ListArtifacts", query_pb2.ListArtifactsResponse),
}


class Caller:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.details: list[str] = []

    def call(self, method: str, message: Any, key: str | None, *,
             header: str = "authorization") -> tuple[grpc.StatusCode, Any, dict[str, Any]]:
        path, response_type = METHODS[method]
        metadata: list[tuple[str, str]] = []
        if key is not None:
            metadata.append((header, f"Bearer {key}" if header == "authorization" else key))
        stub = self.channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=response_type.FromString)
        try:
            response, call = stub.with_call(message, timeout=CALL_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as error:
            trailing = dict(error.trailing_metadata() or ())
            self.details.append(f"{error.details()} {trailing}")
            return error.code(), error.details(), trailing
        return OK, response, dict(call.trailing_metadata() or ())

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    with clean_server(server_env, tmp_path / "server.log", servers) as process:
        yield process


def mint(base_url: str, **payload: Any) -> dict[str, Any]:
    if payload.get("project"):  # a key's project must exist first
        httpx.post(f"{base_url}/api/v1/projects", json={"name": payload["project"]}, timeout=10,
                   headers={"Authorization": f"Bearer {TEST_API_KEY}"})
    response = httpx.post(f"{base_url}/api/v1/keys", json=payload, timeout=10,
                          headers={"Authorization": f"Bearer {TEST_API_KEY}"})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def batch(run_id: str) -> ingest_pb2.LogBatchRequest:
    return ingest_pb2.LogBatchRequest(run_id=run_id, batch_id=uuid.uuid4().hex, metrics=[
        ingest_pb2.MetricPoint(name="loss", value=0.25, step=1)])


def test_auth_matrix_over_grpc(server: ServerProcess) -> None:
    reader = mint(server.base_url, name="reader", scopes=["read"])
    writer = mint(server.base_url, name="writer", scopes=["write"])
    writer_a = mint(server.base_url, name="a", scopes=["read", "write"], project="proj-a")
    admin = mint(server.base_url, name="admin", scopes=["admin"])
    revoked = mint(server.base_url, name="gone", scopes=["admin"])
    expiring = mint(server.base_url, name="short", scopes=["admin"], expires_in_s=1)
    response = httpx.delete(f"{server.base_url}/api/v1/keys/{revoked['key_id']}", timeout=10,
                            headers={"Authorization": f"Bearer {admin['key']}"})
    assert response.status_code == 200
    caller = Caller(server.grpc_target)
    try:
        code, run_b, _ = caller.call("InitRun", ingest_pb2.InitRunRequest(project="proj-b"),
                                     TEST_API_KEY)
        assert code == OK, run_b
        code, run_a, _ = caller.call("InitRun", ingest_pb2.InitRunRequest(project="proj-a"),
                                     writer_a["key"])
        assert code == OK, run_a
        b, a = run_b.run_id, run_a.run_id
        time.sleep(1.2)  # the expiring key's one-second lifetime runs out

        init_b = ingest_pb2.InitRunRequest(project="proj-b")
        artifact_b = ingest_pb2.CreateArtifactUploadRequest(run_id=b, name="m.bin", size_bytes=1)
        matrix: list[tuple[str, str | None, str, Any, grpc.StatusCode, str | None]] = [
            ("no key", None, "LogBatch", batch(b), UNAUTHENTICATED, "missing_credentials"),
            ("no key, query", None, "ListRuns", query_pb2.ListRunsRequest(), UNAUTHENTICATED,
             "missing_credentials"),
            ("unknown key", "mlrun_" + "q" * 43, "LogBatch", batch(b), UNAUTHENTICATED,
             "invalid_credentials"),
            ("revoked key", revoked["key"], "LogBatch", batch(b), UNAUTHENTICATED,
             "invalid_credentials"),
            ("expired key", expiring["key"], "ListRuns", query_pb2.ListRunsRequest(),
             UNAUTHENTICATED, "key_expired"),
            ("read key writing", reader["key"], "LogBatch", batch(b), DENIED, "missing_scope"),
            ("read key starting a run", reader["key"], "InitRun", init_b, DENIED,
             "missing_scope"),
            ("read key uploading", reader["key"], "CreateArtifactUpload", artifact_b, DENIED,
             "missing_scope"),
            ("read key reading", reader["key"], "ListRuns", query_pb2.ListRunsRequest(), OK,
             None),
            ("write key writing", writer["key"], "LogBatch", batch(b), OK, None),
            ("write key reading", writer["key"], "GetRun", query_pb2.GetRunRequest(run_id=b),
             DENIED, "missing_scope"),
            ("project A key in A", writer_a["key"], "LogBatch", batch(a), OK, None),
            ("project A key inits in B", writer_a["key"], "InitRun", init_b, DENIED,
             "wrong_project"),
            ("project A key logs to B", writer_a["key"], "LogBatch", batch(b), NOT_FOUND,
             "run_not_found"),
            ("project A key heartbeats B", writer_a["key"], "Heartbeat",
             ingest_pb2.HeartbeatRequest(run_id=b), NOT_FOUND, "run_not_found"),
            ("project A key reads B", writer_a["key"], "GetRun",
             query_pb2.GetRunRequest(run_id=b), NOT_FOUND, "run_not_found"),
            ("project A key uploads to B", writer_a["key"], "CreateArtifactUpload", artifact_b,
             NOT_FOUND, "run_not_found"),
            ("project A key lists B's artifacts", writer_a["key"], "ListArtifacts",
             query_pb2.ListArtifactsRequest(run_id=b), NOT_FOUND, "run_not_found"),
            ("admin key", admin["key"], "LogBatch", batch(a), OK, None),
            ("admin key reads", admin["key"], "GetRun", query_pb2.GetRunRequest(run_id=a), OK,
             None),
            ("bootstrap key", TEST_API_KEY, "CreateArtifactUpload", artifact_b, OK, None),
        ]
        failures = []
        for case, key, method, message, status, error_code in matrix:
            for header in ("authorization", "x-api-key"):
                if key is None and header == "x-api-key":
                    continue
                code, detail, trailing = caller.call(method, message, key, header=header)
                if code != status or trailing.get("mlrun-error-code") != error_code:
                    failures.append(f"{case} [{header}]: expected {status} {error_code}, got "
                                    f"{code} {trailing.get('mlrun-error-code')} {detail}")
        assert not failures, "\n".join(failures)

        # A project-scoped key lists only its project's runs.
        code, listing, _ = caller.call("ListRuns", query_pb2.ListRunsRequest(), writer_a["key"])
        assert code == OK and {run.run_id for run in listing.runs} == {a}
        code, _, trailing = caller.call("ListRuns", query_pb2.ListRunsRequest(project="proj-b"),
                                        writer_a["key"])
        assert code == DENIED and trailing["mlrun-error-code"] == "wrong_project"
    finally:
        caller.close()

    secrets_ = [k["key"] for k in (reader, writer, writer_a, admin, revoked, expiring)]
    for text in [*caller.details, server.log_text()]:
        for secret in [*secrets_, TEST_API_KEY]:
            assert secret not in text


def test_revocation_reaches_a_second_server_over_grpc(
    server_env: dict[str, str], tmp_path: Path, servers: list[ServerProcess]
) -> None:
    first = ServerProcess(server_env, tmp_path / "first.log")
    second = ServerProcess({**server_env, "MLRUN_DATA_DIR": str(tmp_path / "second")},
                           tmp_path / "second.log")
    servers.extend([first, second])
    first.start()
    second.start()
    created = mint(first.base_url, name="shared", scopes=["read"])
    caller = Caller(second.grpc_target)
    listing = query_pb2.ListRunsRequest()
    try:
        deadline = time.monotonic() + PROPAGATION_DEADLINE_S
        while (code := caller.call("ListRuns", listing, created["key"])[0]) != OK:
            assert code == UNAUTHENTICATED
            assert time.monotonic() < deadline, "the second server never learned the key"
            time.sleep(0.1)  # observing another process: there is no event to wait on
        response = httpx.delete(f"{first.base_url}/api/v1/keys/{created['key_id']}",
                                headers={"Authorization": f"Bearer {TEST_API_KEY}"}, timeout=10)
        assert response.status_code == 200
        started = time.monotonic()
        while (code := caller.call("ListRuns", listing, created["key"])[0]) == OK:
            assert time.monotonic() - started < PROPAGATION_DEADLINE_S, (
                "the second server still accepts a revoked key over gRPC")
            time.sleep(0.1)
        assert code == UNAUTHENTICATED
    finally:
        caller.close()
    for process in (first, second):
        assert process.stop() == 0, process.log_text()[-3000:]
        assert created["key"] not in process.log_text()
