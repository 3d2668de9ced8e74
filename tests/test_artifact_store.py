"""Artifact stores against real backends: `rclone serve s3` (real SigV4 checks, started by the
`s3_server` session fixture) and the local-directory store.

What a client does is done for real: uploads and downloads go through the presigned URLs with
httpx. For the local store there is no HTTP edge yet, so the tests do what the edge will do:
verify the URL with `verify_local_signature`, then call `write_*_from` / `open_object_reader`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import anyio.abc
import httpx
import pytest

from mlrun.server import errors
from mlrun.server.ports.objects import MIN_PART_BYTES, ArtifactStore, PresignedRequest
from mlrun.server.protocols import s3 as s3proto
from mlrun.server.storage.objects.local import LocalArtifactStore, open_local_store
from mlrun.server.storage.objects.local_signing import (
    LOCAL_ROUTE_PREFIX,
    LocalGrant,
    verify_local_signature,
)
from mlrun.server.storage.objects.s3 import S3ArtifactStore, open_s3_store

from backends.s3 import S3Server

SIGNING_SECRET = b"k" * 32
MiB = 1024 * 1024
ODD_KEY = "dir with space/ü 日本+%!(x)~'*$.bin"

pytestmark = pytest.mark.timeout(120)


def _bucket() -> str:
    return f"mlrun-test-{secrets.token_hex(6)}"


@pytest.fixture
async def s3_store(s3_server: S3Server) -> AsyncIterator[S3ArtifactStore]:
    async with open_s3_store(
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        bucket=_bucket(),
    ) as store:
        with anyio.fail_after(10):
            await store.ensure_bucket(timeout_s=5)
        yield store


@pytest.fixture
async def local_store(tmp_path: Path) -> AsyncIterator[LocalArtifactStore]:
    async with open_local_store(
        root=tmp_path / "artifacts",
        public_base_url="http://127.0.0.1:3001/",
        signing_secret=SIGNING_SECRET,
    ) as store:
        yield store


@pytest.fixture(params=["s3", "local"])
async def store(
    request: pytest.FixtureRequest, s3_server: S3Server, tmp_path: Path
) -> AsyncIterator[ArtifactStore]:
    """Either store, behind the protocol the use-cases see."""
    if request.param == "s3":
        async with open_s3_store(
            endpoint=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            bucket=_bucket(),
        ) as s3_store:
            with anyio.fail_after(10):
                await s3_store.ensure_bucket(timeout_s=5)
            yield s3_store
    else:
        async with open_local_store(
            root=tmp_path / "artifacts",
            public_base_url="http://127.0.0.1:3001",
            signing_secret=SIGNING_SECRET,
        ) as local:
            yield local


async def _chunks(data: bytes, chunk_bytes: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), chunk_bytes):
        yield data[start : start + chunk_bytes]


def _local_request(presigned: PresignedRequest) -> tuple[str, dict[str, str]]:
    """What the HTTP edge gets: the decoded key after the route prefix, and the query."""
    parts = urlsplit(presigned.url)
    assert parts.path.startswith(LOCAL_ROUTE_PREFIX)
    key = unquote(parts.path[len(LOCAL_ROUTE_PREFIX) :])
    return key, dict(parse_qsl(parts.query, keep_blank_values=True))


def _grant(presigned: PresignedRequest, *, method: str | None = None) -> LocalGrant | None:
    key, query = _local_request(presigned)
    return verify_local_signature(
        signing_secret=SIGNING_SECRET,
        method=method or presigned.method,
        key=key,
        query=query,
        now_s=presigned.expires_at.timestamp() - 1,
    )


async def _upload(store: ArtifactStore, client: httpx.AsyncClient, key: str, data: bytes) -> None:
    """Upload through a presigned PUT, as a client (or, for local, the edge) would."""
    presigned = store.presign_put(key, expires_s=300)
    if isinstance(store, LocalArtifactStore):
        grant = _grant(presigned)
        assert grant is not None and grant.key == key
        await store.write_object_from(grant.key, _chunks(data), max_bytes=len(data))
    else:
        response = await client.put(presigned.url, content=data, headers=presigned.headers)
        assert response.status_code == 200, response.text


async def _download(store: ArtifactStore, client: httpx.AsyncClient, key: str) -> bytes:
    presigned = store.presign_get(key, expires_s=300)
    if isinstance(store, LocalArtifactStore):
        grant = _grant(presigned)
        assert grant is not None and grant.method == "GET"
        body = bytearray()
        async with store.open_object_reader(grant.key) as reader:
            async for chunk in reader.chunks():
                body += chunk
            assert reader.size_bytes == len(body)
        return bytes(body)
    response = await client.get(presigned.url)
    assert response.status_code == 200, response.text
    return response.content


# --- both stores ---------------------------------------------------------------------------------


async def test_presigned_put_then_get_is_byte_identical(store: ArtifactStore) -> None:
    data = os.urandom(3 * MiB + 17)
    with anyio.fail_after(60):
        async with httpx.AsyncClient(timeout=30) as client:
            await _upload(store, client, ODD_KEY, data)
            assert await _download(store, client, ODD_KEY) == data
        info = await store.head_object(ODD_KEY)
        assert info is not None and info.size_bytes == len(data) and info.etag
        assert await store.sha256_of(ODD_KEY) == hashlib.sha256(data).hexdigest()


async def test_missing_objects(store: ArtifactStore) -> None:
    with anyio.fail_after(20):
        assert await store.head_object("no/such/object") is None
        with pytest.raises(errors.NotFound):
            await store.sha256_of("no/such/object")
        await store.delete_object("no/such/object")  # idempotent


async def test_delete_object(store: ArtifactStore) -> None:
    with anyio.fail_after(30):
        async with httpx.AsyncClient(timeout=30) as client:
            await _upload(store, client, "a/b/c.txt", b"payload")
        assert await store.head_object("a/b/c.txt") is not None
        await store.delete_object("a/b/c.txt")
        assert await store.head_object("a/b/c.txt") is None
        await store.delete_object("a/b/c.txt")


async def test_ensure_bucket_is_idempotent_and_ping_answers(store: ArtifactStore) -> None:
    with anyio.fail_after(20):
        await store.ensure_bucket()
        await store.ensure_bucket()
        await store.ping()
        assert store.backend_name == "artifacts"


@pytest.mark.parametrize("key", ["../escape", "/abs/path", "a/../../b", "nul\x00", "x" * 1025])
async def test_unsafe_keys_are_refused_by_every_method(store: ArtifactStore, key: str) -> None:
    with pytest.raises(errors.InvalidInput) as caught:
        store.presign_put(key, expires_s=60)
    assert caught.value.field == "name"
    with pytest.raises(errors.InvalidInput) as caught:
        store.presign_get(key, expires_s=60)
    assert caught.value.field == "name"
    with pytest.raises(errors.InvalidInput) as caught:
        store.presign_upload_part(key, "0" * 32, 1, expires_s=60)
    assert caught.value.field == "name"
    with anyio.fail_after(20):
        with pytest.raises(errors.InvalidInput):
            await store.head_object(key)
        with pytest.raises(errors.InvalidInput):
            await store.sha256_of(key)
        with pytest.raises(errors.InvalidInput):
            await store.delete_object(key)
        with pytest.raises(errors.InvalidInput):
            await store.create_multipart(key)
        with pytest.raises(errors.InvalidInput):
            await store.complete_multipart(key, "0" * 32, [(1, '"x"')])
        with pytest.raises(errors.InvalidInput):
            await store.abort_multipart(key, "0" * 32)


async def test_multipart_upload_of_three_parts(store: ArtifactStore) -> None:
    parts_data = [os.urandom(MIN_PART_BYTES), os.urandom(MIN_PART_BYTES), os.urandom(MiB + 123)]
    key = "checkpoints/model final.bin"
    with anyio.fail_after(90):
        upload_id = await store.create_multipart(key)
        etags: list[tuple[int, str]] = []
        async with httpx.AsyncClient(timeout=30) as client:
            # Uploaded out of order on purpose: the part number, not arrival, sets the order.
            for number in (3, 1, 2):
                presigned = store.presign_upload_part(key, upload_id, number, expires_s=300)
                data = parts_data[number - 1]
                if isinstance(store, LocalArtifactStore):
                    grant = _grant(presigned)
                    assert grant is not None
                    assert (grant.upload_id, grant.part_number) == (upload_id, number)
                    etag = await store.write_part_from(
                        grant.key, upload_id, number, _chunks(data), max_bytes=len(data)
                    )
                else:
                    response = await client.put(presigned.url, content=data)
                    assert response.status_code == 200, response.text
                    etag = response.headers["etag"]
                etags.append((number, etag))
            await store.complete_multipart(key, upload_id, etags)
            whole = b"".join(parts_data)
            assert await _download(store, client, key) == whole
        info = await store.head_object(key)
        assert info is not None and info.size_bytes == len(whole)
        assert await store.sha256_of(key) == hashlib.sha256(whole).hexdigest()


async def test_abort_multipart(store: ArtifactStore) -> None:
    key = "aborted.bin"
    with anyio.fail_after(30):
        upload_id = await store.create_multipart(key)
        await store.abort_multipart(key, upload_id)
        await store.abort_multipart(key, upload_id)  # idempotent
        with pytest.raises((errors.BackendError, errors.NotFound)):
            await store.complete_multipart(key, upload_id, [(1, '"' + "0" * 64 + '"')])
        assert await store.head_object(key) is None


# --- S3 (rclone) ---------------------------------------------------------------------------------


async def test_tampered_presigned_urls_are_refused_by_s3(s3_store: S3ArtifactStore) -> None:
    with anyio.fail_after(30):
        async with httpx.AsyncClient(timeout=10) as client:
            await _upload(s3_store, client, "secret.txt", b"secret")
            url = s3_store.presign_get("secret.txt", expires_s=300).url
            assert (await client.get(url)).status_code == 200
            last = url[-1]
            tampered = {
                "key": url.replace("/secret.txt?", "/secreT.txt?"),
                "signature": url[:-1] + ("0" if last != "0" else "1"),
                "expiry": url.replace("X-Amz-Expires=300", "X-Amz-Expires=301"),
            }
            for what, bad_url in tampered.items():
                response = await client.get(bad_url)
                assert response.status_code == 403, what
                error = s3proto.parse_error(response.content)
                assert error is not None and error.code == "SignatureDoesNotMatch", what
            # A GET URL does not allow a PUT.
            response = await client.put(url, content=b"overwrite")
            assert response.status_code == 403
        assert await s3_store.sha256_of("secret.txt") == hashlib.sha256(b"secret").hexdigest()


async def test_expired_presigned_url_is_refused_by_s3(s3_store: S3ArtifactStore) -> None:
    with anyio.fail_after(30):
        async with httpx.AsyncClient(timeout=10) as client:
            await _upload(s3_store, client, "short-lived.txt", b"x")
            presigned = s3_store.presign_get("short-lived.txt", expires_s=1)
            # X-Amz-Date has whole seconds: wait clearly past date + 1 s.
            await anyio.sleep(2.5)
            response = await client.get(presigned.url)
        # rclone answers 400 AccessDenied where AWS answers 403 AccessDenied.
        assert response.status_code in (400, 403)
        error = s3proto.parse_error(response.content)
        assert error is not None and error.code == "AccessDenied"


async def test_wrong_credentials_are_a_backend_error_without_backend_text(
    s3_server: S3Server,
) -> None:
    async with open_s3_store(
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key="not-the-secret",
        bucket=_bucket(),
    ) as store:
        with anyio.fail_after(20), pytest.raises(errors.BackendError) as caught:
            await store.create_multipart("x")
    assert caught.value.backend == "artifacts"
    assert caught.value.backend_code == 403
    assert "SignatureDoesNotMatch" in caught.value.detail
    assert "SignatureDoesNotMatch" not in caught.value.message


async def test_ping_before_the_bucket_exists_fails(s3_server: S3Server) -> None:
    async with open_s3_store(
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        bucket=_bucket(),
    ) as store:
        with anyio.fail_after(20):
            with pytest.raises(errors.BackendError):
                await store.ping()
            await store.ensure_bucket()
            await store.ping()


async def test_ensure_bucket_from_two_stores_at_once(s3_server: S3Server) -> None:
    bucket = _bucket()
    async with (
        open_s3_store(
            endpoint=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            bucket=bucket,
        ) as first,
        open_s3_store(
            endpoint=s3_server.endpoint.removeprefix("http://"),  # MinIO-style host:port
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            bucket=bucket,
        ) as second,
    ):
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                for store in (first, second, first):
                    group.start_soon(store.ensure_bucket)
            await first.ping()
            await second.ping()


async def test_ping_fails_fast_when_s3_is_down_and_recovers(
    s3_server: S3Server, s3_store: S3ArtifactStore
) -> None:
    with anyio.fail_after(10):
        await s3_store.ping()
    await anyio.to_thread.run_sync(s3_server.stop)
    try:
        with anyio.fail_after(10):
            with pytest.raises(errors.BackendUnavailable) as caught:
                await s3_store.ping(timeout_s=5)
        assert caught.value.backend == "artifacts"
        assert caught.value.retryable
        with anyio.fail_after(10), pytest.raises(errors.BackendUnavailable):
            await s3_store.head_object("anything", timeout_s=5)
    finally:
        await anyio.to_thread.run_sync(s3_server.start)
    # The same store (same connection pool) works again, without being reopened.
    with anyio.fail_after(10):
        await s3_store.ping()
        assert await s3_store.head_object("anything") is None


async def test_a_stalled_s3_is_a_backend_timeout(s3_server: S3Server) -> None:
    # A listener that accepts and never answers: what a frozen server looks like.
    with anyio.fail_after(20):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        held: list[anyio.abc.SocketStream] = []

        async def hold(stream: anyio.abc.SocketStream) -> None:
            held.append(stream)
            await anyio.sleep_forever()

        async with anyio.create_task_group() as group:
            group.start_soon(listener.serve, hold)
            async with open_s3_store(
                endpoint=f"http://127.0.0.1:{port}",
                access_key=s3_server.access_key,
                secret_key=s3_server.secret_key,
                bucket="stalled",
            ) as store:
                with pytest.raises(errors.BackendTimeout) as caught:
                    await store.ping(timeout_s=0.5)
            assert caught.value.backend == "artifacts"
            group.cancel_scope.cancel()
        await listener.aclose()


# --- local store ---------------------------------------------------------------------------------


async def test_local_signatures_refuse_tampering_and_expiry(
    local_store: LocalArtifactStore,
) -> None:
    presigned = local_store.presign_put("runs/r1/model.bin", expires_s=60)
    key, query = _local_request(presigned)
    assert presigned.url.startswith("http://127.0.0.1:3001/artifacts/local/runs/r1/model.bin?")
    expires_at_s = int(query["expires"])
    assert expires_at_s == int(presigned.expires_at.timestamp())

    def verify(
        *,
        method: str = "PUT",
        key: str = key,
        query: dict[str, str] = query,
        now_s: float | None = None,
    ) -> LocalGrant | None:
        return verify_local_signature(
            signing_secret=SIGNING_SECRET,
            method=method,
            key=key,
            query=query,
            now_s=expires_at_s - 30 if now_s is None else now_s,
        )

    grant = verify()
    assert grant == LocalGrant("PUT", key, expires_at_s)
    assert verify(now_s=expires_at_s) is not None  # valid through its last second
    assert verify(now_s=expires_at_s + 1) is None  # expired
    assert verify(method="GET") is None
    assert verify(key="runs/r1/model.bim") is None
    assert verify(key="../runs/r1/model.bin") is None
    assert verify(query={**query, "expires": str(expires_at_s + 3600)}) is None
    flipped = ("0" if query["signature"][0] != "0" else "1") + query["signature"][1:]
    assert verify(query={**query, "signature": flipped}) is None
    assert verify(query={**query, "signature": query["signature"].upper()}) is None
    assert verify(query={k: v for k, v in query.items() if k != "signature"}) is None
    assert verify(query={**query, "expires": "-1"}) is None
    # A plain PUT URL cannot be turned into a part upload.
    part = {**query, "upload_id": "0" * 32, "part_number": "1"}
    assert verify(query=part) is None
    other_secret = verify_local_signature(
        signing_secret=b"x" * 32, method="PUT", key=key, query=query, now_s=expires_at_s - 30
    )
    assert other_secret is None


async def test_local_part_signatures_bind_upload_and_part(local_store: LocalArtifactStore) -> None:
    with anyio.fail_after(10):
        upload_id = await local_store.create_multipart("big.bin")
    presigned = local_store.presign_upload_part("big.bin", upload_id, 2, expires_s=60)
    key, query = _local_request(presigned)
    now_s = int(query["expires"]) - 10

    def verify(q: dict[str, str]) -> LocalGrant | None:
        return verify_local_signature(
            signing_secret=SIGNING_SECRET, method="PUT", key=key, query=q, now_s=now_s
        )

    assert verify(query) == LocalGrant("PUT", key, int(query["expires"]), upload_id, 2)
    assert verify({**query, "part_number": "3"}) is None
    assert verify({**query, "upload_id": "f" * 32}) is None
    assert verify({**query, "upload_id": upload_id + "\n"}) is None
    assert verify({k: v for k, v in query.items() if k != "part_number"}) is None


async def test_local_expired_url_after_waiting(local_store: LocalArtifactStore) -> None:
    presigned = local_store.presign_get("x.bin", expires_s=1)
    key, query = _local_request(presigned)
    await anyio.sleep(2.1)
    assert (
        verify_local_signature(
            signing_secret=SIGNING_SECRET, method="GET", key=key, query=query, now_s=time.time()
        )
        is None
    )


async def test_local_write_beyond_max_bytes_leaves_nothing(
    local_store: LocalArtifactStore, tmp_path: Path
) -> None:
    with anyio.fail_after(20):
        with pytest.raises(errors.PayloadTooLarge):
            await local_store.write_object_from("big.bin", _chunks(b"x" * 5000), max_bytes=4999)
        assert await local_store.head_object("big.bin") is None
    assert list((tmp_path / "artifacts" / "tmp").iterdir()) == []


async def test_local_write_cancelled_midway_leaves_nothing(
    local_store: LocalArtifactStore, tmp_path: Path
) -> None:
    started = anyio.Event()

    async def slow_chunks() -> AsyncIterator[bytes]:
        yield b"a" * (2 * MiB)
        started.set()
        await anyio.sleep_forever()
        yield b"never"

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: local_store.write_object_from(
                    "partial.bin", slow_chunks(), max_bytes=10 * MiB
                )
            )
            await started.wait()
            group.cancel_scope.cancel()
        assert await local_store.head_object("partial.bin") is None
    assert list((tmp_path / "artifacts" / "tmp").iterdir()) == []


async def test_local_overwrite_and_path_conflicts(local_store: LocalArtifactStore) -> None:
    with anyio.fail_after(20):
        await local_store.write_object_from("a", _chunks(b"one"), max_bytes=10)
        await local_store.write_object_from("a", _chunks(b"two!"), max_bytes=10)
        assert await local_store.sha256_of("a") == hashlib.sha256(b"two!").hexdigest()
        with pytest.raises(errors.Conflict):
            await local_store.write_object_from("a/b", _chunks(b"x"), max_bytes=10)
        await local_store.write_object_from("d/e", _chunks(b"x"), max_bytes=10)
        with pytest.raises(errors.Conflict):
            await local_store.write_object_from("d", _chunks(b"x"), max_bytes=10)
        assert await local_store.head_object("d") is None
        # Deleting the only object under d/ removes the directory, so `d` becomes usable.
        await local_store.delete_object("d/e")
        await local_store.write_object_from("d", _chunks(b"now a file"), max_bytes=20)
        info = await local_store.head_object("d")
        assert info is not None and info.size_bytes == len(b"now a file")


async def test_local_store_never_resolves_outside_its_root(
    local_store: LocalArtifactStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"do not serve")
    # A symlink planted inside the root (the store never makes one) must not be followed.
    (tmp_path / "artifacts" / "objects" / "link").symlink_to(outside)
    with anyio.fail_after(20):
        with pytest.raises(errors.InvalidInput):
            await local_store.sha256_of("link/secret.txt")
        with pytest.raises(errors.InvalidInput):
            async with local_store.open_object_reader("link/secret.txt"):
                pass
        with pytest.raises(errors.InvalidInput):
            await local_store.write_object_from("link/new.txt", _chunks(b"x"), max_bytes=10)
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


async def test_local_multipart_refusals(local_store: LocalArtifactStore) -> None:
    key = "parts.bin"
    with anyio.fail_after(30):
        upload_id = await local_store.create_multipart(key)
        small = await local_store.write_part_from(
            key, upload_id, 1, _chunks(b"s" * 10), max_bytes=MiB
        )
        last = await local_store.write_part_from(
            key, upload_id, 2, _chunks(b"t" * 10), max_bytes=MiB
        )
        # Like AWS and MinIO (not rclone): only the last part may be under 5 MiB.
        with pytest.raises(errors.InvalidInput, match="smaller"):
            await local_store.complete_multipart(key, upload_id, [(1, small), (2, last)])
        with pytest.raises(errors.InvalidInput, match="ETag"):
            await local_store.complete_multipart(key, upload_id, [(2, small)])
        # The upload belongs to its key.
        with pytest.raises(errors.NotFound):
            await local_store.write_part_from("other.bin", upload_id, 3, _chunks(b"x"), max_bytes=9)
        with pytest.raises(errors.NotFound):
            await local_store.complete_multipart("other.bin", upload_id, [(2, last)])
        # A single (last) part is fine whatever its size.
        await local_store.complete_multipart(key, upload_id, [(2, last)])
        assert await local_store.sha256_of(key) == hashlib.sha256(b"t" * 10).hexdigest()
        with pytest.raises(errors.NotFound):
            await local_store.write_part_from(key, upload_id, 1, _chunks(b"x"), max_bytes=9)


async def test_local_ping_fails_when_the_directory_is_gone(
    local_store: LocalArtifactStore, tmp_path: Path
) -> None:
    with anyio.fail_after(10):
        await local_store.ping()
        (tmp_path / "artifacts" / "uploads").rmdir()
        with pytest.raises(errors.BackendUnavailable):
            await local_store.ping()
        await local_store.ensure_bucket()
        await local_store.ping()


async def test_local_store_refuses_a_short_signing_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        async with open_local_store(
            root=tmp_path, public_base_url="http://x", signing_secret=b"short"
        ):
            pass
