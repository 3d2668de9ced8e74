"""Authentication: who is calling?

Owns:
- the API key format: `mlrun_` + 32 random bytes as url-safe base64 (43 characters), its
  digest (`key_digest`) and the short display prefix shown in listings;
- extracting the key from HTTP headers or gRPC metadata (`Authorization: Bearer <key>` or
  `X-API-Key`; lower-cased names, as both edges deliver them);
- `Authenticator`: answers `authenticate(headers)` from memory, with no I/O at all.
`Principal` (what a caller may do: scopes, project) and the key records are the `ports.keys`
port; the key API's payloads are `mlrun.wire.keys`; key management, the refresh task and the
bootstrap file are `usecases.keys`; the project check of calls that address a run by id is
`usecases.access.RunAccess`.

Why a SHA-256 digest and not a slow password hash: a key carries 256 random bits, so there is no
dictionary to try and no way to brute-force the digest back; a slow hash protects low-entropy
secrets, and would only cost CPU on every request here. Keys are stored (and held in memory) only
as digests, compared with `hmac.compare_digest`. The in-memory view is a dict keyed by digest:
the timing of a dict probe can at most reveal bits of a SHA-256 digest, from which no key can be
derived. Raw keys are never logged, never put in an error message, and leave the server only
in the answer that creates them.

How authentication stays free of database round trips (and synchronous, so both edges call it
the same way): every server process holds the set of usable keys (digest -> principal and
expiry), at most `MAX_USABLE_KEYS` of them, reloaded from PostgreSQL every
`KEY_REFRESH_INTERVAL_S` by `usecases.keys.serve_key_refresh`. A key created or revoked through
this process is applied to its view at once; other processes see it at their next reload, so
revocation wins everywhere within ~2 s. A local change outlives only the reloads that began
before it (their snapshot may predate its commit); the first reload that began after it is the
truth, so a key created here and revoked on another process is refused here at that reload
too, not kept alive by its local creation. Expiry is checked on every call against the stored
deadline, so an expired key fails at once everywhere. If reloads keep failing for
`MAX_STALENESS_S`, the view is no longer trusted: database keys get 503 (retryable) until a
reload succeeds; the bootstrap key keeps working. Last-used times are noted in memory (at most
once a minute per key) and written by the refresh task, off the request path.

Statuses: 401 `missing_credentials` / `malformed_credentials` / `invalid_credentials` (unknown
or revoked) / `key_expired`; 403 `missing_scope` / `wrong_project`.

The bootstrap key (`MLRUN_API_KEY`, or the generated one in `<data dir>/bootstrap-api-key`) is a
global admin that lives only in memory. `MLRUN_AUTH_DISABLED=true` (allowed only on loopback
listeners, checked by the config) makes every caller the local admin.

Must not import the HTTP or gRPC edges or storage: keys are loaded through the `KeyDirectory`
port (`mlrun.server.storage.postgres.keys` implements it on PostgreSQL) by `usecases.keys`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from mlrun.server.errors import (
    BackendUnavailable,
    InvalidInput,
    Unauthenticated,
)
from mlrun.server.ports.keys import Principal, UsableKey
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.keys import Scope

logger = logging.getLogger("mlrun.auth")

SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
KEY_PREFIX = "mlrun_"
KEY_RANDOM_BYTES = 32
# last_used_at is written at most once per key and interval.
LAST_USED_RESOLUTION_S = 60.0
# `mlrun_` plus the first 6 characters of the random part: enough to tell keys apart in a
# listing, and it leaves ~220 unknown random bits.
DISPLAY_PREFIX_CHARS = len(KEY_PREFIX) + 6
# Longer presented keys are refused before hashing (ours are 49 characters).
MAX_PRESENTED_KEY_CHARS = 512

# Past this age without a successful reload, database keys are refused with 503.
MAX_STALENESS_S = 30.0


# --- principals ----------------------------------------------------------------------------------


BOOTSTRAP_PRINCIPAL = Principal(key_id="bootstrap", scopes=frozenset({"admin"}))
LOCAL_DEV_PRINCIPAL = Principal(key_id="auth-disabled", scopes=frozenset({"admin"}))


def key_digest(raw_key: str) -> bytes:
    return hashlib.sha256(raw_key.encode("utf-8", "surrogatepass")).digest()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def display_prefix(raw_key: str) -> str:
    return raw_key[:DISPLAY_PREFIX_CHARS]


def extract_key(headers: Mapping[str, str]) -> str | None:
    """The key from lower-cased headers (HTTP) or metadata (gRPC); None when absent.

    Repeated headers arrive joined by ", " (RFC 9110; the edges do so), and no API key contains
    a comma. More than one credential — a repeated header, or both `Authorization` and
    `X-API-Key` — is refused (400 `duplicate_credentials`): a proxy that checks the first value
    and a server that uses the last must never disagree about who is calling."""
    given = [name for name in ("authorization", "x-api-key") if headers.get(name, "").strip()]
    if len(given) > 1 or any("," in headers[name] for name in given):
        raise InvalidInput(
            "send exactly one credential: one Authorization or one X-API-Key header",
            code=ErrorCode.DUPLICATE_CREDENTIALS,
            field=given[0] if len(given) == 1 else "authorization",
        )
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise Unauthenticated(
            "the Authorization header must be 'Bearer <api key>'",
            code=ErrorCode.MALFORMED_CREDENTIALS,
        )
    api_key = headers.get("x-api-key")
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None


# --- the in-memory key view ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthStatistics:
    keys: int
    loaded_age_s: float | None  # None: no key directory attached (bootstrap key only)
    pending_last_used: int


class Authenticator:
    """Checks API keys against the bootstrap key and the in-memory key view. No I/O."""

    def __init__(
        self,
        *,
        bootstrap_key: str | None,
        disabled: bool,
        max_staleness_s: float = MAX_STALENESS_S,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._bootstrap_digest = key_digest(bootstrap_key) if bootstrap_key else None
        self._disabled = disabled
        self._max_staleness_s = max_staleness_s
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self._keys: dict[bytes, UsableKey] = {}
        # None until a key directory is attached: then only the bootstrap key exists.
        self._loaded_at: float | None = None
        self._local_additions: dict[bytes, tuple[UsableKey, float]] = {}
        self._local_revocations: dict[str, float] = {}
        self._last_noted: dict[str, float] = {}
        self._pending_last_used: dict[str, float] = {}

    @property
    def disabled(self) -> bool:
        """MLRUN_AUTH_DISABLED: every caller is the local admin (the web UI skips sign-in)."""
        return self._disabled

    # the hot path

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        if self._disabled:
            return LOCAL_DEV_PRINCIPAL
        raw_key = extract_key(headers)
        if raw_key is None:
            raise Unauthenticated(
                "an API key is required (Authorization: Bearer <key> or X-API-Key)",
                code=ErrorCode.MISSING_CREDENTIALS,
            )
        if len(raw_key) > MAX_PRESENTED_KEY_CHARS:
            raise Unauthenticated("the API key is not valid", code=ErrorCode.INVALID_CREDENTIALS)
        digest = key_digest(raw_key)
        if self._bootstrap_digest is not None and hmac.compare_digest(
            digest, self._bootstrap_digest
        ):
            return BOOTSTRAP_PRINCIPAL
        if self._is_stale():
            # The view may miss a revocation (or a new key): neither allow nor deny for sure.
            raise BackendUnavailable(
                "API keys cannot be checked right now (the key directory is unreachable)",
                backend="postgres",
                code=ErrorCode.KEYS_UNAVAILABLE,
            )
        entry = self._keys.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            raise Unauthenticated("the API key is not valid", code=ErrorCode.INVALID_CREDENTIALS)
        if entry.expires_at_s is not None and self._wall_clock() >= entry.expires_at_s:
            raise Unauthenticated("the API key has expired", code=ErrorCode.KEY_EXPIRED)
        self._note_use(entry.principal.key_id)
        return entry.principal

    def _is_stale(self) -> bool:
        if self._loaded_at is None:
            return False
        return self._monotonic() - self._loaded_at > self._max_staleness_s

    def _note_use(self, key_id: str) -> None:
        now = self._monotonic()
        last = self._last_noted.get(key_id)
        if last is None or now - last >= LAST_USED_RESOLUTION_S:
            self._last_noted[key_id] = now
            self._pending_last_used[key_id] = self._wall_clock()

    # maintenance (called by serve_key_refresh and KeyManagement)

    def attach_directory(self) -> None:
        """From now on, keys come from a directory; until the first load the view is stale."""
        if self._loaded_at is None:
            self._loaded_at = -math.inf

    def load_started(self) -> float:
        """Call when a reload begins; pass the result to `replace_keys` as `loaded_from`."""
        return self._monotonic()

    def replace_keys(self, keys: Iterable[UsableKey], *, loaded_from: float) -> None:
        """Install a freshly loaded view, keeping the local changes it may predate: those made
        at or after `loaded_from` (when the load began, from `load_started`). Local changes
        are applied after their commit, so a load that began later saw them in the database:
        from then on the database is the truth, also for another process's later revocation
        of a key created here."""
        now = self._monotonic()
        self._local_additions = {
            digest: (key, at)
            for digest, (key, at) in self._local_additions.items()
            if at >= loaded_from
        }
        self._local_revocations = {
            key_id: at
            for key_id, at in self._local_revocations.items()
            if at >= loaded_from
        }
        view = {key.digest: key for key in keys}
        for digest, (key, _) in self._local_additions.items():
            view.setdefault(digest, key)
        if self._local_revocations:
            view = {
                digest: key
                for digest, key in view.items()
                if key.principal.key_id not in self._local_revocations
            }
        self._keys = view
        self._loaded_at = now
        live = {key.principal.key_id for key in view.values()}
        self._last_noted = {k: v for k, v in self._last_noted.items() if k in live}

    def add_key(self, key: UsableKey) -> None:
        self._keys[key.digest] = key
        self._local_additions[key.digest] = (key, self._monotonic())

    def remove_key(self, key_id: str) -> None:
        self._local_revocations[key_id] = self._monotonic()
        self._keys = {d: k for d, k in self._keys.items() if k.principal.key_id != key_id}
        self._pending_last_used.pop(key_id, None)

    def take_last_used(self) -> dict[str, float]:
        """The last-used times noted since the previous call (key id -> epoch seconds)."""
        pending, self._pending_last_used = self._pending_last_used, {}
        return pending

    def restore_last_used(self, pending: Mapping[str, float]) -> None:
        """Put back times whose write failed (newer notes win)."""
        for key_id, at in pending.items():
            self._pending_last_used.setdefault(key_id, at)

    def statistics(self) -> AuthStatistics:
        age = None if self._loaded_at is None else self._monotonic() - self._loaded_at
        return AuthStatistics(len(self._keys), age, len(self._pending_last_used))
