"""One Redis connection: an anyio TCP stream and a RESP reply parser.

Owns: connecting (TCP, then AUTH and SELECT from the address), writing a whole pipeline of
commands in one send, and reading exactly as many replies back, in order. The pool, deadlines,
back-off and the translation of failures into the error tree are `storage.redis.client`'s.

Must not import trio or asyncio (anyio only), the error tree's users (edges, use-cases), or
other storages. Protocol bytes come from `protocols.resp`.

Invariants:
- A connection whose exchange did not complete (an OS error, the peer closing, a malformed
  reply, a deadline or any other cancellation mid-exchange) is `broken`: replies to what was
  sent may still be on their way, so it is never used again, only closed.
- Replies are read in the order the commands were written; one exchange at a time (the pool
  hands a connection to one task at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import anyio.abc

from mlrun.server.protocols.resp import (
    NEED_MORE,
    Reply,
    ReplyError,
    ReplyParser,
    encode_command,
)

_RECEIVE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where Redis is and who we are: `redis://[user:password@]host:port[/db]`."""

    host: str
    port: int = 6379
    username: str | None = None
    password: str | None = None
    db: int = 0

    def __repr__(self) -> str:  # never show the password
        user = f"{self.username}@" if self.username else ""
        return f"RedisAddress(redis://{user}{self.host}:{self.port}/{self.db})"


class HandshakeRefused(Exception):
    """AUTH or SELECT answered with an error (wrong password, no such database)."""

    def __init__(self, error: ReplyError) -> None:
        super().__init__(error.message)
        self.error = error


class RedisConnection:
    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._parser = ReplyParser()
        self.broken = False

    @classmethod
    async def connect(cls, address: RedisAddress) -> RedisConnection:
        """TCP connect, then AUTH/SELECT as the address says. The caller bounds it in time."""
        stream = await anyio.connect_tcp(address.host, address.port)
        connection = cls(stream)
        try:
            handshake: list[bytes] = []
            if address.password is not None:
                handshake.append(encode_command("AUTH", address.username, address.password)
                                 if address.username else encode_command("AUTH", address.password))
            if address.db:
                handshake.append(encode_command("SELECT", address.db))
            if handshake:
                for reply in await connection.exchange(b"".join(handshake), len(handshake)):
                    if isinstance(reply, ReplyError):
                        raise HandshakeRefused(reply)
        except BaseException:
            await connection.aclose()
            raise
        return connection

    async def exchange(self, payload: bytes, replies: int) -> list[Reply]:
        """Write `payload` (`replies` commands) in one send; read that many replies."""
        if self.broken:
            raise anyio.ClosedResourceError
        self.broken = True  # until the exchange completes: see the module's invariants
        await self._stream.send(payload)
        answers: list[Reply] = []
        while len(answers) < replies:
            reply = self._parser.next_reply()
            if reply is NEED_MORE:
                self._parser.feed(await self._stream.receive(_RECEIVE_BYTES))
                continue
            answers.append(reply)  # type: ignore[arg-type]
        if self._parser.buffered_bytes:  # more than was asked for: we are out of step
            raise anyio.BrokenResourceError("unexpected bytes after the replies")
        self.broken = False
        return answers

    async def aclose(self) -> None:
        """Close without waiting for the peer (safe in a cancelled scope)."""
        self.broken = True
        await anyio.aclose_forcefully(self._stream)
