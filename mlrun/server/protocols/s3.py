"""S3 wire protocol, pure: AWS Signature Version 4, URI encoding, the few XML bodies we speak,
and the artifact key rules shared by every artifact store.

Owns:
- SigV4 for S3 (`canonical_request`, `string_to_sign`, `signing_key`, `sign_request` for the
  `Authorization` header, `presign_url` for query-string authentication), tested against the
  examples AWS publishes in the S3 API reference.
- URI encoding exactly as S3 wants it (`uri_encode`): only `A-Za-z0-9-._~` stay literal, every
  other UTF-8 byte becomes `%XX` (upper-case hex), a space is `%20` (never `+`), and `/` is kept
  in object paths but encoded in query names and values.
- Parsing of S3 error XML, `InitiateMultipartUploadResult`, and building
  `CompleteMultipartUpload` XML, with `xml.etree` and a refusal of any DOCTYPE (the only way to
  declare entities, so no entity-expansion bomb can reach the parser).
- `validate_artifact_key`: the one rule set for artifact keys, used by the S3 store and by the
  local-directory store alike, so a key valid on one is valid on the other.

Must not import: anyio, trio, asyncio, httpx, or anything doing I/O. Every function here is a
plain function of its arguments (the clock is an argument), unit-tested without an event loop.

Invariants:
- A URL built by `object_url` is already in the form S3 canonicalises: decoding its path and
  query and re-encoding them with `uri_encode` gives back the same bytes. The signers rely on
  this, so they can take the wire URL that httpx sends.
- Keys never contain `%2F`-style escaped slashes: `/` in a key is a path separator on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape as xml_escape

from mlrun.server import errors
from mlrun.wire.artifacts import MAX_PART_NUMBER

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
S3_XML_NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"

# S3 refuses presigned URLs valid for longer than seven days; refusing here fails early.
MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600
# S3's own limits: part numbers 1..10000; keys up to 1024 UTF-8 bytes.
MAX_KEY_BYTES = 1024
# Linux NAME_MAX: a longer segment cannot be a file name in the local store, so both stores
# refuse it and stay interchangeable.
MAX_KEY_SEGMENT_BYTES = 255
# Error bodies are small; anything larger is not an S3 error document.
MAX_XML_BYTES = 1 << 20

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SPACES = re.compile(r" +")
_DOCTYPE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


class MalformedS3Response(ValueError):
    """An S3 response body we cannot accept (not XML, DOCTYPE, missing element, too large).

    The storage layer translates it into `errors.BackendError`; the text is for the log only.
    """


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str
    region: str = "us-east-1"


@dataclass(frozen=True, slots=True)
class S3ErrorInfo:
    """The fields of an S3 `<Error>` document that we keep (for the log, never for clients)."""

    code: str
    message: str
    resource: str = ""
    request_id: str = ""


# --- encoding -----------------------------------------------------------------------------------


def uri_encode(text: str, *, encode_slash: bool = True) -> str:
    """Percent-encode `text` the way SigV4 for S3 canonicalises it (UTF-8, upper-case hex)."""
    out: list[str] = []
    for byte in text.encode("utf-8"):
        if byte in _UNRESERVED or (byte == 0x2F and not encode_slash):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def canonical_uri(path: str) -> str:
    """Canonical URI for S3 from a decoded path (S3 does not normalise `.` or `//`)."""
    if not path:
        return "/"
    return uri_encode(path, encode_slash=False)


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """Sorted `name=value` pairs, both encoded; a valueless parameter becomes `name=`."""
    encoded = sorted((uri_encode(name), uri_encode(value)) for name, value in params)
    return "&".join(f"{name}={value}" for name, value in encoded)


def _canonical_header_value(value: str) -> str:
    return _SPACES.sub(" ", value.strip())


def canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    """Return (canonical header block, signed header list) for the headers to be signed."""
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        key = name.strip().lower()
        if key in lowered:
            # Same header twice under different spellings: S3 joins the values with commas.
            lowered[key] = f"{lowered[key]},{_canonical_header_value(value)}"
        else:
            lowered[key] = _canonical_header_value(value)
    names = sorted(lowered)
    block = "".join(f"{name}:{lowered[name]}\n" for name in names)
    return block, ";".join(names)


@dataclass(frozen=True, slots=True)
class _WireUrl:
    scheme: str
    host: str  # as sent in the Host header: lower-case, port only when not the default
    path: str  # decoded
    query: tuple[tuple[str, str], ...]  # decoded, in wire order


def _split_url(url: str) -> _WireUrl:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an absolute http(s) URL: {url!r}")
    hostname = parts.hostname.lower()
    if ":" in hostname:  # IPv6 literal
        hostname = f"[{hostname}]"
    default_port = 443 if parts.scheme == "https" else 80
    host = hostname if parts.port in (None, default_port) else f"{hostname}:{parts.port}"
    query: list[tuple[str, str]] = []
    if parts.query:
        for item in parts.query.split("&"):
            if not item:
                continue
            name, _, value = item.partition("=")
            # `unquote`, not `unquote_plus`: S3 treats a literal `+` in a query as `+`.
            query.append((unquote(name), unquote(value)))
    return _WireUrl(parts.scheme, host, unquote(parts.path), tuple(query))


def object_url(
    endpoint: str, bucket: str, key: str = "", query: Sequence[tuple[str, str]] = ()
) -> str:
    """Path-style URL `endpoint/bucket[/key][?query]`, encoded exactly as it will be signed.

    A valueless parameter is written bare (`?uploads`), as in the S3 documentation.
    """
    base = endpoint.rstrip("/")
    path = f"/{uri_encode(bucket)}"
    if key:
        path += "/" + uri_encode(key, encode_slash=False)
    url = base + path
    if query:
        items = [
            uri_encode(name) + (f"={uri_encode(value)}" if value else "") for name, value in query
        ]
        url += "?" + "&".join(items)
    return url


# --- SigV4 --------------------------------------------------------------------------------------


def amz_date(now: datetime) -> str:
    """`YYYYMMDDTHHMMSSZ` of an aware datetime, in UTC."""
    if now.tzinfo is None:
        raise ValueError("SigV4 needs an aware datetime")
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def credential_scope(date_stamp: str, region: str, service: str = SERVICE) -> str:
    return f"{date_stamp}/{region}/{service}/aws4_request"


def canonical_request(
    *,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    payload_sha256: str,
) -> tuple[str, str]:
    """Return (canonical request, signed header list). `path` and `query` are decoded."""
    header_block, signed = canonical_headers(headers)
    text = "\n".join(
        [
            method.upper(),
            canonical_uri(path),
            canonical_query(query),
            header_block,
            signed,
            payload_sha256,
        ]
    )
    return text, signed


def string_to_sign(*, timestamp: str, scope: str, canonical_request_text: str) -> str:
    digest = hashlib.sha256(canonical_request_text.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{digest}"


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret_key: str, date_stamp: str, region: str, service: str = SERVICE) -> bytes:
    k_date = _hmac(f"AWS4{secret_key}".encode(), date_stamp)
    k_region = _hmac(k_date, region)
    k_service = _hmac(k_region, service)
    return _hmac(k_service, "aws4_request")


def signature(key: bytes, string_to_sign_text: str) -> str:
    return hmac.new(key, string_to_sign_text.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_request(
    *,
    method: str,
    url: str,
    headers: Mapping[str, str],
    payload_sha256: str,
    credentials: Credentials,
    now: datetime,
) -> dict[str, str]:
    """Headers to send for an `Authorization`-header-signed request.

    Every header passed in is signed, plus `host`, `x-amz-date` and `x-amz-content-sha256`
    (`payload_sha256` is the hex SHA-256 of the body, or `UNSIGNED_PAYLOAD`). The result holds
    those headers and `Authorization`; send them all, unchanged.
    """
    wire = _split_url(url)
    timestamp = amz_date(now)
    to_sign = {name.lower(): value for name, value in headers.items()}
    to_sign["host"] = wire.host
    to_sign["x-amz-date"] = timestamp
    to_sign["x-amz-content-sha256"] = payload_sha256
    text, signed = canonical_request(
        method=method,
        path=wire.path,
        query=wire.query,
        headers=to_sign,
        payload_sha256=payload_sha256,
    )
    scope = credential_scope(timestamp[:8], credentials.region)
    sig = signature(
        signing_key(credentials.secret_key, timestamp[:8], credentials.region),
        string_to_sign(timestamp=timestamp, scope=scope, canonical_request_text=text),
    )
    to_sign["authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope},"
        f"SignedHeaders={signed},Signature={sig}"
    )
    return to_sign


def presign_url(
    *,
    method: str,
    url: str,
    credentials: Credentials,
    now: datetime,
    expires_s: int,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Query-string-authenticated URL for `method url`, valid `expires_s` seconds from `now`.

    `headers` (besides `host`, always signed) must then be sent by whoever uses the URL. The
    payload is `UNSIGNED-PAYLOAD`, as S3 requires for presigned URLs.
    """
    if not 1 <= expires_s <= MAX_PRESIGN_EXPIRES_S:
        raise ValueError(f"expires_s must be within 1..{MAX_PRESIGN_EXPIRES_S}, got {expires_s}")
    wire = _split_url(url)
    if any(name.lower().startswith("x-amz-") for name, _ in wire.query):
        raise ValueError("the URL already carries X-Amz-* parameters")
    timestamp = amz_date(now)
    scope = credential_scope(timestamp[:8], credentials.region)
    to_sign = {name.lower(): value for name, value in (headers or {}).items()}
    to_sign["host"] = wire.host
    _, signed = canonical_headers(to_sign)
    query = [
        *wire.query,
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{credentials.access_key}/{scope}"),
        ("X-Amz-Date", timestamp),
        ("X-Amz-Expires", str(expires_s)),
        ("X-Amz-SignedHeaders", signed),
    ]
    text, _ = canonical_request(
        method=method,
        path=wire.path,
        query=query,
        headers=to_sign,
        payload_sha256=UNSIGNED_PAYLOAD,
    )
    sig = signature(
        signing_key(credentials.secret_key, timestamp[:8], credentials.region),
        string_to_sign(timestamp=timestamp, scope=scope, canonical_request_text=text),
    )
    base = url.split("?", 1)[0]
    return f"{base}?{canonical_query(query)}&X-Amz-Signature={sig}"


# --- XML ----------------------------------------------------------------------------------------


def _parse_xml(body: bytes) -> ET.Element:
    if len(body) > MAX_XML_BYTES:
        raise MalformedS3Response(f"XML body of {len(body)} bytes is larger than expected")
    if _DOCTYPE.search(body):
        raise MalformedS3Response("XML with a DOCTYPE or ENTITY declaration is refused")
    try:
        return ET.fromstring(body)
    except ET.ParseError as exc:
        raise MalformedS3Response(f"not well-formed XML: {exc}") from exc


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local_name(child.tag) == name:
            return (child.text or "").strip()
    return None


def parse_error(body: bytes) -> S3ErrorInfo | None:
    """The `<Error>` document in `body`, or None when `body` is another (valid) document.

    S3 may answer 200 and still carry an `<Error>` (CompleteMultipartUpload does), so callers
    check success bodies with this too.
    """
    if not body.strip():
        return None
    root = _parse_xml(body)
    if _local_name(root.tag) != "Error":
        return None
    return S3ErrorInfo(
        code=_child_text(root, "Code") or "",
        message=_child_text(root, "Message") or "",
        resource=_child_text(root, "Resource") or "",
        request_id=_child_text(root, "RequestId") or "",
    )


def parse_initiate_multipart(body: bytes) -> str:
    """The UploadId from an `InitiateMultipartUploadResult`."""
    root = _parse_xml(body)
    # rclone names the root `InitiateMultipartUpload` (no `Result`); accept both spellings.
    if _local_name(root.tag) not in ("InitiateMultipartUploadResult", "InitiateMultipartUpload"):
        raise MalformedS3Response(f"expected InitiateMultipartUploadResult, got {root.tag}")
    upload_id = _child_text(root, "UploadId")
    if not upload_id:
        raise MalformedS3Response("InitiateMultipartUploadResult without an UploadId")
    return upload_id


def parse_complete_multipart(body: bytes) -> str:
    """The ETag from a `CompleteMultipartUploadResult` (errors inside a 200 raise via caller)."""
    root = _parse_xml(body)
    if _local_name(root.tag) != "CompleteMultipartUploadResult":
        raise MalformedS3Response(f"expected CompleteMultipartUploadResult, got {root.tag}")
    return _child_text(root, "ETag") or ""


def normalize_parts(parts: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    """Parts sorted by number (S3 requires ascending order); duplicates and bad numbers refused."""
    ordered = sorted(parts)
    if not ordered:
        raise errors.InvalidInput("a multipart upload needs at least one part", field="parts")
    seen: set[int] = set()
    for number, etag in ordered:
        if not 1 <= number <= MAX_PART_NUMBER:
            raise errors.InvalidInput(
                f"part numbers must be within 1..{MAX_PART_NUMBER}", field="parts"
            )
        if number in seen:
            raise errors.InvalidInput(f"part {number} is listed twice", field="parts")
        if not etag or any(ord(ch) < 0x20 for ch in etag):
            raise errors.InvalidInput(f"part {number} has no valid ETag", field="parts")
        seen.add(number)
    return ordered


def build_complete_multipart(parts: Iterable[tuple[int, str]]) -> bytes:
    """The `CompleteMultipartUpload` body for (part_number, etag) pairs."""
    items = "".join(
        f"<Part><PartNumber>{number}</PartNumber><ETag>{xml_escape(etag)}</ETag></Part>"
        for number, etag in normalize_parts(parts)
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>'
        f'<CompleteMultipartUpload xmlns="{S3_XML_NAMESPACE}">{items}</CompleteMultipartUpload>'
    ).encode()


# --- artifact keys ------------------------------------------------------------------------------


def _is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F


def validate_artifact_key(key: str) -> str:
    """Return `key` unchanged when it is a safe artifact key, else raise InvalidInput(name).

    Rules (the same for S3 and the local directory, so stores are interchangeable):
    relative `/`-separated segments; no empty, `.` or `..` segment (no traversal, no leading or
    trailing or doubled `/`); no backslash; no NUL or other control character; at most
    1024 UTF-8 bytes in all and 255 per segment; valid Unicode (no lone surrogates).
    A key is validated, never rewritten: silently changing names would make two names collide.
    """

    def refuse(why: str) -> errors.InvalidInput:
        return errors.InvalidInput(f"invalid artifact name: {why}", field="name")

    if not isinstance(key, str) or not key:
        raise refuse("it is empty")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise refuse("it is not valid Unicode") from exc
    if len(encoded) > MAX_KEY_BYTES:
        raise refuse(f"it is longer than {MAX_KEY_BYTES} bytes")
    if any(_is_control(ch) for ch in key):
        raise refuse("it contains a control character")
    if "\\" in key:
        raise refuse("it contains a backslash")
    if key.startswith("/"):
        raise refuse("it is an absolute path")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise refuse("it has an empty, '.' or '..' path segment")
        if len(segment.encode("utf-8")) > MAX_KEY_SEGMENT_BYTES:
            raise refuse(f"a path segment is longer than {MAX_KEY_SEGMENT_BYTES} bytes")
    return key
