"""`GET /api/v1/whoami`: the presented key as the key view holds it, answered with no backend.

Driven through the ASGI interface (no socket, no database): the route must answer from the
in-memory key view alone, which is what makes it the floor of an authenticated request
(`bench/floor.py`)."""

from __future__ import annotations

from typing import Any

import msgspec

from mlrun.server.edges.http.app import App, Router
from mlrun.server.edges.http.key_api import add_key_routes
from mlrun.server.ports.keys import Principal, UsableKey
from mlrun.server.usecases.auth import Authenticator, key_digest
from mlrun.server.usecases.keys import KeyManagement

BOOTSTRAP = "mlrun_test-bootstrap-" + "b" * 32
SCOPED = "mlrun_test-scoped-" + "s" * 32


def make_app() -> App:
    authenticator = Authenticator(bootstrap_key=BOOTSTRAP, disabled=False)
    authenticator.replace_keys([UsableKey(
        digest=key_digest(SCOPED),
        principal=Principal(key_id="k_scoped", scopes=frozenset({"write", "read"}),
                            project="vision"),
        expires_at_s=None)], loaded_from=authenticator.load_started())
    router = Router()
    # The key management use-case is never called by whoami: a directory-less stand-in.
    add_key_routes(router, KeyManagement.__new__(KeyManagement), authenticator)
    return App(router)


async def whoami(app: App, headers: list[tuple[bytes, bytes]]) -> tuple[int, Any]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": "/api/v1/whoami", "query_string": b"",
               "headers": headers, "client": ("127.0.0.1", 5000)}, receive, send)
    start, body = sent
    return start["status"], msgspec.json.decode(body["body"])


async def test_whoami_names_the_presented_key() -> None:
    app = make_app()
    status, body = await whoami(app, [(b"authorization", f"Bearer {SCOPED}".encode())])
    assert (status, body) == (200, {"key_id": "k_scoped", "scopes": ["read", "write"],
                                    "project": "vision"})
    status, body = await whoami(app, [(b"x-api-key", BOOTSTRAP.encode())])
    assert status == 200 and body["scopes"] == ["admin"] and body["project"] is None


async def test_whoami_refuses_a_missing_or_unknown_key() -> None:
    app = make_app()
    status, body = await whoami(app, [])
    assert (status, body["error"]["code"]) == (401, "missing_credentials")
    status, body = await whoami(app, [(b"authorization", b"Bearer mlrun_nope-" + b"x" * 32)])
    assert (status, body["error"]["code"]) == (401, "invalid_credentials")
