"""Key management: the create / list / revoke use-cases (HTTP edge, `mlrun keys` CLI), the task
that keeps every process's key view fresh and writes last-used times (`serve_key_refresh`), and
the bootstrap key file of the data dir.

The authenticator these feed, and the rules of the key format, are `usecases.auth`; keys are
stored through the `KeyDirectory` port (`storage.postgres.keys` implements it). A key created or
revoked here is applied to this process's view at once; other processes see it at their next
reload (every `KEY_REFRESH_INTERVAL_S`), so revocation wins everywhere within ~2 s.

Must not import the HTTP or gRPC edges or storage.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

import anyio
import anyio.abc

from mlrun.server.errors import (
    InvalidInput,
    MlrunError,
)
from mlrun.server.ports.keys import KeyDirectory, NewKeyRecord, Principal, UsableKey
from mlrun.server.usecases.auth import (
    MAX_STALENESS_S,
    SCOPES,
    Authenticator,
    display_prefix,
    key_digest,
    new_api_key,
)
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.keys import CreatedKey, CreateKey, KeyInfo

logger = logging.getLogger("mlrun.keys")


# The reload period of every process's key view: how long a revocation made elsewhere can
# still be honoured here.
KEY_REFRESH_INTERVAL_S = 2.0


KEY_LOAD_TIMEOUT_S = 5.0




# The bound of every process's key view (creation past it is refused with 409 too_many_keys).
MAX_USABLE_KEYS = 10_000


_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class KeyManagement:
    """Create, list and revoke keys. Needs `admin`; a project-scoped admin manages only keys of
    its own project (it can never mint a global key)."""

    def __init__(self, directory: KeyDirectory, authenticator: Authenticator) -> None:
        self._directory = directory
        self._authenticator = authenticator

    async def create(self, principal: Principal, request: CreateKey) -> CreatedKey:
        principal.require("admin")
        project = request.project
        if principal.project is not None:
            if project is None:
                project = principal.project
            principal.require_project(project)
        scopes = tuple(scope for scope in SCOPES if scope in request.scopes)
        raw_key = new_api_key()
        digest = key_digest(raw_key)
        record = NewKeyRecord(
            key_id="key_" + secrets.token_hex(8),
            name=request.name,
            display_prefix=display_prefix(raw_key),
            digest=digest,
            scopes=scopes,
            project=project,
            expires_in_s=request.expires_in_s,
        )
        stored = await self._directory.insert(record, max_usable=MAX_USABLE_KEYS)
        self._authenticator.add_key(
            UsableKey(
                digest=digest,
                principal=Principal(record.key_id, frozenset(scopes), project),
                expires_at_s=stored.expires_at_s,
            )
        )
        info = stored.info
        logger.info("API key %s (%s) created by %s", info.key_id, info.display_prefix,
                    principal.key_id)
        return CreatedKey(
            key=raw_key,
            key_id=info.key_id,
            name=info.name,
            display_prefix=info.display_prefix,
            scopes=info.scopes,
            project=info.project,
            created_at=info.created_at,
            expires_at=info.expires_at,
        )

    async def list_keys(self, principal: Principal) -> list[KeyInfo]:
        principal.require("admin")
        return await self._directory.list_keys(project=principal.project)

    async def revoke(self, principal: Principal, key_id: str) -> KeyInfo:
        principal.require("admin")
        info = await self._directory.revoke(key_id, project=principal.project)
        self._authenticator.remove_key(key_id)
        logger.info("API key %s revoked by %s", key_id, principal.key_id)
        return info


async def serve_key_refresh(
    authenticator: Authenticator,
    directory: KeyDirectory,
    *,
    interval_s: float = KEY_REFRESH_INTERVAL_S,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Load the key view, report started, then reload every `interval_s` until cancelled.

    A periodic reload (a timer, not a poll for an event: other processes' changes produce no
    event this process could wait for) is what bounds how long a revocation elsewhere takes
    to reach here. Failures are logged once per outage and retried at the next tick. On
    cancellation, last-used times still pending are written (shielded, bounded)."""
    authenticator.attach_directory()
    healthy = await _refresh_once(authenticator, directory, healthy=True)
    task_status.started()
    try:
        while True:
            await anyio.sleep(interval_s)
            healthy = await _refresh_once(authenticator, directory, healthy=healthy)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(KEY_LOAD_TIMEOUT_S):
            await _flush_last_used(authenticator, directory)


async def _refresh_once(
    authenticator: Authenticator, directory: KeyDirectory, *, healthy: bool
) -> bool:
    loaded_from = authenticator.load_started()
    try:
        with anyio.fail_after(KEY_LOAD_TIMEOUT_S):
            keys = await directory.load_usable()
    except (MlrunError, TimeoutError) as exc:
        if healthy:
            logger.warning("cannot reload API keys: %s (keeping the current view for up to"
                           " %g s)", getattr(exc, "code", "timeout"), MAX_STALENESS_S)
        return False
    authenticator.replace_keys(keys, loaded_from=loaded_from)
    if not healthy:
        logger.info("API keys reloaded (%d usable)", len(keys))
    await _flush_last_used(authenticator, directory)
    return True


async def _flush_last_used(authenticator: Authenticator, directory: KeyDirectory) -> None:
    used = authenticator.take_last_used()
    if not used:
        return
    try:
        with anyio.fail_after(KEY_LOAD_TIMEOUT_S):
            await directory.record_last_used(used)
    except (MlrunError, TimeoutError):
        authenticator.restore_last_used(used)


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


def validate_key_id(key_id: str) -> str:
    """A key id from a path: refuse anything that cannot be one (400, field key_id)."""
    if not _KEY_ID.match(key_id):
        raise InvalidInput("not a valid key id", code=ErrorCode.INVALID_FIELD, field="key_id")
    return key_id
