"""The web UI: `GET /` (the page), `GET /ui/{path}` (its scripts, styles and the vendored uPlot)
and `GET /ui/config.json` (what the page must know before it signs in).

Owns the serving of the static files in `ui_assets/` (shipped inside the package; no build step,
no CDN, no Node at run time) and the security headers of every UI answer: a strict
Content-Security-Policy (scripts, styles, images and fetches from this origin only; no inline
script or style, no framing, no plugins), `nosniff`, `no-referrer`. The page signs in with an
API key it keeps in `sessionStorage` and sends as `Authorization: Bearer` on every API call;
nothing here sees a key, and no key ever travels in a URL (README "Web UI").

Invariants: a path is answered only if it names a file of the asset table, which is read once
(in a worker thread, at the first request) from the package directory; a request path never
reaches the file system, so there is no traversal to get wrong. Every file is held with its
gzip form and a strong ETag; `If-None-Match` gets 304, `Accept-Encoding: gzip` the gzip form.

Must not import storage, pipelines or the use-cases: the only server state it shows is whether
authentication is disabled, handed in as a bool.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import msgspec

from mlrun.server.edges.http.app import Request, Response, Router, RouteSpec
from mlrun.server.errors import NotFound
from mlrun.wire.error_codes import ErrorCode

ASSETS_DIR: Final = Path(__file__).with_name("ui_assets")
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = (
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
)
_CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
# The page is revalidated on every load (cheap: a 304), so a new server version is picked up
# at once; the assets never outlive the page that names them.
_CACHE_CONTROL: Final = "no-cache"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    gzipped: bytes
    content_type: str
    etag: str


class UiConfig(msgspec.Struct, frozen=True):
    """What the page needs before signing in: with auth disabled it skips the sign-in form."""

    auth_disabled: bool


def load_assets(directory: Path) -> dict[str, Asset]:
    """Every servable file under `directory`, keyed by its path relative to it ('/' separated)."""
    assets: dict[str, Asset] = {}
    for path in sorted(directory.rglob("*")):
        content_type = _CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        digest = hashlib.sha256(body).hexdigest()[:32]
        assets[path.relative_to(directory).as_posix()] = Asset(
            body=body, gzipped=gzip.compress(body, compresslevel=9, mtime=0),
            content_type=content_type, etag=f'"{digest}"')
    return assets


def asset_response(asset: Asset, headers: Mapping[str, str]) -> Response:
    common = [*SECURITY_HEADERS, ("cache-control", _CACHE_CONTROL), ("etag", asset.etag),
              ("vary", "accept-encoding")]
    if asset.etag in (tag.strip() for tag in headers.get("if-none-match", "").split(",")):
        return Response(status=304, content_type=asset.content_type, headers=common)
    if "gzip" in headers.get("accept-encoding", ""):
        return Response(status=200, body=asset.gzipped, content_type=asset.content_type,
                        headers=[*common, ("content-encoding", "gzip")])
    return Response(status=200, body=asset.body, content_type=asset.content_type, headers=common)


def add_ui_routes(router: Router, *, auth_disabled: bool,
                  directory: Path = ASSETS_DIR) -> None:
    loaded: list[dict[str, Asset]] = []
    lock = anyio.Lock()
    config_body = msgspec.json.encode(UiConfig(auth_disabled=auth_disabled))

    async def assets() -> dict[str, Asset]:
        async with lock:
            if not loaded:
                loaded.append(await anyio.to_thread.run_sync(load_assets, directory))
        return loaded[0]

    async def page(request: Request) -> Response:
        return asset_response((await assets())["index.html"], request.headers)

    async def config(request: Request) -> Response:
        return Response(status=200, body=config_body,
                        headers=[*SECURITY_HEADERS, ("cache-control", "no-store")])

    async def asset(request: Request) -> Response:
        found = (await assets()).get(request.path_params["path"])
        if found is None:
            raise NotFound("no such UI file", code=ErrorCode.ROUTE_NOT_FOUND, field="path")
        return asset_response(found, request.headers)

    tags = ("ui",)
    router.add("GET", "/", page, RouteSpec(
        summary="The web UI (sign in with an API key)", scope=None, response=None,
        other_success_statuses=(304,), tags=tags))
    router.add("GET", "/ui/config.json", config, RouteSpec(
        summary="What the web UI needs before signing in", scope=None, response=UiConfig,
        tags=tags))
    router.add("GET", "/ui/{path}", asset, RouteSpec(
        summary="A static file of the web UI", scope=None, response=None,
        other_success_statuses=(304,), errors=(404,), tags=tags), path_tail=True)
