"""The local artifact store's signed URLs: their format, how they are signed, and how a request
on one is verified. Pure: no I/O, no clock (callers pass the time).

Owns `LOCAL_ROUTE_PREFIX` (where the URLs point: `public_base_url` + prefix + key), `UPLOAD_ID`
(the local store's upload id format), `signed_local_url` (what `LocalArtifactStore` presigns),
`sign_local`, and `verify_local_signature` -> `LocalGrant` (what the HTTP edge checks before it
calls the store). A URL carries `expires` and an HMAC-SHA256 `signature` of (method, key,
expires[, upload id, part number]); a part URL also carries `upload_id` and `part_number`.

Must not import: the HTTP or gRPC edges, the store itself (`objects.local`), anyio, trio or
asyncio, or any I/O library; the edge imports this module without reaching the store.

Invariants:
- A signature binds every field of the grant: no two field tuples give the same signed message,
  so a URL for one key, method, upload or part is never valid for another.
- Verification compares signatures in constant time and before looking at the clock; anything
  malformed, tampered with or expired is None (one answer for all, so nothing is learnt).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlencode

from mlrun.server import errors
from mlrun.server.protocols import s3 as s3proto
from mlrun.wire.artifacts import MAX_PART_NUMBER

LOCAL_ROUTE_PREFIX: Final = "/artifacts/local/"

UPLOAD_ID: Final = re.compile(r"^[0-9a-f]{32}$")

_HEX_SIGNATURE: Final = re.compile(r"^[0-9a-f]{64}$")

_DIGITS: Final = re.compile(r"^[0-9]{1,12}$")


@dataclass(frozen=True, slots=True)
class LocalGrant:
    """What a verified local URL allows: one method on one key (or one part of an upload)."""

    method: str
    key: str
    expires_at_s: int
    upload_id: str | None = None
    part_number: int | None = None


def _local_message(
    method: str, key: str, expires_at_s: int, upload_id: str | None, part_number: int | None
) -> bytes:
    # NUL-separated: keys refuse control characters and upload ids are hex, so no two field
    # tuples can produce the same message.
    fields = (
        "mlrun-local-artifact-v1",
        method.upper(),
        key,
        str(expires_at_s),
        upload_id or "",
        str(part_number) if part_number is not None else "",
    )
    return "\0".join(fields).encode("utf-8")


def sign_local(
    *,
    signing_secret: bytes,
    method: str,
    key: str,
    expires_at_s: int,
    upload_id: str | None = None,
    part_number: int | None = None,
) -> str:
    """Hex HMAC-SHA256 of (method, key, expires[, upload id, part number])."""
    message = _local_message(method, key, expires_at_s, upload_id, part_number)
    return hmac.new(signing_secret, message, hashlib.sha256).hexdigest()


def signed_local_url(
    *,
    public_base_url: str,
    signing_secret: bytes,
    method: str,
    key: str,
    expires_at_s: int,
    upload_id: str | None = None,
    part_number: int | None = None,
) -> str:
    """The URL allowing `method` on `key` (or on one part of an upload) until `expires_at_s`.

    `key` must already be validated (`protocols.s3.validate_artifact_key`); `public_base_url`
    has no trailing slash."""
    params: dict[str, str] = {"expires": str(expires_at_s)}
    if upload_id is not None and part_number is not None:
        params["upload_id"] = upload_id
        params["part_number"] = str(part_number)
    params["signature"] = sign_local(
        signing_secret=signing_secret,
        method=method,
        key=key,
        expires_at_s=expires_at_s,
        upload_id=upload_id,
        part_number=part_number,
    )
    return (
        f"{public_base_url}{LOCAL_ROUTE_PREFIX}"
        f"{s3proto.uri_encode(key, encode_slash=False)}?{urlencode(params)}"
    )


def verify_local_signature(
    *, signing_secret: bytes, method: str, key: str, query: Mapping[str, str], now_s: float
) -> LocalGrant | None:
    """Check a request on a local artifact URL. Pure; the HTTP edge answers 403 on None.

    `key` is the decoded path after `LOCAL_ROUTE_PREFIX`; `query` the decoded query parameters
    (`expires`, `signature`, and for a part `upload_id` and `part_number`). None when anything
    is malformed, tampered with or expired; the signature is compared in constant time.
    """
    try:
        s3proto.validate_artifact_key(key)
    except errors.InvalidInput:
        return None
    expires = query.get("expires", "")
    given = query.get("signature", "")
    if not _DIGITS.match(expires) or not _HEX_SIGNATURE.match(given):
        return None
    expires_at_s = int(expires)
    upload_id = query.get("upload_id")
    part = query.get("part_number")
    part_number: int | None = None
    if upload_id is not None or part is not None:
        if upload_id is None or part is None or method.upper() != "PUT":
            return None
        if not UPLOAD_ID.match(upload_id) or not _DIGITS.match(part):
            return None
        part_number = int(part)
        if not 1 <= part_number <= MAX_PART_NUMBER:
            return None
    expected = sign_local(
        signing_secret=signing_secret,
        method=method,
        key=key,
        expires_at_s=expires_at_s,
        upload_id=upload_id,
        part_number=part_number,
    )
    # Compare before looking at the clock, so timing says nothing about which check failed.
    if not hmac.compare_digest(expected, given):
        return None
    if now_s > expires_at_s:
        return None
    return LocalGrant(method.upper(), key, expires_at_s, upload_id, part_number)
