"""Artifacts on S3 / MinIO: `open_s3_store` -> `S3ArtifactStore`, the production
implementation of the `ArtifactStore` port (the embedded default is `objects.local`).

Owns path-style S3 requests signed with SigV4 (`mlrun.server.protocols.s3`) over httpx:
presigned PUT/GET/part URLs, multipart create/complete/abort, HEAD, server-side copy, streamed
SHA-256, DELETE. Bytes of artifacts never pass through this process except when `sha256_of`
reads an object to verify it (streamed, bounded chunks).

Must not import: the HTTP or gRPC edges, the local store, trio or asyncio (anyio only), psycopg,
chdb.

Invariants:
- Every key goes through `protocols.s3.validate_artifact_key` first, so no key can traverse.
- Every network call runs under `anyio.fail_after` and the client's own timeouts; httpx errors
  become `BackendUnavailable`/`BackendTimeout(backend="artifacts")`; an S3 5xx answer becomes
  `BackendUnavailable` (transient by AWS's guidance), any other S3 error `BackendError`. S3's
  own text goes only to `.detail` / the chained `S3StatusError`, never into the message.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import anyio
import httpx

from mlrun.server import errors
from mlrun.server.ports.objects import (
    BACKEND,
    CHUNK_BYTES,
    DEFAULT_COMPLETE_TIMEOUT_S,
    DEFAULT_HASH_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    ObjectInfo,
    PresignedRequest,
)
from mlrun.server.protocols import s3 as s3proto
from mlrun.wire.artifacts import MAX_PART_NUMBER

CONNECT_TIMEOUT_S = 5.0
# Below the idle timeout of common S3 servers, so a pooled connection is not reused as it dies.
KEEPALIVE_EXPIRY_S = 4.0
# Bodies we read into memory (XML answers, error documents) are small; refuse anything bigger.
MAX_RESPONSE_BYTES = 1 << 20
# Worker threads hashing streamed objects, shared by every operation of one store.
MAX_THREADS = 4

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


# --- S3 -----------------------------------------------------------------------------------------


class S3StatusError(Exception):
    """An S3 answer we refused; chained as the cause of the `MlrunError` for the server log."""


@contextlib.contextmanager
def _backend_errors(action: str, timeout_s: float) -> Iterator[None]:
    """Run a block under a deadline, translating transport failures into the error tree."""
    try:
        with anyio.fail_after(timeout_s):
            yield
    except TimeoutError as exc:
        raise errors.BackendTimeout(
            f"the artifact store did not answer {action} within {timeout_s:g} s", backend=BACKEND
        ) from exc
    except httpx.TimeoutException as exc:
        raise errors.BackendTimeout(
            f"the artifact store timed out during {action}", backend=BACKEND
        ) from exc
    except httpx.TransportError as exc:
        raise errors.BackendUnavailable(
            f"the artifact store cannot be reached for {action}", backend=BACKEND
        ) from exc
    except s3proto.MalformedS3Response as exc:
        raise errors.BackendError(
            f"the artifact store gave an unreadable answer to {action}",
            backend=BACKEND,
            detail=str(exc),
        ) from exc


async def _read_bounded(response: httpx.Response, max_bytes: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise s3proto.MalformedS3Response(f"answer body larger than {max_bytes} bytes")
    return bytes(body)


def _raise_for_status(action: str, response: httpx.Response, body: bytes) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    try:
        info = s3proto.parse_error(body)
    except s3proto.MalformedS3Response:
        info = None
    if info is not None:
        detail = f"HTTP {status} {info.code}: {info.message}"
    else:
        detail = f"HTTP {status}: {body[:200]!r}"
    if status >= 500:
        # 500/503 from S3 (InternalError, SlowDown) are transient by AWS's own guidance.
        raise errors.BackendUnavailable(
            f"the artifact store failed {action}", backend=BACKEND
        ) from S3StatusError(detail)
    raise errors.BackendError(
        f"the artifact store refused {action}", backend=BACKEND, detail=detail, backend_code=status
    ) from S3StatusError(detail)


def _normalize_endpoint(endpoint: str) -> str:
    # MINIO_ENDPOINT is often given MinIO-style as `host:port`; that means plain http.
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host or parsed.query:
        raise ValueError(f"artifact store endpoint must be an http(s) URL, got {endpoint!r}")
    return url.rstrip("/")


class S3ArtifactStore:
    """Artifacts in one S3 bucket, path-style. Build it with `open_s3_store`."""

    backend_name = BACKEND

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        endpoint: str,
        credentials: s3proto.Credentials,
        bucket: str,
        hash_limiter: anyio.CapacityLimiter,
    ) -> None:
        self._client = client
        self._endpoint = endpoint
        self._credentials = credentials
        self._bucket = bucket
        self._hash_limiter = hash_limiter

    @property
    def bucket(self) -> str:
        return self._bucket

    def _url(self, key: str = "", query: Sequence[tuple[str, str]] = ()) -> str:
        return s3proto.object_url(self._endpoint, self._bucket, key, query)

    def _signed_headers(self, method: str, url: str, body: bytes,
                        headers: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**(headers or {}), **s3proto.sign_request(
            method=method,
            url=url,
            headers=headers or {},
            payload_sha256=hashlib.sha256(body).hexdigest(),
            credentials=self._credentials,
            now=datetime.now(UTC),
        )}

    async def _send(
        self, method: str, url: str, *, body: bytes = b"", action: str,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[httpx.Response, bytes]:
        """One signed request; the caller holds the deadline (see `_backend_errors`)."""
        headers = self._signed_headers(method, url, body, headers)
        async with self._client.stream(method, url, headers=headers, content=body) as response:
            data = b"" if method == "HEAD" else await _read_bounded(response, MAX_RESPONSE_BYTES)
        return response, data

    def _presign(
        self, method: str, key: str, query: Sequence[tuple[str, str]], expires_s: int
    ) -> PresignedRequest:
        now = datetime.now(UTC).replace(microsecond=0)
        url = s3proto.presign_url(
            method=method,
            url=self._url(key, query),
            credentials=self._credentials,
            now=now,
            expires_s=expires_s,
        )
        return PresignedRequest(
            url=url, method=method, expires_at=now + timedelta(seconds=expires_s)
        )

    async def ping(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """A cheap authenticated request (HEAD bucket): credentials, bucket and server all work."""
        with _backend_errors("a bucket check", timeout_s):
            response, body = await self._send("HEAD", self._url(), action="a bucket check")
        _raise_for_status("a bucket check", response, body)

    async def ensure_bucket(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Create the bucket if it is missing; a no-op when it exists (also under a race)."""
        action = "bucket creation"
        with _backend_errors(action, timeout_s):
            response, body = await self._send("HEAD", self._url(), action=action)
            if response.status_code != 404:
                _raise_for_status(action, response, body)
                return
            create = b""
            if self._credentials.region != "us-east-1":
                create = (
                    f'<CreateBucketConfiguration xmlns="{s3proto.S3_XML_NAMESPACE}">'
                    f"<LocationConstraint>{self._credentials.region}</LocationConstraint>"
                    f"</CreateBucketConfiguration>"
                ).encode()
            response, body = await self._send("PUT", self._url(), body=create, action=action)
            if response.status_code == 409:
                # Another server created it between our HEAD and PUT (rclone says
                # BucketAlreadyExists, AWS BucketAlreadyOwnedByYou): check we can use it.
                response, body = await self._send("HEAD", self._url(), action=action)
        _raise_for_status(action, response, body)

    def presign_put(self, key: str, *, expires_s: int) -> PresignedRequest:
        return self._presign("PUT", s3proto.validate_artifact_key(key), (), expires_s)

    def presign_get(self, key: str, *, expires_s: int) -> PresignedRequest:
        return self._presign("GET", s3proto.validate_artifact_key(key), (), expires_s)

    async def create_multipart(self, key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
        url = self._url(s3proto.validate_artifact_key(key), [("uploads", "")])
        action = "multipart creation"
        with _backend_errors(action, timeout_s):
            response, body = await self._send("POST", url, action=action)
            _raise_for_status(action, response, body)
            return s3proto.parse_initiate_multipart(body)

    def presign_upload_part(
        self, key: str, upload_id: str, part_number: int, *, expires_s: int
    ) -> PresignedRequest:
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise errors.InvalidInput(
                f"part numbers must be within 1..{MAX_PART_NUMBER}", field="part_number"
            )
        if not upload_id:
            raise errors.InvalidInput("an upload id is required", field="upload_id")
        query = [("partNumber", str(part_number)), ("uploadId", upload_id)]
        return self._presign("PUT", s3proto.validate_artifact_key(key), query, expires_s)

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[tuple[int, str]],
        *,
        timeout_s: float = DEFAULT_COMPLETE_TIMEOUT_S,
    ) -> None:
        url = self._url(s3proto.validate_artifact_key(key), [("uploadId", upload_id)])
        payload = s3proto.build_complete_multipart(parts)
        action = "multipart completion"
        with _backend_errors(action, timeout_s):
            response, body = await self._send("POST", url, body=payload, action=action)
            _raise_for_status(action, response, body)
            # S3 may answer 200 and report the failure in the body.
            failure = s3proto.parse_error(body)
            if failure is not None:
                detail = f"HTTP 200 {failure.code}: {failure.message}"
                raise errors.BackendError(
                    f"the artifact store refused {action}", backend=BACKEND, detail=detail
                ) from S3StatusError(detail)
            s3proto.parse_complete_multipart(body)

    async def abort_multipart(
        self, key: str, upload_id: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        """Drop an upload and its parts; an unknown upload counts as already aborted."""
        url = self._url(s3proto.validate_artifact_key(key), [("uploadId", upload_id)])
        action = "multipart abort"
        with _backend_errors(action, timeout_s):
            response, body = await self._send("DELETE", url, action=action)
        if response.status_code == 404:
            return
        _raise_for_status(action, response, body)

    async def head_object(
        self, key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> ObjectInfo | None:
        url = self._url(s3proto.validate_artifact_key(key))
        action = "an object lookup"
        with _backend_errors(action, timeout_s):
            response, body = await self._send("HEAD", url, action=action)
        if response.status_code == 404:
            return None
        _raise_for_status(action, response, body)
        try:
            size_bytes = int(response.headers["content-length"])
        except (KeyError, ValueError) as exc:
            raise errors.BackendError(
                f"the artifact store gave no size for {action}", backend=BACKEND
            ) from exc
        return ObjectInfo(size_bytes=size_bytes, etag=response.headers.get("etag", ""))

    async def sha256_of(self, key: str, *, timeout_s: float = DEFAULT_HASH_TIMEOUT_S) -> str:
        """SHA-256 (hex) of the stored bytes, streamed: memory use stays ~CHUNK_BYTES."""
        url = self._url(s3proto.validate_artifact_key(key))
        action = "an object read"
        hasher = hashlib.sha256()
        with _backend_errors(action, timeout_s):
            headers = self._signed_headers("GET", url, b"")
            async with self._client.stream("GET", url, headers=headers) as response:
                if response.status_code == 404:
                    raise errors.NotFound("the artifact object does not exist")
                if not 200 <= response.status_code < 300:
                    body = await _read_bounded(response, MAX_RESPONSE_BYTES)
                    _raise_for_status(action, response, body)
                buffer = bytearray()
                # Raw bytes: a stored Content-Encoding must not be undone before hashing.
                async for chunk in response.aiter_raw():
                    buffer += chunk
                    if len(buffer) >= CHUNK_BYTES:
                        # hashlib releases the GIL: a worker thread keeps the loop responsive.
                        await anyio.to_thread.run_sync(
                            hasher.update, buffer, limiter=self._hash_limiter
                        )
                        buffer.clear()
                if buffer:
                    await anyio.to_thread.run_sync(
                        hasher.update, buffer, limiter=self._hash_limiter
                    )
        return hasher.hexdigest()

    async def delete_object(self, key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        url = self._url(s3proto.validate_artifact_key(key))
        action = "an object deletion"
        with _backend_errors(action, timeout_s):
            response, body = await self._send("DELETE", url, action=action)
        if response.status_code == 404:
            return
        _raise_for_status(action, response, body)

    async def copy_object(self, source_key: str, target_key: str, *,
                          timeout_s: float = DEFAULT_COMPLETE_TIMEOUT_S) -> bool:
        """CopyObject (server-side; S3 copies up to 5 GiB in one request)."""
        url = self._url(s3proto.validate_artifact_key(target_key))
        source = "/" + urllib.parse.quote(
            f"{self._bucket}/{s3proto.validate_artifact_key(source_key)}", safe="/-_.~")
        action = "an object copy"
        with _backend_errors(action, timeout_s):
            response, body = await self._send("PUT", url, action=action,
                                              headers={"x-amz-copy-source": source})
        if response.status_code == 404:
            return False
        _raise_for_status(action, response, body)
        # CopyObject may answer 200 and report its failure in the body.
        try:
            failed = s3proto.parse_error(body)
        except s3proto.MalformedS3Response:
            failed = None
        if failed is not None:
            raise errors.BackendUnavailable(f"the artifact store failed {action}",
                                            backend=BACKEND) from S3StatusError(
                f"{failed.code}: {failed.message}")
        return True


@asynccontextmanager
async def open_s3_store(
    *,
    endpoint: str,
    access_key: str,
    secret_key: str,
    bucket: str,
    region: str = "us-east-1",
    max_connections: int = 32,
) -> AsyncIterator[S3ArtifactStore]:
    """Yield an S3 store on a pooled httpx client; the client closes when the block exits.

    Does no I/O on entry: call `ensure_bucket` at start-up and `ping` for readiness.
    """
    if not _BUCKET_NAME.match(bucket):
        raise ValueError(f"not a valid S3 bucket name: {bucket!r}")
    if not access_key or not secret_key:
        raise ValueError("the artifact store needs an access key and a secret key")
    base = _normalize_endpoint(endpoint)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(DEFAULT_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        ),
        follow_redirects=False,
    )
    async with client:
        yield S3ArtifactStore(
            client=client,
            endpoint=base,
            credentials=s3proto.Credentials(access_key, secret_key, region),
            bucket=bucket,
            hash_limiter=anyio.CapacityLimiter(MAX_THREADS),
        )


# --- local directory: signed URLs (pure) --------------------------------------------------------


# --- local directory: the store -----------------------------------------------------------------


