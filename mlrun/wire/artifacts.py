"""What the artifact API (`/api/v1/runs/{run_id}/artifacts...`) sends and answers: msgspec
Structs and their limits, one place for the server, the SDK and any client.

The size limits are S3's own (objects up to 5 TiB, parts and single PUTs up to 5 GiB, at most
10,000 parts); the local store keeps the same ones so that a deployment can move between them.
Must not import the server or the SDK.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

MAX_PART_NUMBER = 10_000
ARTIFACT_ID_PATTERN = r"^[0-9a-f]{32}$"


MiB = 1024 * 1024


GiB = 1024 * MiB


# S3's own limits: objects up to 5 TiB, parts up to 5 GiB, single PUTs up to 5 GiB.
MAX_ARTIFACT_BYTES = 5 * 1024 * GiB


MAX_PART_BYTES = 5 * GiB


MAX_SINGLE_PUT_BYTES = 5 * GiB


Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")]


ArtifactType = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


_MIME_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"


MimeType = Annotated[
    str, Meta(min_length=3, max_length=255, pattern=f"^{_MIME_TOKEN}/{_MIME_TOKEN}$")
]


class CreateArtifact(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """POST /api/v1/runs/{run_id}/artifacts. `size_bytes` picks single PUT or multipart, and is
    checked at finalize; `sha256` (hex) is checked at finalize when given."""

    name: Annotated[str, Meta(min_length=1, max_length=1024)]
    type: ArtifactType = "file"
    size_bytes: Annotated[int, Meta(ge=0, le=MAX_ARTIFACT_BYTES)] | None = None
    sha256: Sha256Hex | None = None
    mime_type: MimeType = "application/octet-stream"


class CompletedPart(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One uploaded part: its number and the ETag header the store answered its PUT with."""

    part_number: Annotated[int, Meta(ge=1, le=MAX_PART_NUMBER)]
    etag: Annotated[str, Meta(min_length=1, max_length=256)]


class FinalizeArtifact(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """POST .../finalize: the parts of a multipart upload; nothing for a single PUT."""

    parts: Annotated[list[CompletedPart], Meta(max_length=MAX_PART_NUMBER)] = []


class UploadPart(msgspec.Struct, frozen=True, kw_only=True):
    part_number: int
    url: str


class MultipartUpload(msgspec.Struct, frozen=True, kw_only=True):
    """Upload part i (1-based) as bytes [(i-1)*part_size, i*part_size) with a PUT to its URL,
    keep each answer's ETag header, then finalize with the list of (part_number, etag)."""

    upload_id: str
    part_size_bytes: int
    parts: list[UploadPart]


class ArtifactUpload(msgspec.Struct, frozen=True, kw_only=True):
    """Where to upload: `upload_url` (one PUT of the whole file), or `multipart` (then
    `upload_url` is null). Send `required_headers` with every PUT."""

    artifact_id: str
    method: Literal["PUT"] = "PUT"
    upload_url: str | None
    expires_at: str
    required_headers: dict[str, str]
    multipart: MultipartUpload | None


class Artifact(msgspec.Struct, frozen=True, kw_only=True):
    artifact_id: str
    run_id: str
    name: str
    type: str
    size_bytes: int
    sha256: str | None
    mime_type: str
    status: Literal["pending", "finalized"]
    created_at: str
    finalized_at: str | None


class ArtifactList(msgspec.Struct, frozen=True, kw_only=True):
    artifacts: list[Artifact]


class ArtifactDownload(msgspec.Struct, frozen=True, kw_only=True):
    artifact_id: str
    download_url: str
    expires_at: str
    size_bytes: int


class ArtifactAborted(msgspec.Struct, frozen=True, kw_only=True):
    artifact_id: str
    status: Literal["aborted"] = "aborted"


class LocalObjectStored(msgspec.Struct, frozen=True, kw_only=True):
    etag: str
