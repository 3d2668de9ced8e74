"""`mlrun.http_trio`: hypercorn's trio TCP server with a moving keep-alive deadline behaves as
hypercorn's own: requests on one kept-alive connection are served, a request slower than the
keep-alive timeout is not cut off, an idle connection is closed once the timeout passes, and
server shutdown closes idle connections at once.

Runs the real `hypercorn.trio.serve` (with `install()` applied) on a loopback socket, in
process, with a short keep-alive timeout."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import hypercorn.trio.run
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from mlrun import http_trio
from mlrun.server.edges.http.app import App, Request, Response, Router, RouteSpec

KEEP_ALIVE_S = 0.4


def make_app() -> App:
    router = Router()

    async def fast(request: Request) -> Response:
        return Response.json({"ok": True})

    async def slow(request: Request) -> Response:
        await trio.sleep(KEEP_ALIVE_S * 2.5)
        return Response.json({"ok": "slow"})

    spec = RouteSpec(summary="test", scope=None, response=None)
    router.add("GET", "/fast", fast, spec)
    router.add("GET", "/slow", slow, spec)
    return App(router)


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[int, trio.Event]]:
    http_trio.install()
    assert hypercorn.trio.run.TCPServer is http_trio.KeepAliveDeadlineTCPServer
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.graceful_timeout = 1.0
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve(make_app(), config, shutdown_trigger=stop.wait))
        await trio.sleep(0.2)
        yield port, stop
        stop.set()


async def request(stream: trio.SocketStream, path: str) -> bytes:
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    data = b""
    with trio.fail_after(5):
        while b"}" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed before the answer to {path}: {data!r}"
            data += chunk
    return data


async def closed_by_server(stream: trio.SocketStream, within_s: float) -> bool:
    with trio.move_on_after(within_s):
        return await stream.receive_some(65536) == b""
    return False


async def test_kept_alive_requests_slow_requests_and_the_idle_timeout() -> None:
    async with serving() as (port, _), await trio.open_tcp_stream("127.0.0.1", port) as stream:
        for _ in range(5):
            assert b'200' in (await request(stream, "/fast")).split(b"\r\n")[0]
        # A request in progress longer than the keep-alive timeout is not cut off ...
        assert b'"slow"' in await request(stream, "/slow")
        # ... and the same connection is still usable right after it.
        assert b'{"ok":true}' in await request(stream, "/fast")
        # Idle: not closed before the timeout, closed soon after it.
        assert not await closed_by_server(stream, KEEP_ALIVE_S * 0.5)
        assert await closed_by_server(stream, KEEP_ALIVE_S * 5)


async def test_shutdown_closes_idle_connections_at_once() -> None:
    async with serving() as (port, stop), await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await request(stream, "/fast")
        stop.set()
        assert await closed_by_server(stream, KEEP_ALIVE_S * 0.5)
