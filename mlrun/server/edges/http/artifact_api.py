"""HTTP routes of artifacts: upload grants, finalize, abort, listing and download URLs under
`/api/v1/runs/{run_id}/artifacts`, plus — when the artifact store is the local directory —
the store's own signed upload and download routes under `LOCAL_ROUTE_PREFIX`.

The `/api/v1` routes only translate (decode, authenticate, call `mlrun.server.usecases.artifacts`,
render). The local store routes are the embedded twin of S3's presigned URLs: no API key, the
URL's HMAC signature and expiry are the credential (`verify_local_signature`; anything
tampered with or expired is 403 `invalid_signature`), and bodies stream in both directions
(`RouteSpec(stream_body=True)`, `Response.streaming`), so a multi-GB upload or download holds
about one chunk of it in memory. A part PUT answers the part's `ETag` header, as S3 does.

Must not import storage drivers (the local store is reached through its own methods).
"""

from __future__ import annotations

import re
import time
from contextlib import AsyncExitStack

from mlrun.server.edges.http.api import decode_body, path_run_id
from mlrun.server.edges.http.app import Request, Response, Router, RouteSpec
from mlrun.server.errors import InvalidInput, PayloadTooLarge, PermissionDenied
from mlrun.server.ports.artifact_rows import ArtifactRow
from mlrun.server.storage.objects.local import LocalArtifactStore
from mlrun.server.storage.objects.local_signing import LOCAL_ROUTE_PREFIX, verify_local_signature
from mlrun.server.usecases.artifacts import Artifacts, UploadGrant
from mlrun.server.usecases.auth import Authenticator
from mlrun.wire.artifacts import (
    ARTIFACT_ID_PATTERN,
    MAX_PART_BYTES,
    MAX_SINGLE_PUT_BYTES,
    Artifact,
    ArtifactAborted,
    ArtifactDownload,
    ArtifactList,
    ArtifactUpload,
    CreateArtifact,
    FinalizeArtifact,
    LocalObjectStored,
    MultipartUpload,
    UploadPart,
)
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.timestamps import iso_utc

_ARTIFACT_ID = re.compile(ARTIFACT_ID_PATTERN)


# --- answers -------------------------------------------------------------------------------------


def render_artifact(row: ArtifactRow) -> Artifact:
    assert row.created_at is not None
    return Artifact(
        artifact_id=row.artifact_id,
        run_id=row.run_id,
        name=row.name,
        type=row.type,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        mime_type=row.mime_type,
        status=row.status,
        created_at=iso_utc(row.created_at),
        finalized_at=iso_utc(row.finalized_at) if row.finalized_at is not None else None,
    )


def render_upload(grant: UploadGrant) -> ArtifactUpload:
    if grant.single is not None:
        return ArtifactUpload(
            artifact_id=grant.artifact_id,
            upload_url=grant.single.url,
            expires_at=iso_utc(grant.expires_at),
            required_headers=dict(grant.single.headers),
            multipart=None,
        )
    assert grant.upload_id is not None
    return ArtifactUpload(
        artifact_id=grant.artifact_id,
        upload_url=None,
        expires_at=iso_utc(grant.expires_at),
        required_headers=dict(grant.parts[0].headers) if grant.parts else {},
        multipart=MultipartUpload(
            upload_id=grant.upload_id,
            part_size_bytes=grant.part_size_bytes,
            parts=[UploadPart(part_number=n, url=part.url)
                   for n, part in enumerate(grant.parts, start=1)],
        ),
    )


def path_artifact_id(request: Request) -> str:
    artifact_id = request.path_params["artifact_id"]
    if not _ARTIFACT_ID.match(artifact_id):
        raise InvalidInput("artifact_id must be 32 lower-case hex digits",
                           code=ErrorCode.INVALID_FIELD, field="artifact_id")
    return artifact_id


# --- /api/v1 routes ------------------------------------------------------------------------------


def add_artifact_routes(
    router: Router, artifacts: Artifacts, authenticator: Authenticator
) -> None:
    async def create_upload(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        run_id = path_run_id(request)
        grant = await artifacts.create_upload(
            principal, run_id, decode_body(request.body, CreateArtifact))
        return Response.json(render_upload(grant), status=201)

    async def finalize(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        run_id, artifact_id = path_run_id(request), path_artifact_id(request)
        body = (decode_body(request.body, FinalizeArtifact) if request.body.strip()
                else FinalizeArtifact())
        row = await artifacts.finalize(principal, run_id, artifact_id, body)
        return Response.json(render_artifact(row))

    async def abort(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        run_id, artifact_id = path_run_id(request), path_artifact_id(request)
        await artifacts.abort(principal, run_id, artifact_id)
        return Response.json(ArtifactAborted(artifact_id=artifact_id))

    async def list_artifacts(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        rows = await artifacts.list_artifacts(principal, path_run_id(request))
        return Response.json(ArtifactList(artifacts=[render_artifact(row) for row in rows]))

    async def download(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        run_id, artifact_id = path_run_id(request), path_artifact_id(request)
        grant = await artifacts.download_url(principal, run_id, artifact_id)
        return Response.json(ArtifactDownload(
            artifact_id=grant.artifact_id,
            download_url=grant.request.url,
            expires_at=iso_utc(grant.request.expires_at),
            size_bytes=grant.size_bytes,
        ))

    base = "/api/v1/runs/{run_id}/artifacts"
    tags = ("artifacts",)
    router.add("POST", base, create_upload, RouteSpec(
        summary="Start an artifact upload: presigned PUT URL(s), single or multipart by size",
        scope="write", request=CreateArtifact, response=ArtifactUpload, success_status=201,
        errors=(400, 401, 403, 404), tags=tags))
    router.add("POST", base + "/{artifact_id}/finalize", finalize, RouteSpec(
        summary="Verify the uploaded object (existence, size, checksum), then record it",
        scope="write", request=FinalizeArtifact, response=Artifact,
        errors=(400, 401, 403, 404, 409), tags=tags))
    router.add("POST", base + "/{artifact_id}/abort", abort, RouteSpec(
        summary="Abandon an upload that was not finalized (parts, object and record)",
        scope="write", response=ArtifactAborted, errors=(400, 401, 403, 404, 409), tags=tags))
    router.add("GET", base, list_artifacts, RouteSpec(
        summary="List a run's finalized artifacts", scope="read", response=ArtifactList,
        errors=(400, 401, 403, 404), tags=tags))
    router.add("GET", base + "/{artifact_id}/download", download, RouteSpec(
        summary="A presigned GET URL for a finalized artifact", scope="read",
        response=ArtifactDownload, errors=(400, 401, 403, 404, 409), tags=tags))


# --- the local store's signed URLs ---------------------------------------------------------------


def add_local_store_routes(
    router: Router, store: LocalArtifactStore, *, signing_secret: bytes
) -> None:
    def grant_for(request: Request, method: str) -> tuple[str, str | None, int | None]:
        query = {name: values[-1] for name, values in request.query.items()}
        grant = verify_local_signature(
            signing_secret=signing_secret,
            method=method,
            key=request.path_params["key"],
            query=query,
            now_s=time.time(),
        )
        if grant is None:
            raise PermissionDenied("the URL is invalid, was tampered with, or has expired",
                                   code=ErrorCode.INVALID_SIGNATURE)
        return grant.key, grant.upload_id, grant.part_number

    async def upload(request: Request) -> Response:
        key, upload_id, part_number = grant_for(request, "PUT")
        cap = MAX_SINGLE_PUT_BYTES if upload_id is None else MAX_PART_BYTES
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise PayloadTooLarge(f"an upload may carry at most {cap} bytes", field="body")
        assert request.body_stream is not None
        if upload_id is None or part_number is None:
            etag = (await store.write_object_from(key, request.body_stream, max_bytes=cap)).etag
        else:
            etag = await store.write_part_from(
                key, upload_id, part_number, request.body_stream, max_bytes=cap)
        response = Response.json(LocalObjectStored(etag=etag))
        response.headers.append(("etag", etag))
        return response

    async def download(request: Request) -> Response:
        key, _, _ = grant_for(request, "GET")
        stack = AsyncExitStack()
        reader = await stack.enter_async_context(store.open_object_reader(key))
        return Response.streaming(reader.chunks(), length_bytes=reader.size_bytes,
                                  on_close=stack.aclose)

    template = LOCAL_ROUTE_PREFIX + "{key}"
    tags = ("artifact store",)
    router.add("PUT", template, upload, RouteSpec(
        summary="Local artifact store: upload an object or a part through a signed URL",
        scope=None, response=LocalObjectStored, errors=(400, 403, 404, 409), tags=tags,
        stream_body=True), path_tail=True)
    router.add("GET", template, download, RouteSpec(
        summary="Local artifact store: download an object through a signed URL",
        scope=None, response=None, errors=(403, 404), tags=tags), path_tail=True)
