"""Authentication: who is calling, and may they do this?

Owns: extracting the API key from a request's headers or gRPC metadata (`Authorization: Bearer
<key>` or `X-API-Key`), checking it, and the `Principal` that use-cases receive.

Keys are compared as SHA-256 digests with `hmac.compare_digest` (constant time). A fast hash is
enough here: keys are at least 32 random bytes, so there is nothing to brute-force that a slow
hash would protect. Raw keys are never logged and never appear in an error message.

`MLRUN_AUTH_DISABLED=true` (allowed only on loopback listeners, checked by the config) makes
every caller the local admin.

Must not import the HTTP or gRPC edges or storage drivers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mlrun.server.errors import PermissionDenied, Unauthenticated

logger = logging.getLogger("mlrun.auth")

Scope = Literal["read", "write", "admin"]
KEY_PREFIX = "mlrun_"


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    scopes: frozenset[str]
    project: str | None = None  # None: every project

    def require(self, scope: Scope) -> None:
        if "admin" in self.scopes or scope in self.scopes:
            return
        raise PermissionDenied(f"this API key lacks the {scope!r} scope", code="missing_scope")


BOOTSTRAP_PRINCIPAL = Principal(key_id="bootstrap", scopes=frozenset({"admin"}))
LOCAL_DEV_PRINCIPAL = Principal(key_id="auth-disabled", scopes=frozenset({"admin"}))


def key_digest(raw_key: str) -> bytes:
    return hashlib.sha256(raw_key.encode("utf-8")).digest()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def extract_key(headers: Mapping[str, str]) -> str | None:
    """The key from lower-cased headers (HTTP) or metadata (gRPC); None when absent."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise Unauthenticated(
            "the Authorization header must be 'Bearer <api key>'", code="malformed_credentials"
        )
    api_key = headers.get("x-api-key")
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None


class Authenticator:
    def __init__(self, *, bootstrap_key: str | None, disabled: bool) -> None:
        self._bootstrap_digest = key_digest(bootstrap_key) if bootstrap_key else None
        self._disabled = disabled

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        if self._disabled:
            return LOCAL_DEV_PRINCIPAL
        raw_key = extract_key(headers)
        if raw_key is None:
            raise Unauthenticated(
                "an API key is required (Authorization: Bearer <key> or X-API-Key)",
                code="missing_credentials",
            )
        digest = key_digest(raw_key)
        if self._bootstrap_digest is not None and hmac.compare_digest(
            digest, self._bootstrap_digest
        ):
            return BOOTSTRAP_PRINCIPAL
        raise Unauthenticated("the API key is not valid", code="invalid_credentials")


def load_or_create_bootstrap_key(data_dir: Path) -> tuple[str, Path, bool]:
    """When no MLRUN_API_KEY is configured, keep a generated admin key in the data dir (mode
    0600) so a fresh server is usable without a key ever appearing in a log line.

    Returns (key, path, created)."""
    path = data_dir / "bootstrap-api-key"
    try:
        return path.read_text(encoding="utf-8").strip(), path, False
    except FileNotFoundError:
        pass
    key = new_api_key()
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return key, path, True
