"""The object-store port: where artifact bytes live (S3 / MinIO, or the local directory), the
records that cross it, and the store-wide rules both implementations keep.
`mlrun.server.usecases.artifacts` talks to an `ArtifactStore`; `mlrun.server.storage.objects.s3`
and `mlrun.server.storage.objects.local` implement it. Must not import storage or edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

# The `backend` every store's errors name (one name whichever store is configured).
BACKEND = "artifacts"

# Hashing and file copies work in chunks of this size: memory stays bounded per operation.
CHUNK_BYTES = 1 << 20

# S3 (AWS, MinIO) refuse non-final parts below 5 MiB (EntityTooSmall). rclone does not check;
# the local store does, so that code written against the embedded default works on S3.
MIN_PART_BYTES = 5 * 1024 * 1024

DEFAULT_TIMEOUT_S = 10.0


# Completing a multipart upload of many GB can take S3 a while; it is still bounded.
DEFAULT_COMPLETE_TIMEOUT_S = 120.0


# Hashing reads the whole object: give it long, but not forever (10 GB at ~20 MB/s).
DEFAULT_HASH_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class PresignedRequest:
    """A request a client may make without credentials until `expires_at`.

    `headers` must be sent exactly as given (they are part of the signature); often empty.
    """

    url: str
    method: str
    expires_at: datetime
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    size_bytes: int
    etag: str


class ArtifactStore(Protocol):
    """What the artifact use-cases need from a store; both implementations provide it."""

    @property
    def backend_name(self) -> str: ...

    async def ping(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None: ...

    async def ensure_bucket(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None: ...

    def presign_put(self, key: str, *, expires_s: int) -> PresignedRequest: ...

    def presign_get(self, key: str, *, expires_s: int) -> PresignedRequest: ...

    async def create_multipart(self, key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> str: ...

    def presign_upload_part(
        self, key: str, upload_id: str, part_number: int, *, expires_s: int
    ) -> PresignedRequest: ...

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[tuple[int, str]],
        *,
        timeout_s: float = DEFAULT_COMPLETE_TIMEOUT_S,
    ) -> None: ...

    async def abort_multipart(
        self, key: str, upload_id: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None: ...

    async def head_object(
        self, key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> ObjectInfo | None: ...

    async def sha256_of(self, key: str, *, timeout_s: float = DEFAULT_HASH_TIMEOUT_S) -> str: ...

    async def delete_object(self, key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None: ...

    async def copy_object(self, source_key: str, target_key: str, *,
                          timeout_s: float = DEFAULT_COMPLETE_TIMEOUT_S) -> bool:
        """Copy a whole object (up to 5 GiB, S3's single-copy limit) inside the store; False
        when the source does not exist. The target is replaced if it exists."""
        ...
