"""The artifact methods of the gRPC edge, as translation functions the servicers delegate to:
`IngestService.CreateArtifactUpload` / `FinalizeArtifactUpload` and
`QueryService.ListArtifacts` / `GetArtifactDownloadUrl`.

Each function takes the use-case object (`mlrun.server.artifacts.Artifacts`), the caller's
`Principal` and the request message, and returns the response message. Requests are validated
by converting them into the same msgspec payloads the HTTP edge decodes (so limits and error
fields are identical); everything else happens in `Artifacts`, shared with HTTP. Errors are
raised from the error tree and rendered by the listener (UNAUTHENTICATED, PERMISSION_DENIED,
NOT_FOUND, FAILED_PRECONDITION for 409s, INVALID_ARGUMENT).

How a servicer plugs them in (declare `request` to receive purerpc's `RequestReceived`):

    async def CreateArtifactUpload(self, message, request):
        principal = principal_from_metadata(self._auth, request.custom_metadata)
        return await create_artifact_upload(self._artifacts, principal, message)

Differences from HTTP, on purpose: timestamps are epoch milliseconds; a multipart upload is
completed by `FinalizeArtifactUpload` with its parts (`complete_url` / `abort_url` stay empty:
the store has no presigned completion); the proto's `Artifact` has no status (only finalized
artifacts are listed or returned).

Must not import trio, asyncio, storage drivers or the HTTP edge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TypeVar

from mlrun.server.edges import payloads
from mlrun.server.edges.headers import joined_headers
from mlrun.server.errors import InvalidInput
from mlrun.server.ports.artifact_rows import ArtifactRow
from mlrun.server.ports.keys import Principal
from mlrun.server.usecases.artifacts import Artifacts, UploadGrant
from mlrun.server.usecases.auth import Authenticator
from mlrun.wire.artifacts import ARTIFACT_ID_PATTERN, CreateArtifact, FinalizeArtifact
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.proto.mlrun.v1 import ingest_pb2, query_pb2

T = TypeVar("T")

_ARTIFACT_ID = re.compile(ARTIFACT_ID_PATTERN)


def principal_from_metadata(
    authenticator: Authenticator, metadata: Iterable[tuple[str, Any]]
) -> Principal:
    """Authenticate a call from its custom metadata (`authorization` or `x-api-key`)."""
    headers = joined_headers(
        (str(name), value) for name, value in metadata if isinstance(value, str))
    return authenticator.authenticate(headers)


def _artifact_id(value: str) -> str:
    if not _ARTIFACT_ID.match(value):
        raise InvalidInput("artifact_id must be 32 lower-case hex digits",
                           code=ErrorCode.INVALID_FIELD,
                           field="artifact_id")
    return value


def _epoch_ms(moment: datetime | None) -> int:
    return 0 if moment is None else int(moment.timestamp() * 1000)


def render_artifact(row: ArtifactRow) -> ingest_pb2.Artifact:
    return ingest_pb2.Artifact(
        artifact_id=row.artifact_id,
        run_id=row.run_id,
        name=row.name,
        type=row.type,
        size_bytes=row.size_bytes,
        sha256=row.sha256 or "",
        mime_type=row.mime_type,
        created_at_ms=_epoch_ms(row.created_at),
    )


def render_upload(grant: UploadGrant) -> ingest_pb2.CreateArtifactUploadResponse:
    response = ingest_pb2.CreateArtifactUploadResponse(
        artifact_id=grant.artifact_id, expires_at_ms=_epoch_ms(grant.expires_at))
    if grant.single is not None:
        response.upload_url = grant.single.url
        response.required_headers.update(grant.single.headers)
        return response
    assert grant.upload_id is not None
    if grant.parts:
        response.required_headers.update(grant.parts[0].headers)
    response.multipart.upload_id = grant.upload_id
    response.multipart.part_size_bytes = grant.part_size_bytes
    response.multipart.parts.extend(
        ingest_pb2.UploadPart(part_number=number, url=part.url)
        for number, part in enumerate(grant.parts, start=1)
    )
    return response


async def create_artifact_upload(
    artifacts: Artifacts, principal: Principal, message: ingest_pb2.CreateArtifactUploadRequest
) -> ingest_pb2.CreateArtifactUploadResponse:
    payload: dict[str, Any] = {"name": message.name}
    if message.type:
        payload["type"] = message.type
    if message.HasField("size_bytes"):
        payload["size_bytes"] = message.size_bytes
    if message.HasField("sha256"):
        payload["sha256"] = message.sha256
    if message.HasField("mime_type"):
        payload["mime_type"] = message.mime_type
    request = payloads.convert(payload, CreateArtifact)
    grant = await artifacts.create_upload(principal, payloads.run_id(message.run_id), request)
    return render_upload(grant)


async def finalize_artifact_upload(
    artifacts: Artifacts,
    principal: Principal,
    message: ingest_pb2.FinalizeArtifactUploadRequest,
) -> ingest_pb2.FinalizeArtifactUploadResponse:
    request = payloads.convert(
        {"parts": [{"part_number": p.part_number, "etag": p.etag} for p in message.parts]},
        FinalizeArtifact,
    )
    row = await artifacts.finalize(
        principal, payloads.run_id(message.run_id), _artifact_id(message.artifact_id), request)
    return ingest_pb2.FinalizeArtifactUploadResponse(artifact=render_artifact(row))


async def list_artifacts(
    artifacts: Artifacts, principal: Principal, message: query_pb2.ListArtifactsRequest
) -> query_pb2.ListArtifactsResponse:
    rows = await artifacts.list_artifacts(principal, payloads.run_id(message.run_id))
    return query_pb2.ListArtifactsResponse(artifacts=[render_artifact(row) for row in rows])


async def get_artifact_download_url(
    artifacts: Artifacts,
    principal: Principal,
    message: query_pb2.GetArtifactDownloadUrlRequest,
) -> query_pb2.GetArtifactDownloadUrlResponse:
    grant = await artifacts.download_url(
        principal, payloads.run_id(message.run_id), _artifact_id(message.artifact_id))
    return query_pb2.GetArtifactDownloadUrlResponse(
        download_url=grant.request.url, expires_at_ms=_epoch_ms(grant.request.expires_at))


__all__ = [
    "create_artifact_upload",
    "finalize_artifact_upload",
    "get_artifact_download_url",
    "list_artifacts",
    "principal_from_metadata",
    "render_artifact",
    "render_upload",
]
