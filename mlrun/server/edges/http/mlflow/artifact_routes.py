"""MLflow's proxied artifact service on our artifact store: upload, download and list under
`/api/2.0/mlflow-artifacts/artifacts/<experiment>/<run>/artifacts/<path>` (and `/ajax-api/...`),
so `mlflow.log_artifact(s)` and downloads work with the default `mlflow-artifacts:` URIs.

The MLflow client talks only to this server; this edge relays the bytes to and from the store
through the very grants the artifact use-case (`usecases.artifacts.Artifacts`) hands our own SDK:

    PUT    create_upload (name = <path>, size = Content-Length) -> stream the body to the
           presigned PUT, or, past the multipart threshold, buffer one part at a time (at most
           one part size in memory per request) and PUT each part -> finalize (verified size)
           -> 200. Any failure aborts the upload (shielded, bounded), so nothing half-written
           is ever listed.
    GET    the run's newest finalized artifact of that name -> presigned GET -> the store's
           bytes streamed back as they arrive (the client's socket pushes back).
    list   `?path=<experiment>/<run>/artifacts[/dir]`: the run's finalized artifacts directly
           under `dir` (files with sizes, and sub-directories), names relative to it; `{}`
           when there is nothing.

Uploading the same path again makes a new artifact; downloads and listings show the newest
(MLflow overwrites). The experiment segment of the path is not checked: the run decides the
project (and so the key's access). MLflow's multipart endpoints (`mpu/...`) are not served:
`/api/3.0/mlflow/server-info` is not served either, which the client reads as "multipart off",
so it always sends single PUTs, which this edge splits into store parts itself.

The outbound transfers (httpx to presigned URLs) are this edge's own I/O, each request bounded
by `STORE_TIMEOUT_S`. Must not import storage or pipelines.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator

import anyio
import httpx

from mlrun.server.edges.http.app import Request, Response, Router, RouteSpec
from mlrun.server.edges.http.mlflow.answers import answered, json_response, principal_of
from mlrun.server.errors import BackendUnavailable, InvalidInput, MlrunError, NotFound
from mlrun.server.ports.artifact_rows import ArtifactRow
from mlrun.server.ports.objects import PresignedRequest
from mlrun.server.usecases.artifacts import Artifacts, UploadGrant
from mlrun.server.usecases.auth import Authenticator
from mlrun.wire.artifacts import CompletedPart, CreateArtifact, FinalizeArtifact
from mlrun.wire.error_codes import ErrorCode

logger = logging.getLogger("mlrun.mlflow.artifacts")

PREFIXES = ("/api/2.0/mlflow-artifacts", "/ajax-api/2.0/mlflow-artifacts")
# Each outbound request to the store (a part, a whole single PUT, a download's headers).
STORE_TIMEOUT_S = 300.0
ABORT_TIMEOUT_S = 10.0
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
_MIME = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")


def _split(path: str, *, listing: bool = False) -> tuple[str, str]:
    """(run_id, path below the run's artifact root) of `<experiment>/<run>/artifacts/<path>`."""
    segments = path.strip("/").split("/")
    if len(segments) < 3 or segments[2] != "artifacts" or not segments[1] or (
            not listing and len(segments) < 4):
        raise InvalidInput(f"{path!r} is not <experiment>/<run>/artifacts/<path>",
                           code=ErrorCode.INVALID_FIELD, field="path")
    return segments[1], "/".join(segments[3:])


def _store_unavailable(exc: Exception) -> BackendUnavailable:
    return BackendUnavailable(f"the artifact store did not answer ({type(exc).__name__})",
                              backend="artifacts")


def _check_store_answer(response: httpx.Response, what: str) -> None:
    if response.status_code >= 300:
        raise BackendUnavailable(f"the artifact store refused {what} ({response.status_code})",
                                 backend="artifacts")


async def _exactly(chunks: AsyncIterator[bytes], length: int) -> AsyncIterator[bytes]:
    sent = 0
    async for chunk in chunks:
        sent += len(chunk)
        if sent > length:
            raise InvalidInput("the body is longer than its Content-Length",
                               code=ErrorCode.INVALID_FIELD, field="body")
        yield chunk
    if sent != length:
        raise InvalidInput("the body is shorter than its Content-Length",
                           code=ErrorCode.INVALID_FIELD, field="body")


async def _put_single(http: httpx.AsyncClient, target: PresignedRequest,
                      chunks: AsyncIterator[bytes], length: int) -> None:
    try:
        response = await http.request(
            target.method, target.url, content=_exactly(chunks, length),
            headers={**target.headers, "content-length": str(length)})
    except httpx.HTTPError as exc:
        raise _store_unavailable(exc) from exc
    _check_store_answer(response, "the upload")


async def _put_parts(http: httpx.AsyncClient, grant: UploadGrant,
                     chunks: AsyncIterator[bytes], length: int) -> list[CompletedPart]:
    parts: list[CompletedPart] = []
    buffer = bytearray()
    received = 0

    async def send_part(data: bytes) -> None:
        number = len(parts) + 1
        if number > len(grant.parts):
            raise InvalidInput("the body is longer than its Content-Length",
                               code=ErrorCode.INVALID_FIELD, field="body")
        target = grant.parts[number - 1]
        try:
            response = await http.request(target.method, target.url, content=data,
                                          headers=target.headers)
        except httpx.HTTPError as exc:
            raise _store_unavailable(exc) from exc
        _check_store_answer(response, f"part {number}")
        parts.append(CompletedPart(part_number=number, etag=response.headers.get("etag", "")))

    async for chunk in chunks:
        received += len(chunk)
        buffer += chunk
        while len(buffer) >= grant.part_size_bytes:
            await send_part(bytes(buffer[:grant.part_size_bytes]))
            del buffer[:grant.part_size_bytes]
    if buffer or not parts:
        await send_part(bytes(buffer))
    if received != length:
        raise InvalidInput("the body does not match its Content-Length",
                           code=ErrorCode.INVALID_FIELD, field="body")
    return parts


def _newest(rows: list[ArtifactRow]) -> dict[str, ArtifactRow]:
    """Name -> the newest finalized artifact of that name (rows come oldest first)."""
    return {row.name: row for row in rows}


def add_mlflow_artifact_routes(router: Router, artifacts: Artifacts,
                               authenticator: Authenticator) -> None:
    async def upload(request: Request) -> Response:
        principal = principal_of(authenticator, request.headers)
        run_id, name = _split(request.path_params["path"])
        declared = request.headers.get("content-length", "")
        if not declared.isdigit():
            raise InvalidInput("an artifact upload needs a Content-Length",
                               code=ErrorCode.INVALID_FIELD, field="content-length")
        length = int(declared)
        mime = request.headers.get("content-type", "").split(";")[0].strip()
        grant = await artifacts.create_upload(principal, run_id, CreateArtifact(
            name=name, size_bytes=length,
            mime_type=mime if _MIME.match(mime) else "application/octet-stream"))
        assert request.body_stream is not None
        try:
            async with httpx.AsyncClient(timeout=STORE_TIMEOUT_S) as http:
                if grant.single is not None:
                    await _put_single(http, grant.single, request.body_stream, length)
                    parts: list[CompletedPart] = []
                else:
                    parts = await _put_parts(http, grant, request.body_stream, length)
            await artifacts.finalize(principal, run_id, grant.artifact_id,
                                     FinalizeArtifact(parts=parts))
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(ABORT_TIMEOUT_S), \
                    contextlib.suppress(MlrunError):
                await artifacts.abort(principal, run_id, grant.artifact_id)
            raise
        return json_response({})

    async def download(request: Request) -> Response:
        principal = principal_of(authenticator, request.headers)
        run_id, name = _split(request.path_params["path"])
        row = _newest(await artifacts.list_artifacts(principal, run_id)).get(name)
        if row is None:
            raise NotFound(f"run {run_id!r} has no artifact {name!r}",
                           code=ErrorCode.ARTIFACT_NOT_FOUND, field="path")
        grant = await artifacts.download_url(principal, run_id, row.artifact_id)
        http = httpx.AsyncClient(timeout=STORE_TIMEOUT_S)
        response: httpx.Response | None = None

        async def close() -> None:
            if response is not None:
                await response.aclose()
            await http.aclose()

        try:
            response = await http.send(http.build_request(
                grant.request.method, grant.request.url, headers=grant.request.headers),
                stream=True)
            _check_store_answer(response, "the download")
        except BaseException as exc:
            with anyio.CancelScope(shield=True), anyio.move_on_after(ABORT_TIMEOUT_S):
                await close()
            if isinstance(exc, httpx.HTTPError):
                raise _store_unavailable(exc) from exc
            raise
        return Response.streaming(response.aiter_bytes(DOWNLOAD_CHUNK_BYTES),
                                  length_bytes=grant.size_bytes, on_close=close,
                                  content_type=row.mime_type)

    async def list_artifacts(request: Request) -> Response:
        principal = principal_of(authenticator, request.headers)
        run_id, below = _split(request.query_one("path") or "", listing=True)
        base = f"{below.strip('/')}/" if below.strip("/") else ""
        entries: dict[str, dict[str, object]] = {}
        for name, row in _newest(await artifacts.list_artifacts(principal, run_id)).items():
            if not name.startswith(base):
                continue
            head, slash, _ = name[len(base):].partition("/")
            entries[head] = ({"path": head, "is_dir": True} if slash else
                             {"path": head, "is_dir": False, "file_size": row.size_bytes})
        if not entries:
            return json_response({})
        return json_response({"files": [entries[key] for key in sorted(entries)]})

    def spec(summary: str, scope: str, *, stream_body: bool = False) -> RouteSpec:
        return RouteSpec(summary=summary, scope=scope, response=None, tags=("mlflow",),
                         stream_body=stream_body, documented=False)

    for prefix in PREFIXES:
        router.add("GET", f"{prefix}/artifacts", answered(list_artifacts),
                   spec("List a run's MLflow artifacts", "read"))
        router.add("PUT", f"{prefix}/artifacts/{{path}}", answered(upload),
                   spec("Upload an MLflow artifact", "write", stream_body=True),
                   path_tail=True)
        router.add("GET", f"{prefix}/artifacts/{{path}}", answered(download),
                   spec("Download an MLflow artifact", "read"), path_tail=True)
