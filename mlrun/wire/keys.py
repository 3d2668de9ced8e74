"""What the key API (`/api/v1/keys`) sends and answers: msgspec Structs, one place for both the
server and any client. Must not import the server."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from mlrun.wire.schemas import ProjectName

Scope = Literal["read", "write", "admin"]


MAX_KEY_LIFETIME_S = 10 * 365 * 24 * 3600


KeyName = Annotated[str, Meta(min_length=1, max_length=100)]


class CreateKey(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """POST /api/v1/keys. `expires_in_s` None: the key never expires."""

    name: KeyName
    scopes: Annotated[list[Scope], Meta(min_length=1, max_length=3)]
    project: ProjectName | None = None
    expires_in_s: Annotated[int, Meta(ge=1, le=MAX_KEY_LIFETIME_S)] | None = None


class KeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A key as listings show it: never the secret, only its first characters."""

    key_id: str
    name: str
    display_prefix: str
    scopes: list[str]
    project: str | None
    created_at: str
    expires_at: str | None
    last_used_at: str | None
    revoked_at: str | None
    status: Literal["active", "expired", "revoked"]


class CreatedKey(msgspec.Struct, frozen=True, kw_only=True):
    """The one answer that carries the raw key; it cannot be shown again."""

    key: str
    key_id: str
    name: str
    display_prefix: str
    scopes: list[str]
    project: str | None
    created_at: str
    expires_at: str | None


class WhoAmI(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /api/v1/whoami`: the presented key as the server sees it (no secret)."""

    key_id: str
    scopes: list[str]
    project: str | None


class KeyList(msgspec.Struct, frozen=True, kw_only=True):
    keys: list[KeyInfo]
