"""The local artifact store's signed routes and the App's streaming, driven through the ASGI
interface (no socket) on a real local store in a temp dir: streamed uploads and downloads,
disconnects in the middle of either, refusals before anything is read."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import anyio.lowlevel
import msgspec
import pytest

from mlrun.server.edges.http.app import App, Router
from mlrun.server.edges.http.artifact_api import add_local_store_routes
from mlrun.server.ports.objects import CHUNK_BYTES, PresignedRequest
from mlrun.server.storage.objects.local import LocalArtifactStore, open_local_store

pytestmark = pytest.mark.timeout(60)

SECRET = b"s" * 32
KEY = "runs/r1/0123/dir with space/model ü.bin"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalArtifactStore]:
    async with open_local_store(root=tmp_path / "artifacts", public_base_url="http://test",
                                signing_secret=SECRET) as opened:
        yield opened


@pytest.fixture
def app(store: LocalArtifactStore) -> App:
    router = Router()
    add_local_store_routes(router, store, signing_secret=SECRET)
    return App(router, max_body_bytes=1024)  # far below the uploads: streaming must bypass it


class Exchange:
    """One ASGI request: body chunks to deliver (then, optionally, a disconnect)."""

    def __init__(self, chunks: list[bytes], *, disconnect_after: bool = False,
                 disconnect_after_sends: int | None = None) -> None:
        self.messages: list[dict[str, Any]] = [
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1
             or disconnect_after}
            for i, chunk in enumerate(chunks)
        ] or [{"type": "http.request", "body": b"", "more_body": disconnect_after}]
        if disconnect_after:
            self.messages.append({"type": "http.disconnect"})
        self.sent: list[MutableMapping[str, Any]] = []
        self.disconnected = anyio.Event()
        self.disconnect_after_sends = disconnect_after_sends

    async def receive(self) -> MutableMapping[str, Any]:
        if self.messages:
            return self.messages.pop(0)
        await self.disconnected.wait()  # a real server answers http.disconnect only then
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)
        if self.disconnect_after_sends is not None and len(self.sent) >= \
                self.disconnect_after_sends:
            self.disconnected.set()
        await anyio.lowlevel.checkpoint()

    @property
    def status(self) -> int:
        status: int = self.sent[0]["status"]
        return status

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    def error_code(self) -> str:
        code: str = msgspec.json.decode(self.body)["error"]["code"]
        return code


async def run(app: App, method: str, presigned_url: str, exchange: Exchange,
              headers: list[tuple[bytes, bytes]] | None = None) -> Exchange:
    parts = urlsplit(presigned_url)
    scope = {"type": "http", "method": method, "path": unquote(parts.path),
             "query_string": parts.query.encode(), "headers": headers or [],
             "client": ("127.0.0.1", 5000)}
    with anyio.fail_after(30):
        await app(scope, exchange.receive, exchange.send)
    return exchange


def chunked(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def leftovers(store: LocalArtifactStore) -> list[str]:
    return sorted(p.name for p in (store.root / "tmp").iterdir())


async def test_streamed_upload_and_download_round_trip(app: App, store: LocalArtifactStore) -> None:
    data = os.urandom(5 * CHUNK_BYTES + 123)
    put = store.presign_put(KEY, expires_s=60)
    uploaded = await run(app, "PUT", put.url, Exchange(chunked(data)))
    assert uploaded.status == 200, uploaded.body
    assert uploaded.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'

    get = store.presign_get(KEY, expires_s=60)
    downloaded = await run(app, "GET", get.url, Exchange([]))
    assert downloaded.status == 200
    assert downloaded.headers["content-length"] == str(len(data))
    assert downloaded.body == data
    assert len(downloaded.sent) > 3  # streamed in chunks, not one buffered body
    assert downloaded.sent[-1] == {"type": "http.response.body", "body": b""}


async def test_a_disconnect_mid_upload_stores_nothing(app: App, store: LocalArtifactStore) -> None:
    put = store.presign_put(KEY, expires_s=60)
    exchange = await run(app, "PUT", put.url,
                         Exchange(chunked(os.urandom(3 * CHUNK_BYTES)), disconnect_after=True))
    assert exchange.status == 400 and exchange.error_code() == "client_disconnected"
    assert await store.head_object(KEY) is None
    assert leftovers(store) == []


async def test_a_disconnect_mid_download_stops_reading(app: App, store: LocalArtifactStore) -> None:
    data = os.urandom(20 * CHUNK_BYTES)
    put = store.presign_put(KEY, expires_s=60)
    assert (await run(app, "PUT", put.url, Exchange(chunked(data)))).status == 200
    get = store.presign_get(KEY, expires_s=60)
    exchange = await run(app, "GET", get.url, Exchange([], disconnect_after_sends=3))
    assert exchange.status == 200
    assert 3 <= len(exchange.sent) < 10  # abandoned long before the 20 chunks
    assert exchange.sent[-1].get("more_body") is True  # never announced a complete body


async def test_multipart_parts_through_the_routes(app: App, store: LocalArtifactStore) -> None:
    data = os.urandom(6 * 1024 * 1024 + 5)
    upload_id = await store.create_multipart(KEY)
    part_size = 5 * 1024 * 1024
    parts = []
    for number, start in enumerate(range(0, len(data), part_size), start=1):
        presigned = store.presign_upload_part(KEY, upload_id, number, expires_s=60)
        exchange = await run(app, "PUT", presigned.url,
                             Exchange(chunked(data[start : start + part_size])))
        assert exchange.status == 200
        parts.append((number, exchange.headers["etag"]))
    await store.complete_multipart(KEY, upload_id, parts)
    get = store.presign_get(KEY, expires_s=60)
    assert (await run(app, "GET", get.url, Exchange([]))).body == data

    # A part URL of an upload that is gone is 404, and leaves nothing behind.
    late = store.presign_upload_part(KEY, upload_id, 1, expires_s=60)
    exchange = await run(app, "PUT", late.url, Exchange([b"x"]))
    assert exchange.status == 404 and leftovers(store) == []


def _with(presigned: PresignedRequest, old: str, new: str) -> str:
    assert old in presigned.url
    return presigned.url.replace(old, new, 1)


async def test_refusals_before_reading_the_body(app: App, store: LocalArtifactStore) -> None:
    put = store.presign_put(KEY, expires_s=60)
    signature = put.url.rsplit("signature=", 1)[1]
    cases = [
        ("tampered signature", _with(put, signature, "f" * 64), [], 403, "invalid_signature"),
        ("other key", _with(put, "model", "other"), [], 403, "invalid_signature"),
        ("no signature", put.url.split("?")[0], [], 403, "invalid_signature"),
        ("gzip body", put.url, [(b"content-encoding", b"gzip")], 400, "unsupported_encoding"),
        ("declared too large", put.url, [(b"content-length", str(6 << 30).encode())], 413,
         "payload_too_large"),
    ]
    for case, url, headers, status, code in cases:
        exchange = await run(app, "PUT", url, Exchange([b"evil"]), headers)
        assert (exchange.status, exchange.error_code()) == (status, code), case
    get = store.presign_get(KEY, expires_s=60)
    assert (await run(app, "PUT", get.url, Exchange([b"evil"]))).status == 403  # GET URL, PUT
    missing = await run(app, "GET", get.url, Exchange([]))
    assert (missing.status, missing.error_code()) == (404, "not_found")
    assert await store.head_object(KEY) is None and leftovers(store) == []
