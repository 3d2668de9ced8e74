"""The artifact methods of the gRPC edge (`mlrun.server.edges.grpc.artifact_methods`), spoken
to by the official grpcio client, over the same use-cases as HTTP, on real PostgreSQL and real S3.

The servicers here plug the translation functions in exactly as the docstring of
`artifact_methods` says the real servicers do; keys are real keys (KeyManagement on
PostgreSQL, refreshed by `serve_key_refresh`), so this is also the gRPC half of the auth matrix
for the artifact methods.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import grpc
import httpx
import pytest

from mlrun.server.edges.grpc import artifact_methods
from mlrun.server.edges.grpc.listener import serve_grpc
from mlrun.server.ports.keys import Principal
from mlrun.server.ports.run_metadata import CardinalityLimits
from mlrun.server.storage.objects.s3 import open_s3_store
from mlrun.server.storage.postgres.artifact_rows import PostgresArtifactRows
from mlrun.server.storage.postgres.client import apply_postgres_migrations, open_postgres
from mlrun.server.storage.postgres.keys import PostgresKeyDirectory
from mlrun.server.storage.postgres.metadata import MetadataStore
from mlrun.server.usecases.artifacts import Artifacts
from mlrun.server.usecases.auth import Authenticator
from mlrun.server.usecases.keys import KeyManagement, serve_key_refresh
from mlrun.wire.keys import CreateKey
from mlrun.wire.proto.mlrun.v1 import ingest_pb2, query_pb2
from mlrun.wire.schemas import InitRun

from backends.s3 import S3Server
from unimplemented_servicers import IngestServicer, QueryServicer

pytestmark = pytest.mark.timeout(120)

BOOTSTRAP = "mlrun_grpc-test-bootstrap-" + secrets.token_hex(16)
ADMIN = Principal("bootstrap", frozenset({"admin"}))
MiB = 1024 * 1024
CALL_TIMEOUT_S = 20.0
CREATE = "/mlrun.v1.IngestService/CreateArtifactUpload"
FINALIZE = "/mlrun.v1.IngestService/FinalizeArtifactUpload"
LIST = "/mlrun.v1.QueryService/ListArtifacts"
DOWNLOAD = "/mlrun.v1.QueryService/GetArtifactDownloadUrl"


class ArtifactIngest(IngestServicer):
    def __init__(self, artifacts: Artifacts, auth: Authenticator) -> None:
        self._artifacts, self._auth = artifacts, auth

    async def CreateArtifactUpload(  # type: ignore[override]
        self, message: ingest_pb2.CreateArtifactUploadRequest, request: Any
    ) -> ingest_pb2.CreateArtifactUploadResponse:
        principal = artifact_methods.principal_from_metadata(self._auth, request.custom_metadata)
        return await artifact_methods.create_artifact_upload(self._artifacts, principal, message)

    async def FinalizeArtifactUpload(  # type: ignore[override]
        self, message: ingest_pb2.FinalizeArtifactUploadRequest, request: Any
    ) -> ingest_pb2.FinalizeArtifactUploadResponse:
        principal = artifact_methods.principal_from_metadata(self._auth, request.custom_metadata)
        return await artifact_methods.finalize_artifact_upload(self._artifacts, principal, message)


class ArtifactQuery(QueryServicer):
    def __init__(self, artifacts: Artifacts, auth: Authenticator) -> None:
        self._artifacts, self._auth = artifacts, auth

    async def ListArtifacts(  # type: ignore[override]
        self, message: query_pb2.ListArtifactsRequest, request: Any
    ) -> query_pb2.ListArtifactsResponse:
        principal = artifact_methods.principal_from_metadata(self._auth, request.custom_metadata)
        return await artifact_methods.list_artifacts(self._artifacts, principal, message)

    async def GetArtifactDownloadUrl(  # type: ignore[override]
        self, message: query_pb2.GetArtifactDownloadUrlRequest, request: Any
    ) -> query_pb2.GetArtifactDownloadUrlResponse:
        principal = artifact_methods.principal_from_metadata(self._auth, request.custom_metadata)
        return await artifact_methods.get_artifact_download_url(
            self._artifacts, principal, message)


@dataclass
class Stack:
    port: int
    keys: KeyManagement
    metadata: MetadataStore
    channel: grpc.Channel

    async def call(self, path: str, message: Any, response_type: Any,
                   key: str | None) -> tuple[grpc.StatusCode, Any, dict[str, str]]:
        metadata = [("authorization", f"Bearer {key}")] if key is not None else []
        method = self.channel.unary_unary(
            path, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString)

        def blocking() -> tuple[grpc.StatusCode, Any, dict[str, str]]:
            try:
                response, call = method.with_call(message, timeout=CALL_TIMEOUT_S,
                                                  metadata=metadata)
            except grpc.RpcError as error:
                return error.code(), error.details(), dict(error.trailing_metadata() or ())
            return grpc.StatusCode.OK, response, dict(call.trailing_metadata() or ())

        return await anyio.to_thread.run_sync(blocking)

    async def mint(self, **fields: Any) -> str:
        if fields.get("project"):  # a key's project must exist first
            await self.metadata.create_project(fields["project"])
        created = await self.keys.create(ADMIN, CreateKey(**fields))
        return created.key

    async def new_run(self, project: str) -> str:
        created, _ = await self.metadata.init_run(InitRun(project=project),
                                                  limits=CardinalityLimits())
        return created.run_id


@pytest.fixture
async def stack(postgres_dsn: str, s3_server: S3Server) -> AsyncIterator[Stack]:
    async with (
        open_postgres(postgres_dsn) as pg,
        open_s3_store(endpoint=s3_server.endpoint, access_key=s3_server.access_key,
                      secret_key=s3_server.secret_key,
                      bucket=f"grpc-{secrets.token_hex(6)}") as store,
    ):
        with anyio.fail_after(30):
            await apply_postgres_migrations(pg)
            await store.ensure_bucket()
        metadata = MetadataStore(pg)
        auth = Authenticator(bootstrap_key=BOOTSTRAP, disabled=False)
        directory = PostgresKeyDirectory(pg)
        artifacts = Artifacts(store, PostgresArtifactRows(pg))
        services = [ArtifactIngest(artifacts, auth).service, ArtifactQuery(artifacts, auth).service]
        async with anyio.create_task_group() as tg:
            await tg.start(serve_key_refresh, auth, directory)
            port = await tg.start(functools.partial(
                serve_grpc, host="127.0.0.1", port=0, services=services))
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            try:
                yield Stack(port, KeyManagement(directory, auth), metadata, channel)
            finally:
                await anyio.to_thread.run_sync(channel.close)
                tg.cancel_scope.cancel()


async def test_multipart_upload_over_grpc(stack: Stack) -> None:
    with anyio.fail_after(90):
        key = await stack.mint(name="trainer", scopes=["read", "write"])
        run_id = await stack.new_run("vision")
        data = os.urandom(20 * MiB + 3)
        digest = hashlib.sha256(data).hexdigest()
        code, grant, _ = await stack.call(CREATE, ingest_pb2.CreateArtifactUploadRequest(
            run_id=run_id, name="ckpt/model.pt", type="model", size_bytes=len(data),
            sha256=digest), ingest_pb2.CreateArtifactUploadResponse, key)
        assert code == grpc.StatusCode.OK, grant
        assert grant.upload_url == "" and len(grant.multipart.parts) == 3
        size = grant.multipart.part_size_bytes
        parts = []
        async with httpx.AsyncClient(timeout=60) as http:
            for part in grant.multipart.parts:
                start = (part.part_number - 1) * size
                response = await http.put(part.url, content=data[start : start + size])
                assert response.status_code == 200, response.text
                parts.append(ingest_pb2.CompletedPart(part_number=part.part_number,
                                                      etag=response.headers["etag"]))
            finalize = ingest_pb2.FinalizeArtifactUploadRequest(
                run_id=run_id, artifact_id=grant.artifact_id, parts=parts)
            code, finalized, _ = await stack.call(
                FINALIZE, finalize, ingest_pb2.FinalizeArtifactUploadResponse, key)
            assert code == grpc.StatusCode.OK, finalized
            assert (finalized.artifact.size_bytes, finalized.artifact.sha256) == (len(data), digest)
            assert finalized.artifact.created_at_ms > 0

            code, listed, _ = await stack.call(LIST, query_pb2.ListArtifactsRequest(run_id=run_id),
                                               query_pb2.ListArtifactsResponse, key)
            assert code == grpc.StatusCode.OK
            assert list(listed.artifacts) == [finalized.artifact]

            code, url, _ = await stack.call(DOWNLOAD, query_pb2.GetArtifactDownloadUrlRequest(
                run_id=run_id, artifact_id=grant.artifact_id),
                query_pb2.GetArtifactDownloadUrlResponse, key)
            assert code == grpc.StatusCode.OK and url.expires_at_ms > 0
            assert (await http.get(url.download_url)).content == data


async def test_auth_matrix_and_errors_over_grpc(stack: Stack) -> None:
    with anyio.fail_after(90):
        reader = await stack.mint(name="reader", scopes=["read"])
        writer_a = await stack.mint(name="a", scopes=["read", "write"], project="proj-a")
        revoked = await stack.mint(name="gone", scopes=["admin"])
        expiring = await stack.mint(name="short", scopes=["admin"], expires_in_s=1)
        keys = {k.name: k.key_id for k in await stack.keys.list_keys(ADMIN)}
        await stack.keys.revoke(ADMIN, keys["gone"])
        run_a, run_b = await stack.new_run("proj-a"), await stack.new_run("proj-b")
        await anyio.sleep(1.2)  # the expiring key's one-second lifetime runs out

        def create(run_id: str, name: str = "a.bin") -> ingest_pb2.CreateArtifactUploadRequest:
            return ingest_pb2.CreateArtifactUploadRequest(run_id=run_id, name=name, size_bytes=4)

        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        denied = grpc.StatusCode.PERMISSION_DENIED
        cases = [
            ("no key", None, CREATE, create(run_b), unauthenticated, "missing_credentials"),
            ("unknown key", "mlrun_" + "z" * 43, CREATE, create(run_b), unauthenticated,
             "invalid_credentials"),
            ("revoked key", revoked, LIST, query_pb2.ListArtifactsRequest(run_id=run_b),
             unauthenticated, "invalid_credentials"),
            ("expired key", expiring, LIST, query_pb2.ListArtifactsRequest(run_id=run_b),
             unauthenticated, "key_expired"),
            ("read key writing", reader, CREATE, create(run_b), denied, "missing_scope"),
            ("read key reading", reader, LIST, query_pb2.ListArtifactsRequest(run_id=run_b),
             grpc.StatusCode.OK, None),
            ("project A key in B", writer_a, CREATE, create(run_b), grpc.StatusCode.NOT_FOUND,
             "run_not_found"),
            ("project A key lists B", writer_a, LIST, query_pb2.ListArtifactsRequest(run_id=run_b),
             grpc.StatusCode.NOT_FOUND, "run_not_found"),
            ("project A key in A", writer_a, CREATE, create(run_a), grpc.StatusCode.OK, None),
            ("bootstrap key", BOOTSTRAP, CREATE, create(run_b), grpc.StatusCode.OK, None),
            ("traversal", BOOTSTRAP, CREATE, create(run_b, "../x"),
             grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
            ("unknown run", BOOTSTRAP, CREATE, create("nope"), grpc.StatusCode.NOT_FOUND,
             "run_not_found"),
            ("bad artifact id", BOOTSTRAP, DOWNLOAD, query_pb2.GetArtifactDownloadUrlRequest(
                run_id=run_b, artifact_id="x"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_field"),
        ]
        response_types = {CREATE: ingest_pb2.CreateArtifactUploadResponse,
                          LIST: query_pb2.ListArtifactsResponse,
                          DOWNLOAD: query_pb2.GetArtifactDownloadUrlResponse}
        failures = []
        for case, key, path, message, status, error_code in cases:
            code, detail, trailing = await stack.call(path, message, response_types[path], key)
            if code != status or trailing.get("mlrun-error-code") != error_code:
                failures.append(f"{case}: expected {status} {error_code}, got {code} "
                                f"{trailing.get('mlrun-error-code')} {detail}")
            if code != grpc.StatusCode.OK:
                for secret in (reader, writer_a, revoked, expiring, BOOTSTRAP):
                    assert secret not in str(detail) and secret not in str(trailing)
        assert not failures, "\n".join(failures)

        # Finalize before anything was uploaded: refused, nothing recorded.
        code, grant, _ = await stack.call(CREATE, create(run_a),
                                          ingest_pb2.CreateArtifactUploadResponse, writer_a)
        assert code == grpc.StatusCode.OK
        code, detail, trailing = await stack.call(
            FINALIZE, ingest_pb2.FinalizeArtifactUploadRequest(
                run_id=run_a, artifact_id=grant.artifact_id),
            ingest_pb2.FinalizeArtifactUploadResponse, writer_a)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert trailing["mlrun-error-code"] == "object_missing"
        code, listed, _ = await stack.call(LIST, query_pb2.ListArtifactsRequest(run_id=run_a),
                                           query_pb2.ListArtifactsResponse, writer_a)
        assert code == grpc.StatusCode.OK and list(listed.artifacts) == []
