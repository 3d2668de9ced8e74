"""Artifact use-cases: upload grants, finalize (verify, then record), list, download URL, abort.

Owns the journey of an artifact, which is what keeps a multi-GB checkpoint out of this process
and keeps PostgreSQL honest about what is in the store:

    create_upload   check scope and project · validate the name · pick single PUT or multipart
                    by the declared size · record the artifact as 'pending' · hand out
                    presigned URLs (S3 SigV4, or the local store's HMAC-signed server URLs)
    (the client uploads straight to the store)
    finalize        complete the multipart upload (with the client's part ETags) · HEAD the
                    object: it must exist (409 object_missing) with the declared size
                    (409 size_mismatch) · hash it when a SHA-256 was declared (409
                    checksum_mismatch) · only then mark it 'finalized' in PostgreSQL
    list / download_url   finalized artifacts only; download URLs are presigned GETs
    abort           drop a pending upload: multipart parts, any uploaded object, the record

A refused finalize records nothing (the record stays 'pending', invisible to listings); the
client may upload again through a still-valid URL, or abort. Finalize is idempotent and
re-verifies: an artifact finalized already is answered as it is once its object still has the
recorded size (409 `artifact_modified` otherwise). Artifacts may be added to runs in any state
(a model is often uploaded after training finished).

Immutable once finalized. An upload URL stays valid for its whole hour and a presigned URL
cannot be revoked, so no URL ever handed out may reach a finalized object:
- a single PUT goes to a staging key, `uploads/<artifact_id>/<name>`; finalize copies it
  inside the store to the artifact's key (S3 CopyObject, up to 5 GiB like a single PUT; the
  local store hard-links it), verifies the *copy* (size, SHA-256 when declared), deletes the
  staging object and only then records the artifact. A PUT through the old URL afterwards
  writes a staging object nothing reads; downloads read the artifact's key, for which no upload
  URL exists. Chosen over a conditional PUT (`If-None-Match: *`) and a verify-on-read GET
  (`If-Match`) because the S3 servers in reach (rclone's) ignore both headers, and a guarantee
  nobody can test is not one;
- a multipart upload completes at the artifact's key: completion ends the upload id, and every
  part URL then fails (NoSuchUpload).

Object keys are `runs/<run_id>/<artifact_id>/<name>`: never reused (the id is fresh), and the
name keeps its meaning in the store. Names are validated by the stores' one rule set
(`protocols.s3.validate_artifact_key`: no traversal, no absolute path, bounded length), never
rewritten.

Sizes: an upload larger than `multipart_threshold_bytes` is split in parts of at least
`min_part_bytes` (S3 refuses non-final parts under 5 MiB), at most `max_parts` of them, so the
answer stays small; the object limit is S3's 5 TiB. Without a declared size the upload is a
single PUT (S3 caps those at 5 GiB).

The HTTP and gRPC edges both call `Artifacts`; neither holds any of this logic. The request
payloads (`CreateArtifact`, `FinalizeArtifact`) are the msgspec Structs of `mlrun.wire.artifacts`
that the HTTP edge decodes into and the gRPC edge builds; answers are plain records each edge
renders in its own form. The store and the artifact records are reached through the ports
(`ports.objects.ArtifactStore`, `ports.artifact_rows.ArtifactRows`).
Must not import the edges, hypercorn, purerpc, pipelines or storage.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import anyio

from mlrun.server.errors import (
    BackendError,
    Conflict,
    InvalidInput,
    MlrunError,
    NotFound,
)
from mlrun.server.ports.artifact_rows import ArtifactRow, ArtifactRows
from mlrun.server.ports.keys import Principal
from mlrun.server.ports.objects import ArtifactStore, PresignedRequest
from mlrun.server.protocols.s3 import validate_artifact_key
from mlrun.server.usecases.access import RunAccess
from mlrun.wire.artifacts import (
    MAX_PART_BYTES,
    CompletedPart,
    CreateArtifact,
    FinalizeArtifact,
    MiB,
)
from mlrun.wire.error_codes import ErrorCode

logger = logging.getLogger("mlrun.artifacts")

ABORT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ArtifactLimits:
    multipart_threshold_bytes: int = 16 * MiB
    min_part_bytes: int = 8 * MiB
    max_parts: int = 1000
    upload_url_expires_s: int = 3600
    download_url_expires_s: int = 900
    max_listed: int = 10_000


# --- request payloads (HTTP decodes into them; gRPC builds them) ---------------------------------


# --- answers -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadGrant:
    """Where to upload: one presigned PUT (`single`), or presigned part PUTs (`parts`)."""

    artifact_id: str
    expires_at: datetime
    single: PresignedRequest | None
    upload_id: str | None = None
    part_size_bytes: int = 0
    parts: tuple[PresignedRequest, ...] = ()


@dataclass(frozen=True, slots=True)
class DownloadGrant:
    artifact_id: str
    size_bytes: int
    request: PresignedRequest


def part_size_for(size_bytes: int, limits: ArtifactLimits) -> int:
    """The part size of a multipart upload: at least `min_part_bytes`, whole MiB, and large
    enough that at most `max_parts` parts are needed."""
    needed = math.ceil(size_bytes / limits.max_parts)
    part = max(limits.min_part_bytes, math.ceil(needed / MiB) * MiB)
    return min(part, MAX_PART_BYTES)


class Artifacts:
    def __init__(
        self,
        store: ArtifactStore,
        metadata: ArtifactRows,
        *,
        limits: ArtifactLimits = ArtifactLimits(),
        run_access: RunAccess | None = None,
    ) -> None:
        self._store = store
        self._metadata = metadata
        self._limits = limits
        self._run_access = run_access or RunAccess(metadata.run_project)

    @property
    def store(self) -> ArtifactStore:
        return self._store

    async def create_upload(
        self, principal: Principal, run_id: str, request: CreateArtifact
    ) -> UploadGrant:
        principal.require("write")
        await self._run_access.require(principal, run_id)
        validate_artifact_key(request.name)
        artifact_id = uuid.uuid4().hex
        storage_key = f"runs/{run_id}/{artifact_id}/{request.name}"
        try:
            validate_artifact_key(storage_key)
        except InvalidInput as exc:
            raise InvalidInput(
                "invalid artifact name: it is too long", code=ErrorCode.INVALID_FIELD, field="name"
            ) from exc
        size = request.size_bytes
        multipart = size is not None and size > self._limits.multipart_threshold_bytes
        upload_id = await self._store.create_multipart(storage_key) if multipart else None
        row = ArtifactRow(
            artifact_id=artifact_id,
            run_id=run_id,
            name=request.name,
            type=request.type,
            mime_type=request.mime_type,
            storage_key=storage_key,
            sha256=request.sha256.lower() if request.sha256 is not None else None,
            upload_id=upload_id,
            declared_size_bytes=size,
        )
        try:
            await self._metadata.insert_artifact(row)
        except BaseException:
            if upload_id is not None:
                await self._abort_quietly(storage_key, upload_id)
            raise
        expires_s = self._limits.upload_url_expires_s
        if upload_id is None:
            single = self._store.presign_put(staging_key(row), expires_s=expires_s)
            return UploadGrant(artifact_id=artifact_id, expires_at=single.expires_at,
                               single=single)
        assert size is not None
        part_size = part_size_for(size, self._limits)
        count = max(1, math.ceil(size / part_size))
        parts = tuple(
            self._store.presign_upload_part(storage_key, upload_id, number, expires_s=expires_s)
            for number in range(1, count + 1)
        )
        return UploadGrant(
            artifact_id=artifact_id,
            expires_at=min(part.expires_at for part in parts),
            single=None,
            upload_id=upload_id,
            part_size_bytes=part_size,
            parts=parts,
        )

    async def finalize(
        self, principal: Principal, run_id: str, artifact_id: str, request: FinalizeArtifact
    ) -> ArtifactRow:
        principal.require("write")
        await self._run_access.require(principal, run_id)
        row = await self._get(run_id, artifact_id)
        if row.status == "finalized":
            await self._check_unchanged(row)
            return row
        if row.upload_id is not None:
            if not request.parts:
                raise InvalidInput(
                    "this artifact is a multipart upload: finalize it with its parts"
                    " (part_number and the ETag each part PUT answered)",
                    code=ErrorCode.PARTS_REQUIRED, field="parts")
            await self._complete(row.storage_key, row.upload_id, request.parts)
        elif request.parts:
            raise InvalidInput("this artifact is a single PUT upload: send no parts",
                               code=ErrorCode.UNEXPECTED_PARTS, field="parts")
        else:
            await self._fix_in_place(row)
        size_bytes = await self._verify(row)
        if row.upload_id is None:
            await self._delete_quietly(staging_key(row))
        finalized = await self._metadata.finalize_artifact(run_id, artifact_id,
                                                           size_bytes=size_bytes)
        if finalized is None:  # aborted concurrently
            raise _artifact_not_found(artifact_id)
        return finalized

    async def abort(self, principal: Principal, run_id: str, artifact_id: str) -> None:
        """Drop a pending upload: its parts, any object uploaded so far, and its record."""
        principal.require("write")
        await self._run_access.require(principal, run_id)
        row = await self._get(run_id, artifact_id)
        if row.status == "finalized":
            raise Conflict(f"artifact {artifact_id!r} is finalized; it cannot be aborted",
                           code=ErrorCode.ARTIFACT_FINALIZED, field="artifact_id")
        if row.upload_id is not None:
            await self._store.abort_multipart(row.storage_key, row.upload_id)
        else:
            await self._store.delete_object(staging_key(row))
        await self._store.delete_object(row.storage_key)
        if not await self._metadata.delete_pending_artifact(run_id, artifact_id):
            raise _artifact_not_found(artifact_id)

    async def list_artifacts(self, principal: Principal, run_id: str) -> list[ArtifactRow]:
        principal.require("read")
        await self._run_access.require(principal, run_id)
        return await self._metadata.list_artifacts(run_id, limit=self._limits.max_listed)

    async def download_url(
        self, principal: Principal, run_id: str, artifact_id: str
    ) -> DownloadGrant:
        principal.require("read")
        await self._run_access.require(principal, run_id)
        row = await self._get(run_id, artifact_id)
        if row.status != "finalized":
            raise Conflict(f"artifact {artifact_id!r} is not finalized yet",
                           code=ErrorCode.ARTIFACT_NOT_FINALIZED, field="artifact_id")
        request = self._store.presign_get(row.storage_key,
                                          expires_s=self._limits.download_url_expires_s)
        return DownloadGrant(artifact_id=artifact_id, size_bytes=row.size_bytes, request=request)

    # --- steps ---------------------------------------------------------------------------------

    async def _get(self, run_id: str, artifact_id: str) -> ArtifactRow:
        row = await self._metadata.get_artifact(run_id, artifact_id)
        if row is None:
            # Tell an unknown run apart from an unknown artifact (run_project raises 404).
            await self._metadata.run_project(run_id)
            raise _artifact_not_found(artifact_id)
        return row

    async def _complete(
        self, storage_key: str, upload_id: str, parts: Sequence[CompletedPart]
    ) -> None:
        """Complete the multipart upload. An upload the store no longer knows was completed by
        an earlier finalize (or aborted): the HEAD that follows decides which."""
        try:
            await self._store.complete_multipart(
                storage_key, upload_id, [(part.part_number, part.etag) for part in parts])
        except NotFound:
            return
        except InvalidInput as exc:
            raise InvalidInput(exc.message, code=ErrorCode.INVALID_PARTS, field="parts") from exc
        except BackendError as exc:
            if exc.backend_code == 404:  # NoSuchUpload
                return
            if exc.backend_code is not None and 400 <= exc.backend_code < 500:
                raise InvalidInput(
                    "the artifact store refused the parts: one is missing, too small, or its"
                    " ETag does not match what the store answered",
                    code=ErrorCode.INVALID_PARTS, field="parts") from exc
            raise

    async def _fix_in_place(self, row: ArtifactRow) -> None:
        """Copy a single-PUT upload from its staging key to the artifact's key, which no URL
        can write. A retried finalize may find the staging object gone and the copy done."""
        if await self._store.copy_object(staging_key(row), row.storage_key):
            return
        if await self._store.head_object(row.storage_key) is None:
            raise _object_missing(row.artifact_id)

    async def _check_unchanged(self, row: ArtifactRow) -> None:
        info = await self._store.head_object(row.storage_key)
        if info is None or info.size_bytes != row.size_bytes:
            raise Conflict(
                f"the object of artifact {row.artifact_id!r} is no longer the one finalized;"
                " it was changed or removed in the store itself", code=ErrorCode.ARTIFACT_MODIFIED,
                field="artifact_id")

    async def _verify(self, row: ArtifactRow) -> int:
        """The object's size once it exists with the declared size and checksum."""
        info = await self._store.head_object(row.storage_key)
        if info is None:
            raise _object_missing(row.artifact_id)
        declared = row.declared_size_bytes
        if declared is not None and info.size_bytes != declared:
            raise Conflict(
                f"the uploaded object has {info.size_bytes} bytes, but {declared} were declared",
                code=ErrorCode.SIZE_MISMATCH, field="size_bytes")
        if row.sha256 is not None:
            try:
                digest = await self._store.sha256_of(row.storage_key)
            except NotFound as exc:
                raise _object_missing(row.artifact_id) from exc
            if digest != row.sha256:
                raise Conflict("the uploaded object's SHA-256 differs from the declared one",
                               code=ErrorCode.CHECKSUM_MISMATCH, field="sha256")
        return info.size_bytes

    async def _delete_quietly(self, key: str) -> None:
        # The copy is verified and is what downloads read; a staging object left behind (the
        # store failed here) is unreachable garbage, not a reason to refuse the finalize.
        try:
            with anyio.fail_after(ABORT_TIMEOUT_S):
                await self._store.delete_object(key, timeout_s=ABORT_TIMEOUT_S)
        except (MlrunError, TimeoutError) as exc:
            logger.warning("could not delete the staging object %s: %s", key,
                           getattr(exc, "code", "timeout"))

    async def _abort_quietly(self, storage_key: str, upload_id: str) -> None:
        # Shielded and bounded: a failed create must not leave parts behind, nor hang.
        with anyio.CancelScope(shield=True), anyio.move_on_after(ABORT_TIMEOUT_S):
            try:
                await self._store.abort_multipart(storage_key, upload_id,
                                                  timeout_s=ABORT_TIMEOUT_S)
            except MlrunError as exc:
                logger.warning("could not abort multipart upload of %s: %s", storage_key,
                               exc.code)


def staging_key(row: ArtifactRow) -> str:
    """Where a single-PUT upload lands before finalize fixes it at `row.storage_key`."""
    return f"uploads/{row.artifact_id}/{row.name}"


def _artifact_not_found(artifact_id: str) -> NotFound:
    return NotFound(f"artifact {artifact_id!r} not found", code=ErrorCode.ARTIFACT_NOT_FOUND,
                    field="artifact_id")


def _object_missing(artifact_id: str) -> Conflict:
    return Conflict(
        f"the object of artifact {artifact_id!r} is not in the store: upload it first",
        code=ErrorCode.OBJECT_MISSING, field="artifact_id")
