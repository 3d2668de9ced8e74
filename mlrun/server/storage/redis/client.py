"""An async Redis client on anyio: a bounded connection pool, pipelining, deadlines, back-off.

`open_redis(address)` -> `RedisClient`. redis-py's asyncio client does not run on trio, and its
sync client would cost a worker thread per call; this one speaks RESP2 (`protocols.resp`)
straight over anyio TCP streams (`storage.redis.connection`).

    await redis.execute("XLEN", key, timeout_s=1.0)              # one command; error raised
    await redis.pipeline([("GET", a), ("GET", b)], timeout_s=1.0) # one write, replies in order;
                                                                   # error replies as values
    await redis.transaction(encoded_commands, timeout_s=2.0)     # MULTI ... EXEC in one write

Must not import trio or asyncio (anyio only), the edges, the use-cases or other storages.

Invariants:
- Every call has a deadline (`timeout_s`) that covers waiting for a pooled connection,
  connecting and the exchange; past it: `BackendTimeout`, and the connection is discarded.
- At most `max_connections` connections exist; callers beyond that wait (within their deadline).
  Connections are made lazily, so a client can be opened while Redis is down.
- Failures leave only as the error tree: cannot connect / connection lost ->
  `BackendUnavailable`, no answer in time -> `BackendTimeout`, a transient error reply (LOADING,
  BUSY, OOM, ...) -> `BackendUnavailable`, any other error reply, a refused AUTH or bytes that
  are not RESP -> `BackendError`; the cause is chained.
- Reconnecting backs off: after a failed connect, the next attempt waits 0.05 s doubling to
  `max_backoff_s`; calls in between fail at once with `BackendUnavailable` instead of piling
  onto a Redis that is down. One successful connect resets it. A connection failure also
  drops the idle connections (after a Redis restart they are all dead).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Final

import anyio

from mlrun.server.errors import BackendError, BackendTimeout, BackendUnavailable, MlrunError
from mlrun.server.protocols.resp import (
    CommandArg,
    ProtocolError,
    Reply,
    ReplyError,
    count_commands,
    encode_command,
    encode_commands,
)
from mlrun.server.storage.redis.connection import HandshakeRefused, RedisAddress, RedisConnection

logger = logging.getLogger("mlrun.redis")

BACKEND: Final = "redis"
_FIRST_BACKOFF_S: Final = 0.05
_MULTI: Final = encode_command("MULTI")
_EXEC: Final = encode_command("EXEC")
_CONNECTION_LOST = (OSError, anyio.EndOfStream, anyio.BrokenResourceError,
                    anyio.ClosedResourceError)


def reply_error(error: ReplyError, command: str) -> MlrunError:
    """An error reply as the error tree sees it (the reply's text stays in the server log)."""
    if error.transient:
        return BackendUnavailable(f"redis answered {error.kind} to {command}; retry",
                                  backend=BACKEND)
    return BackendError(f"redis rejected {command}", backend=BACKEND, detail=error.message)


def raise_for_reply(reply: Reply, command: str) -> Reply:
    """`reply` itself, unless it is an error reply: then its translation is raised."""
    if isinstance(reply, ReplyError):
        raise reply_error(reply, command)
    return reply


class RedisClient:
    backend_name: Final = BACKEND

    def __init__(self, address: RedisAddress, *, max_connections: int = 16,
                 max_backoff_s: float = 2.0) -> None:
        self.address = address
        self._slots = anyio.Semaphore(max_connections)
        self._idle: list[RedisConnection] = []
        self._max_backoff_s = max_backoff_s
        self._backoff_s = 0.0
        self._next_connect_at = float("-inf")
        self._closed = False
        self.connects = 0
        self.connect_failures = 0

    # --- calls ---------------------------------------------------------------------------------

    async def execute(self, *args: CommandArg, timeout_s: float) -> Reply:
        (reply,) = await self._exchange(encode_command(*args), 1, timeout_s=timeout_s)
        return raise_for_reply(reply, _name(args[0]))

    async def pipeline(self, commands: Sequence[Sequence[CommandArg]], *, timeout_s: float
                       ) -> list[Reply]:
        """Every command in one write; the replies in order, error replies as values."""
        if not commands:
            return []
        return await self._exchange(encode_commands(commands), len(commands),
                                    timeout_s=timeout_s)

    async def transaction(self, encoded: bytes, *, timeout_s: float) -> list[Reply]:
        """MULTI, the encoded commands, EXEC, in one write: Redis runs them together and AOF
        records them together. Returns EXEC's replies (one per command; a command that failed
        while running is an error reply in its place). A command refused while queueing (OOM,
        a syntax error) aborts all of them: its translation is raised."""
        commands = count_commands(encoded)
        replies = await self._exchange(_MULTI + encoded + _EXEC, commands + 2,
                                       timeout_s=timeout_s)
        queued, executed = replies[:-1], replies[-1]
        if isinstance(executed, list):
            return executed
        refusal = next((r for r in queued if isinstance(r, ReplyError)), executed)
        raise_for_reply(refusal, "MULTI/EXEC")
        raise BackendError("redis aborted a transaction", backend=BACKEND)

    async def ping(self, *, timeout_s: float) -> None:
        if await self.execute("PING", timeout_s=timeout_s) != "PONG":
            raise BackendError("redis answered PING with something else", backend=BACKEND)

    # --- the pool ------------------------------------------------------------------------------

    async def _exchange(self, payload: bytes, replies: int, *, timeout_s: float) -> list[Reply]:
        if self._closed:
            raise BackendUnavailable("the redis client is closed", backend=BACKEND)
        try:
            with anyio.fail_after(timeout_s):
                async with self._lease() as connection:
                    return await connection.exchange(payload, replies)
        except TimeoutError as exc:
            raise BackendTimeout(f"redis did not answer within {timeout_s:g}s",
                                 backend=BACKEND) from exc
        except _CONNECTION_LOST as exc:
            await self._drop_idle()
            raise BackendUnavailable(f"cannot reach redis at {self.address.host}:"
                                     f"{self.address.port} ({_describe(exc)})",
                                     backend=BACKEND) from exc
        except ProtocolError as exc:
            raise BackendError("redis answered with bytes that are not RESP", backend=BACKEND,
                               detail=str(exc)) from exc
        except HandshakeRefused as exc:
            raise BackendError("redis refused the credentials or database of REDIS_URL",
                               backend=BACKEND, detail=exc.error.message) from exc

    @contextlib.asynccontextmanager
    async def _lease(self) -> AsyncIterator[RedisConnection]:
        async with self._slots:
            connection = self._idle.pop() if self._idle else await self._connect()
            try:
                yield connection
            finally:
                if connection.broken or self._closed:
                    await connection.aclose()
                else:
                    self._idle.append(connection)

    async def _connect(self) -> RedisConnection:
        wait_s = self._next_connect_at - anyio.current_time()
        if wait_s > 0:
            raise BackendUnavailable(
                f"redis at {self.address.host}:{self.address.port} is unreachable; next "
                f"connection attempt in {wait_s:.2f}s", backend=BACKEND)
        try:
            connection = await RedisConnection.connect(self.address)
        except BaseException:  # refused, lost, malformed, or cut off by the caller's deadline
            self.connect_failures += 1
            self._backoff_s = min(max(self._backoff_s * 2, _FIRST_BACKOFF_S), self._max_backoff_s)
            self._next_connect_at = anyio.current_time() + self._backoff_s
            raise
        if self._backoff_s:
            logger.info("connected to redis at %s:%d again", self.address.host,
                        self.address.port)
        self.connects += 1
        self._backoff_s = 0.0
        self._next_connect_at = float("-inf")
        return connection

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await self._drop_idle()


def _name(arg: CommandArg) -> str:
    return arg.decode() if isinstance(arg, bytes) else str(arg)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


@contextlib.asynccontextmanager
async def open_redis(address: RedisAddress, *, max_connections: int = 16
                     ) -> AsyncIterator[RedisClient]:
    """A client for `address`; connects on first use, so Redis may still be down."""
    client = RedisClient(address, max_connections=max_connections)
    try:
        yield client
    finally:
        await client.aclose()
