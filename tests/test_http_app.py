"""The ASGI app in isolation: routing, body limits, gzip, and the error contract.

Driven through the ASGI interface directly (no socket), so these run without any backend.
"""

from __future__ import annotations

import gzip
from typing import Any

import msgspec
import pytest

from mlrun.server.edges.http.app import App, Request, Response, Router, RouteSpec
from mlrun.server.errors import BackendError, Overloaded


async def call(app: App, method: str, path: str, body: bytes = b"",
               headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[str, str], Any]:
    sent: list[dict[str, Any]] = []
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": b"",
             "headers": headers or [], "client": ("127.0.0.1", 5000)}
    await app(scope, receive, send)
    start, body_message = sent
    response_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], response_headers, msgspec.json.decode(body_message["body"])


def make_app(max_body_bytes: int = 10_000) -> App:
    router = Router()

    async def echo(request: Request) -> Response:
        return Response.json({"len": len(request.body), "id": request.path_params.get("run_id")})

    async def busy(request: Request) -> Response:
        raise Overloaded("pipeline full", retry_after_s=3)

    async def broken(request: Request) -> Response:
        raise RuntimeError("psycopg: password authentication failed for user secret_user")

    async def backend(request: Request) -> Response:
        raise BackendError("query failed", backend="clickhouse", detail="Code: 62. Syntax error")

    spec = RouteSpec(summary="test route", scope=None, response=None)
    router.add("POST", "/runs/{run_id}/echo", echo, spec)
    router.add("GET", "/busy", busy, spec)
    router.add("GET", "/broken", broken, spec)
    router.add("GET", "/backend", backend, spec)
    return App(router, max_body_bytes=max_body_bytes)


async def test_path_parameters_and_body() -> None:
    status, _, body = await call(make_app(), "POST", "/runs/abc/echo", b"x" * 2500)
    assert status == 200
    assert body == {"len": 2500, "id": "abc"}


async def test_unknown_route_and_wrong_method() -> None:
    status, _, body = await call(make_app(), "GET", "/nope")
    assert status == 404 and body["error"]["code"] == "route_not_found"
    status, _, body = await call(make_app(), "GET", "/runs/abc/echo")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


async def test_oversized_body_is_413_by_length_header_and_by_streamed_size() -> None:
    app = make_app(max_body_bytes=1000)
    status, _, body = await call(app, "POST", "/runs/a/echo", b"x" * 5000,
                                 headers=[(b"content-length", b"5000")])
    assert status == 413 and body["error"] == {
        "code": "payload_too_large", "message": "request body exceeds 1000 bytes", "field": "body"}
    status, _, _ = await call(app, "POST", "/runs/a/echo", b"x" * 5000)  # no length header
    assert status == 413


async def test_gzip_body_is_decoded_and_a_gzip_bomb_is_413() -> None:
    app = make_app(max_body_bytes=10_000)
    payload = b"y" * 9000
    status, _, body = await call(app, "POST", "/runs/a/echo", gzip.compress(payload),
                                 headers=[(b"content-encoding", b"gzip")])
    assert status == 200 and body["len"] == 9000
    bomb = gzip.compress(b"\0" * 5_000_000)  # ~5 KB on the wire, 5 MB inflated
    assert len(bomb) < 10_000
    status, _, body = await call(app, "POST", "/runs/a/echo", bomb,
                                 headers=[(b"content-encoding", b"gzip")])
    assert status == 413 and body["error"]["code"] == "payload_too_large"


async def test_corrupt_gzip_and_unknown_encoding_are_400() -> None:
    status, _, body = await call(make_app(), "POST", "/runs/a/echo", b"not gzip",
                                 headers=[(b"content-encoding", b"gzip")])
    assert status == 400 and body["error"]["code"] == "invalid_gzip"
    status, _, body = await call(make_app(), "POST", "/runs/a/echo", b"x",
                                 headers=[(b"content-encoding", b"br")])
    assert status == 400 and body["error"]["field"] == "content-encoding"


async def test_overloaded_renders_429_with_retry_after() -> None:
    status, headers, body = await call(make_app(), "GET", "/busy")
    assert status == 429
    assert headers["retry-after"] == "3"
    assert body["error"]["code"] == "overloaded"


@pytest.mark.parametrize("path", ["/broken", "/backend"])
async def test_internal_errors_leak_no_driver_text(path: str) -> None:
    status, _, body = await call(make_app(), "GET", path)
    assert status == 500
    text = msgspec.json.encode(body).decode()
    assert "psycopg" not in text and "secret_user" not in text and "Code: 62" not in text
    assert body["error"]["code"] in ("internal", "backend_error")


async def test_request_head_over_16_kib_is_431_and_just_under_is_served() -> None:
    app = make_app()
    big = [(b"x-padding", b"p" * (16 * 1024))]
    status, _, body = await call(app, "POST", "/runs/a/echo", b"{}", headers=big)
    assert status == 431 and body["error"]["code"] == "headers_too_large"
    fits = [(b"x-padding", b"p" * (15 * 1024))]
    status, _, _ = await call(app, "POST", "/runs/a/echo", b"{}", headers=fits)
    assert status == 200
