"""The key-directory port: where API keys live, the records that cross it, and `Principal`
(who a key belongs to and what it may do: scopes, an optional project).

`mlrun.server.usecases.keys` (key management, and the refresh task that feeds the authenticator
of `usecases.auth`) talks to a `KeyDirectory`;
`mlrun.server.storage.postgres.keys.PostgresKeyDirectory` implements it. A key is only ever held
as its digest. Must not import storage, pipelines, use-cases or edges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from mlrun.server.errors import NotFound, PermissionDenied
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.keys import KeyInfo, Scope

# Keys that expired less than this long ago stay in the view, so their holders learn
# `key_expired` instead of `invalid_credentials`.
EXPIRED_KEY_MEMORY_S = 24 * 3600


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    scopes: frozenset[str]
    project: str | None = None  # None: every project

    def has(self, scope: Scope) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def require(self, scope: Scope) -> None:
        """403 `missing_scope` unless the key has `scope` (admin implies every scope)."""
        if not self.has(scope):
            raise PermissionDenied(f"this API key lacks the {scope!r} scope",
                                   code=ErrorCode.MISSING_SCOPE)

    def require_run_visible(self, run_id: str, project: str, *, field: str = "run_id") -> None:
        """A project-scoped key sees only its project's runs: a run of another project answers
        404 `run_not_found`, exactly like a run that does not exist, so a key cannot learn
        which run ids other projects use."""
        if self.project is not None and project != self.project:
            raise NotFound(f"run {run_id!r} does not exist",
                           code=ErrorCode.RUN_NOT_FOUND, field=field)

    def require_project(self, project: str) -> None:
        """403 `wrong_project` when the key is limited to a project other than `project`."""
        if self.project is not None and project != self.project:
            raise PermissionDenied(
                f"this API key is limited to project {self.project!r}", code=ErrorCode.WRONG_PROJECT
            )


@dataclass(frozen=True, slots=True)
class UsableKey:
    """A key as every process holds it: its digest, never the key."""

    digest: bytes
    principal: Principal
    expires_at_s: float | None  # epoch seconds; None: never


@dataclass(frozen=True, slots=True)
class NewKeyRecord:
    """What the directory stores for a new key."""

    key_id: str
    name: str
    display_prefix: str
    digest: bytes
    scopes: tuple[str, ...]
    project: str | None
    expires_in_s: int | None


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A new key as stored: its listing and its expiry (epoch seconds) for the key view."""

    info: KeyInfo
    expires_at_s: float | None


class KeyDirectory(Protocol):
    """Where keys live (PostgreSQL: `mlrun.server.storage.postgres.keys.PostgresKeyDirectory`)."""

    async def load_usable(self) -> list[UsableKey]:
        """Every key not revoked and not expired for longer than EXPIRED_KEY_MEMORY_S."""
        ...

    async def insert(self, record: NewKeyRecord, *, max_usable: int) -> StoredKey:
        """Store a new key (its project is created on first use); 409 `too_many_keys` when
        `max_usable` keys are usable already."""
        ...

    async def list_keys(self, *, project: str | None) -> list[KeyInfo]:
        """Every key, newest first; only those of `project` when it is given."""
        ...

    async def revoke(self, key_id: str, *, project: str | None) -> KeyInfo:
        """Revoke (idempotent); 404 `key_not_found`, also for a key outside `project`."""
        ...

    async def record_last_used(self, used: Mapping[str, float]) -> None: ...
