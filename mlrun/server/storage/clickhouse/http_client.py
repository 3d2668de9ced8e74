"""ClickHouse over its HTTP interface: `open_http_clickhouse` -> `HttpClickHouse`, the production
transport of the `storage.clickhouse.client.ClickHouse` protocol (httpx, keep-alive).

SQL text, row encoding and error parsing come from `protocols.clickhouse` (pure); this module
only moves bytes and translates failures (`client.translate_error`).

Must not import trio or asyncio (anyio only), chdb, the HTTP/gRPC edges, or other storages.

Invariants: those of the `ClickHouse` protocol (deadlines on both sides, failures only as the
error tree's backend errors); a result is read into memory whole and refused past
`_MAX_RESPONSE_BYTES`; an error ClickHouse writes into a 200 body after streaming started is
found and raised like a non-200 answer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import anyio
import anyio.to_thread
import httpx

from mlrun.server.errors import BackendError, BackendTimeout, BackendUnavailable
from mlrun.server.protocols.clickhouse import (
    HttpRequest,
    RowBinaryType,
    auth_headers,
    build_insert_request,
    build_query_request,
    deadline_settings,
    decode_json_each_row,
    decode_row_binary,
    find_error_in_body,
    parse_error,
    quote_identifier,
    with_format,
)
from mlrun.server.storage.clickhouse.client import BACKEND, CLOSE_TIMEOUT_S, translate_error

# A result is read into memory whole; queries are expected to LIMIT themselves well below this.
_MAX_RESPONSE_BYTES: Final = 256 * 1024 * 1024


class HttpClickHouse:
    """A ClickHouse server over HTTP. Build it with `open_http_clickhouse`."""

    backend_name: Final = BACKEND

    def __init__(
        self, client: httpx.AsyncClient, *, database: str, gzip_min_bytes: int | None
    ) -> None:
        self._client = client
        self._database = database
        self._gzip_min_bytes = gzip_min_bytes
        self._closed = False

    @property
    def database(self) -> str:
        return self._database

    async def ensure_database(self, *, timeout_s: float) -> None:
        sql = f"CREATE DATABASE IF NOT EXISTS {quote_identifier(self._database)}"
        request = build_query_request(sql, database=None, settings=deadline_settings(timeout_s))
        await self._post(request, timeout_s=timeout_s)

    async def execute(self, sql: str, *, timeout_s: float) -> None:
        request = build_query_request(
            sql, database=self._database, settings=deadline_settings(timeout_s)
        )
        await self._post(request, timeout_s=timeout_s)

    async def query_rows(self, sql: str, *, timeout_s: float) -> list[dict[str, Any]]:
        request = build_query_request(
            with_format(sql, "JSONEachRow"),
            database=self._database,
            settings=deadline_settings(timeout_s),
        )
        body = await self._post(request, timeout_s=timeout_s)
        try:
            return decode_json_each_row(body)
        except ValueError as exc:
            raise BackendError(
                "ClickHouse returned an unreadable result", backend=BACKEND, detail=str(exc)
            ) from exc

    async def query_row_binary(
        self, sql: str, types: Sequence[RowBinaryType], *, timeout_s: float
    ) -> list[list[Any]]:
        request = build_query_request(
            with_format(sql, "RowBinary"),
            database=self._database,
            settings=deadline_settings(timeout_s),
        )
        body = await self._post(request, timeout_s=timeout_s)
        try:
            return decode_row_binary(body, types)
        except ValueError as exc:
            raise BackendError(
                "ClickHouse returned an unreadable result", backend=BACKEND, detail=str(exc)
            ) from exc

    async def insert_rowbinary(
        self, table: str, columns: Sequence[str], body: bytes, *, timeout_s: float
    ) -> None:
        await self._insert(table, columns, body, "RowBinary", timeout_s=timeout_s)

    async def insert_native(
        self, table: str, columns: Sequence[str], body: bytes, *, timeout_s: float
    ) -> None:
        await self._insert(table, columns, body, "Native", timeout_s=timeout_s)

    async def _insert(self, table: str, columns: Sequence[str], body: bytes, input_format: str,
                      *, timeout_s: float) -> None:
        build = functools.partial(
            build_insert_request,
            table,
            columns,
            body,
            database=self._database,
            settings=deadline_settings(timeout_s),
            input_format=input_format,
        )
        if self._gzip_min_bytes is not None and len(body) >= self._gzip_min_bytes:
            # gzip level 1 shrinks metric rows ~3x but runs at ~80 MB/s: off the event loop.
            request = await anyio.to_thread.run_sync(functools.partial(build, gzip_level=1))
        else:
            request = build()
        await self._post(request, timeout_s=timeout_s)

    async def ping(self, *, timeout_s: float) -> None:
        self._check_open()
        try:
            with anyio.fail_after(timeout_s):
                response = await self._client.get("/ping", timeout=timeout_s)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise BackendTimeout("ClickHouse did not answer a ping", backend=BACKEND) from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable("ClickHouse is unreachable", backend=BACKEND) from exc
        if response.status_code != 200 or response.content.strip() != b"Ok.":
            raise BackendUnavailable(
                f"ClickHouse ping answered HTTP {response.status_code}", backend=BACKEND
            )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
            await self._client.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("the ClickHouse client is closed", backend=BACKEND)

    async def _post(self, request: HttpRequest, *, timeout_s: float) -> bytes:
        """POST one request and return the 200 body, or raise the translated failure."""
        self._check_open()
        try:
            with anyio.fail_after(timeout_s):
                async with self._client.stream(
                    "POST",
                    "/",
                    params=request.params,
                    headers=request.headers,
                    content=request.body,
                    timeout=timeout_s,
                ) as response:
                    body = await self._read_body(response)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise BackendTimeout(
                f"ClickHouse did not answer within {timeout_s} s", backend=BACKEND
            ) from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable("ClickHouse is unreachable", backend=BACKEND) from exc

        if response.status_code == 200:
            streamed_error = find_error_in_body(body)
            if streamed_error is not None:
                raise translate_error(streamed_error)
            return body
        text = body.decode("utf-8", errors="replace")
        error = parse_error(text, code_header=response.headers.get("X-ClickHouse-Exception-Code"))
        if error.code is not None:
            raise translate_error(error)
        if response.status_code >= 500:  # a proxy or a dying server, not ClickHouse's verdict
            raise BackendUnavailable(
                f"ClickHouse answered HTTP {response.status_code}", backend=BACKEND
            )
        raise BackendError(
            f"ClickHouse answered HTTP {response.status_code}",
            backend=BACKEND,
            detail=text[:2000],
        )

    @staticmethod
    async def _read_body(response: httpx.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > _MAX_RESPONSE_BYTES:
                    raise BackendError(
                        "a ClickHouse result exceeded the size limit",
                        backend=BACKEND,
                        detail=f"more than {_MAX_RESPONSE_BYTES} bytes",
                    )
                chunks.append(chunk)
        except httpx.TransportError as exc:
            # Servers from 25.x break the HTTP framing right after writing a mid-stream
            # exception into the body: the text we already have says what went wrong.
            streamed_error = find_error_in_body(b"".join(chunks))
            if streamed_error is not None:
                raise translate_error(streamed_error) from exc
            raise
        return b"".join(chunks)


@contextlib.asynccontextmanager
async def open_http_clickhouse(
    *,
    host: str,
    port: int,
    user: str,
    password: str,
    database: str,
    max_connections: int = 8,
    keepalive_expiry_s: float = 2.0,
    gzip_min_bytes: int | None = None,
) -> AsyncIterator[HttpClickHouse]:
    """A client for a ClickHouse server's HTTP interface; nothing is sent until the first call.

    `keepalive_expiry_s` must stay below the server's keep_alive_timeout (3 s in the packaged
    config), or a request can race the server closing an idle connection. `gzip_min_bytes`
    gzips insert bodies from that size on. Off by default: measured on loopback, 1M metric rows
    in 10k-row batches went ~35% slower with gzip (level 1 makes the body ~3x smaller but
    compresses at ~80 MB/s); it pays only on a slow network.
    """
    url_host = f"[{host}]" if ":" in host else host
    client = httpx.AsyncClient(
        base_url=f"http://{url_host}:{port}",
        headers=auth_headers(user, password),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=keepalive_expiry_s,
        ),
        # Never route a database connection through a proxy picked up from the environment.
        trust_env=False,
    )
    clickhouse = HttpClickHouse(client, database=database, gzip_min_bytes=gzip_min_bytes)
    try:
        yield clickhouse
    finally:
        await clickhouse.aclose()
