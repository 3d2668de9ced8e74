"""The ASGI application: lifespan, routing, bounded body reading and error rendering.

Owns: the translation between ASGI messages and `Request`/`Response`, the route table, and
the one place where errors become HTTP responses. Every error body has the shape
`{"error": {"code": ..., "message": ..., "field": ...}}`; an `MlrunError` renders with its own
status and code (429 adds `Retry-After`), anything else is logged with its traceback and
rendered as a bare 500 `internal` with no driver text.

Invariants: a request body is never held beyond `max_body_bytes` (413 `payload_too_large`),
before or after gzip decoding (a small gzip bomb cannot inflate past the cap). Handlers get the
whole, decoded body as bytes.

Streaming, for bodies that must not be buffered (the local artifact store's uploads and
downloads, many GB): a route declared with `RouteSpec(stream_body=True)` gets its body as
`Request.body_stream`, an async iterator of the chunks as they arrive (identity encoding only;
the handler enforces its own size cap; a client that disconnects mid-body makes the iterator
raise `ClientDisconnected`, never end as if the body were complete). A handler may answer with
`Response.streaming(...)`: chunks are sent as the iterator yields them (the server's socket
pushes back, so memory stays bounded), the response is abandoned when the client disconnects,
and `on_close` runs in every case (shielded, bounded) to release what the stream holds open.
A route added with `path_tail=True` lets its last `{param}` match the rest of the path,
slashes included (object keys).

Must not import storage drivers or hypercorn: the app is served by whichever backend
`mlrun.__main__` picks.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
import zlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import anyio
import msgspec

from mlrun.server.edges.headers import joined_headers
from mlrun.server.errors import (
    HeadersTooLarge,
    InvalidInput,
    MlrunError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
)
from mlrun.server.telemetry import Telemetry
from mlrun.wire.error_codes import ErrorCode

logger = logging.getLogger("mlrun.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# How long a streamed response's `on_close` may take (it closes files or connections).
STREAM_CLOSE_TIMEOUT_S = 5.0

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
    # Only for routes declared with `stream_body=True` (then `body` is empty).
    body_stream: AsyncIterator[bytes] | None = None

    def query_one(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    # A streamed body (see `streaming`); `body` is then empty.
    stream: AsyncIterable[bytes] | None = None
    stream_length: int | None = None
    on_close: Callable[[], Awaitable[None]] | None = None

    @classmethod
    def json(cls, payload: Any, status: int = 200) -> Response:
        return cls(status=status, body=_json_encoder.encode(payload))

    @classmethod
    def streaming(
        cls,
        chunks: AsyncIterable[bytes],
        *,
        length_bytes: int | None,
        content_type: str = "application/octet-stream",
        on_close: Callable[[], Awaitable[None]] | None = None,
        status: int = 200,
    ) -> Response:
        """A response sent chunk by chunk; `on_close` always runs once it ended."""
        return cls(status=status, content_type=content_type, stream=chunks,
                   stream_length=length_bytes, on_close=on_close)


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """What a route promises, for /openapi.json: rendered, never re-declared by hand.

    `scope` None means public (no API key), "any" any valid key. `errors` lists every non-2xx
    status the route can answer besides the ones every route may give (413 body too large, 500,
    503)."""

    summary: str
    scope: str | None
    response: type[Any] | None
    request: type[Any] | None = None
    query: type[Any] | None = None
    success_status: int = 200
    other_success_statuses: tuple[int, ...] = ()
    errors: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
    # The handler reads the raw body from `Request.body_stream` (see the module docstring).
    stream_body: bool = False
    # False: left out of /openapi.json (a foreign API served as its own docs describe it).
    documented: bool = True


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    template: str
    handler: Handler
    pattern: re.Pattern[str]
    spec: RouteSpec


def _compile(template: str, *, path_tail: bool = False) -> re.Pattern[str]:
    # `{name}` matches one path segment; everything else is literal. With `path_tail`, the
    # last `{name}` matches the rest of the path, slashes included.
    parts = re.split(r"(\{[a-z_]+\})", template)
    last_param = max((i for i, part in enumerate(parts) if part.startswith("{")), default=-1)
    regex = "".join(
        (f"(?P<{part[1:-1]}>.+)" if path_tail and i == last_param else f"(?P<{part[1:-1]}>[^/]+)")
        if part.startswith("{") else re.escape(part)
        for i, part in enumerate(parts)
    )
    return re.compile(f"^{regex}$")


class Router:
    """Routes in the order added; the first whose template matches the path and whose method
    is the request's wins.

    A request for a path that IS a parameterless template (`/health`, `/api/v1/projects`, every
    MLflow route) is answered from a table built from that same rule on the first request
    after the last `add`: one dict probe instead of a regex per route (the MLflow routes come
    last, behind ~100 others)."""

    def __init__(self) -> None:
        self._routes: list[Route] = []
        self._literal: dict[tuple[str, str], Route] | None = None

    def add(
        self, method: str, template: str, handler: Handler, spec: RouteSpec,
        *, path_tail: bool = False,
    ) -> None:
        self._routes.append(
            Route(method, template, handler, _compile(template, path_tail=path_tail), spec))
        self._literal = None

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self._routes)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        literal = self._literal
        if literal is None:
            literal = self._literal = self._literal_table()
        route = literal.get((method, path))
        if route is not None:
            return route, {}
        return self._scan(method, path)

    def _literal_table(self) -> dict[tuple[str, str], Route]:
        """(method, path) -> what `_scan` answers for it, for every parameterless template."""
        table: dict[tuple[str, str], Route] = {}
        for route in self._routes:
            if "{" in route.template or (route.method, route.template) in table:
                continue
            try:
                found, params = self._scan(route.method, route.template)
            except MlrunError:
                continue
            if not params:
                table[(route.method, route.template)] = found
        return table

    def _scan(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
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
        raise NotFound(f"no route for {path}", code=ErrorCode.ROUTE_NOT_FOUND)


class MethodNotAllowed(MlrunError):
    http_status = 405
    default_code = ErrorCode.METHOD_NOT_ALLOWED


class ClientDisconnected(InvalidInput):
    """The client went away before its streamed body was complete (nobody sees the answer)."""

    default_code = ErrorCode.CLIENT_DISCONNECTED


def error_body(exc: MlrunError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message, "field": exc.field}}


def error_response(exc: MlrunError) -> Response:
    response = Response.json(error_body(exc), status=exc.http_status)
    if isinstance(exc, Overloaded):
        response.headers.append(("retry-after", str(exc.retry_after_s)))
    return response



# The request line and headers together (README: "a request line and headers beyond 16 KiB are
# refused"). hypercorn's h11 limit only bounds an *incomplete* head, so a head that arrives in
# one read of up to 64 KiB passes it; this is the documented limit, checked on every request.
MAX_REQUEST_HEAD_BYTES = 16 * 1024


def _check_header_size(scope: Scope) -> None:
    size = len(scope.get("raw_path") or scope["path"]) + len(scope.get("query_string", b""))
    size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
    if size > MAX_REQUEST_HEAD_BYTES:
        raise HeadersTooLarge(
            f"the request line and headers are {size} bytes; at most {MAX_REQUEST_HEAD_BYTES}",
            field="headers")


class App:
    """A raw ASGI application over a `Router`.

    Every response carries an `x-request-id` (the client's own, if it sent a sane one), which
    also tags the server's log lines about that request."""

    def __init__(
        self,
        router: Router,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.router = router
        self.max_body_bytes = max_body_bytes
        self.telemetry = telemetry or Telemetry()

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
        started = time.perf_counter()
        headers = joined_headers(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"])
        request_id = headers.get("x-request-id", "")
        if not _REQUEST_ID.match(request_id):
            request_id = secrets.token_hex(8)
        route_label = "unmatched"  # raw paths never become labels: cardinality stays bounded
        body_read = True
        try:
            _check_header_size(scope)
            route, path_params = self.router.match(method, path)
            route_label = route.template
            client = scope.get("client")
            request = Request(
                method=method,
                path=path,
                headers=headers,
                query=parse_qs(scope.get("query_string", b"").decode("latin-1")),
                body=b"",
                path_params=path_params,
                client_host=client[0] if client else None,
            )
            if route.spec.stream_body:
                body_read = False
                self._check_identity_encoding(headers)
                body_stream = _stream_body(receive)
                request.body_stream = body_stream
                async with contextlib.aclosing(body_stream):
                    response = await route.handler(request)
            else:
                request.body = await self._read_body(receive, headers)
                response = await route.handler(request)
        except MlrunError as exc:
            if exc.http_status >= 500:
                logger.warning("%s %s -> %s %s [request %s]", method, route_label,
                               exc.http_status, exc.code, request_id,
                               exc_info=exc.__cause__ is not None)
            response = error_response(exc)
        except Exception:
            logger.exception("unhandled error in %s %s [request %s]", method, route_label,
                             request_id)
            response = error_response(MlrunError("internal server error"))
        response.headers.append(("x-request-id", request_id))
        if response.stream is None:
            await self._send(send, response)
        else:
            await self._send_stream(send, receive if body_read else None, response, method,
                                    route_label)
        self.telemetry.observe_http(route_label, method, response.status,
                                    time.perf_counter() - started)

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
                code=ErrorCode.UNSUPPORTED_ENCODING,
                field="content-encoding",
            )
        return body

    @staticmethod
    def _check_identity_encoding(headers: Mapping[str, str]) -> None:
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            raise InvalidInput(
                f"unsupported content-encoding {encoding!r} (this route takes raw bytes)",
                code=ErrorCode.UNSUPPORTED_ENCODING,
                field="content-encoding",
            )

    def _gunzip(self, body: bytes) -> bytes:
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            data = decompressor.decompress(body, self.max_body_bytes + 1)
        except zlib.error:
            raise InvalidInput(
                "request body is not valid gzip", code=ErrorCode.INVALID_GZIP, field="body"
            ) from None
        if len(data) > self.max_body_bytes or decompressor.unconsumed_tail:
            raise PayloadTooLarge(
                f"decompressed request body exceeds {self.max_body_bytes} bytes", field="body"
            )
        if not decompressor.eof:
            raise InvalidInput("request body is truncated gzip",
                               code=ErrorCode.INVALID_GZIP, field="body")
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

    @staticmethod
    async def _send_stream(
        send: Send, receive: Receive | None, response: Response, method: str, route: str
    ) -> None:
        """Send a streamed response. `receive` (when the request body was consumed) is
        watched for the client's disconnect, which abandons the stream."""
        assert response.stream is not None
        headers = [(b"content-type", response.content_type.encode("latin-1"))]
        if response.stream_length is not None:
            headers.append((b"content-length", str(response.stream_length).encode("latin-1")))
        headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers)
        try:
            async with anyio.create_task_group() as tg:
                if receive is not None:
                    tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                await send({"type": "http.response.start", "status": response.status,
                            "headers": headers})
                async for chunk in response.stream:
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                tg.cancel_scope.cancel()
        except Exception:
            # The status line is out: nothing can be rendered any more. Raising makes the
            # server drop the connection, so the client sees a truncated body, not a short one
            # that looks complete.
            logger.exception("streamed response of %s %s failed midway", method, route)
            raise
        finally:
            if response.on_close is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(STREAM_CLOSE_TIMEOUT_S):
                    await response.on_close()


async def _stream_body(receive: Receive) -> AsyncGenerator[bytes, None]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected before the body was complete",
                                     field="body")
        chunk: bytes = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
