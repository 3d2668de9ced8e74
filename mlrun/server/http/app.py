"""The ASGI application: lifespan, routing, bounded body reading and error rendering.

Owns: the translation between ASGI messages and `Request`/`Response`, the route table, and
the one place where errors become HTTP responses. Every error body has the shape
`{"error": {"code": ..., "message": ..., "field": ...}}`; an `MlrunError` renders with its own
status and code (429 adds `Retry-After`), anything else is logged with its traceback and
rendered as a bare 500 `internal` with no driver text.

Invariants: a request body is never held beyond `max_body_bytes` (413 `payload_too_large`),
before or after gzip decoding (a small gzip bomb cannot inflate past the cap). Handlers get the
whole, decoded body as bytes.

Must not import storage drivers or hypercorn: the app is served by whichever backend
`mlrun.__main__` picks.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import msgspec

from mlrun.server.errors import InvalidInput, MlrunError, NotFound, Overloaded, PayloadTooLarge

logger = logging.getLogger("mlrun.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

_json_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]
    query: Mapping[str, list[str]]
    body: bytes
    path_params: dict[str, str] = field(default_factory=dict)
    client_host: str | None = None

    def query_one(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, payload: Any, status: int = 200) -> Response:
        return cls(status=status, body=_json_encoder.encode(payload))


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """What a route promises, for /openapi.json: rendered, never re-declared by hand.

    `scope` None means public (no API key). `errors` lists every non-2xx status the route can
    answer besides the ones every route may give (413 body too large, 500, 503)."""

    summary: str
    scope: str | None
    response: type[Any] | None
    request: type[Any] | None = None
    query: type[Any] | None = None
    success_status: int = 200
    other_success_statuses: tuple[int, ...] = ()
    errors: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    template: str
    handler: Handler
    pattern: re.Pattern[str]
    spec: RouteSpec


def _compile(template: str) -> re.Pattern[str]:
    # `{name}` matches one path segment; everything else is literal.
    parts = re.split(r"(\{[a-z_]+\})", template)
    regex = "".join(
        f"(?P<{part[1:-1]}>[^/]+)" if part.startswith("{") else re.escape(part) for part in parts
    )
    return re.compile(f"^{regex}$")


class Router:
    def __init__(self) -> None:
        self._routes: list[Route] = []

    def add(self, method: str, template: str, handler: Handler, spec: RouteSpec) -> None:
        self._routes.append(Route(method, template, handler, _compile(template), spec))

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self._routes)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        path_matched = False
        for route in self._routes:
            found = route.pattern.match(path)
            if found is None:
                continue
            path_matched = True
            if route.method == method:
                return route, found.groupdict()
        if path_matched:
            raise MethodNotAllowed(f"method {method} is not allowed on {path}")
        raise NotFound(f"no route for {path}", code="route_not_found")


class MethodNotAllowed(MlrunError):
    http_status = 405
    default_code = "method_not_allowed"


def error_body(exc: MlrunError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message, "field": exc.field}}


def error_response(exc: MlrunError) -> Response:
    response = Response.json(error_body(exc), status=exc.http_status)
    if isinstance(exc, Overloaded):
        response.headers.append(("retry-after", str(exc.retry_after_s)))
    return response


class App:
    """A raw ASGI application over a `Router`."""

    def __init__(self, router: Router, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.router = router
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websocket: not served; returning closes it.

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        # Storage is opened by the supervisor before the listener starts, so there is nothing
        # to do here; hypercorn refuses to start an app that ignores lifespan messages.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        try:
            route, path_params = self.router.match(method, path)
            headers = {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in scope["headers"]
            }
            body = await self._read_body(receive, headers)
            client = scope.get("client")
            request = Request(
                method=method,
                path=path,
                headers=headers,
                query=parse_qs(scope.get("query_string", b"").decode("latin-1")),
                body=body,
                path_params=path_params,
                client_host=client[0] if client else None,
            )
            response = await route.handler(request)
        except MlrunError as exc:
            if exc.http_status >= 500:
                logger.warning("%s %s -> %s %s", method, path, exc.http_status, exc.code,
                               exc_info=exc.__cause__ is not None)
            response = error_response(exc)
        except Exception:
            logger.exception("unhandled error in %s %s", method, path)
            response = error_response(MlrunError("internal server error"))
        await self._send(send, response)

    async def _read_body(self, receive: Receive, headers: Mapping[str, str]) -> bytes:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(f"request body exceeds {self.max_body_bytes} bytes", field="body")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(
                    f"request body exceeds {self.max_body_bytes} bytes", field="body"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding == "gzip":
            return self._gunzip(body)
        if encoding not in ("identity", ""):
            raise InvalidInput(
                f"unsupported content-encoding {encoding!r} (use gzip or none)",
                code="unsupported_encoding",
                field="content-encoding",
            )
        return body

    def _gunzip(self, body: bytes) -> bytes:
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            data = decompressor.decompress(body, self.max_body_bytes + 1)
        except zlib.error:
            raise InvalidInput(
                "request body is not valid gzip", code="invalid_gzip", field="body"
            ) from None
        if len(data) > self.max_body_bytes or decompressor.unconsumed_tail:
            raise PayloadTooLarge(
                f"decompressed request body exceeds {self.max_body_bytes} bytes", field="body"
            )
        if not decompressor.eof:
            raise InvalidInput("request body is truncated gzip", code="invalid_gzip", field="body")
        return data

    @staticmethod
    async def _send(send: Send, response: Response) -> None:
        headers = [
            (b"content-type", response.content_type.encode("latin-1")),
            (b"content-length", str(len(response.body)).encode("latin-1")),
        ]
        headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers)
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
