"""The artifact-record port: the PostgreSQL rows of artifacts (pending while an upload URL is
out, finalized once the object was verified) as `mlrun.server.usecases.artifacts` sees them.
`mlrun.server.storage.postgres.metadata.MetadataStore` implements `ArtifactRows`.
Must not import storage or edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class ArtifactRow:
    """One row of `artifacts`. `size_bytes` is the verified size (0 until finalized);
    `declared_size_bytes` what the client announced, if anything."""

    artifact_id: str
    run_id: str
    name: str
    type: str
    mime_type: str
    storage_key: str
    sha256: str | None
    upload_id: str | None
    declared_size_bytes: int | None
    size_bytes: int = 0
    status: Literal["pending", "finalized"] = "pending"
    created_at: datetime | None = None
    finalized_at: datetime | None = None


class ArtifactRows(Protocol):
    """The artifact use-case's side of the metadata store (each call one transaction)."""

    async def run_project(self, run_id: str) -> str:
        """The name of the run's project; NotFound `run_not_found`."""
        ...

    async def insert_artifact(self, row: ArtifactRow) -> ArtifactRow: ...

    async def get_artifact(self, run_id: str, artifact_id: str) -> ArtifactRow | None: ...

    async def finalize_artifact(self, run_id: str, artifact_id: str, *, size_bytes: int
                                ) -> ArtifactRow | None:
        """pending -> finalized with the verified size; a finalized one is returned as is;
        None when it does not exist (any more)."""
        ...

    async def delete_pending_artifact(self, run_id: str, artifact_id: str) -> bool: ...

    async def list_artifacts(self, run_id: str, *, limit: int) -> list[ArtifactRow]: ...
