"""The async Redis client against a real `redis-server` (tests/backends/redis.py): pipelining,
transactions, error replies, deadlines, reconnecting with back-off after a crash, a Redis that
is down at start, the pool bound, AUTH and SELECT, and the asyncio backend."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from mlrun.server.errors import BackendError, BackendTimeout, BackendUnavailable
from mlrun.server.protocols.resp import ReplyError, encode_commands
from mlrun.server.storage.redis.client import RedisClient, open_redis
from mlrun.server.storage.redis.connection import RedisAddress

from backends.redis import RedisServer, find_redis_binary

pytestmark = pytest.mark.timeout(60)


def address(server: RedisServer, **changes: object) -> RedisAddress:
    fields: dict[str, object] = {"host": server.host, "port": server.port,
                                 "password": server.password}
    fields.update(changes)
    return RedisAddress(**fields)  # type: ignore[arg-type]


async def test_a_pipeline_is_one_write_with_replies_in_order(redis_server: RedisServer) -> None:
    async with open_redis(address(redis_server), max_connections=2) as redis:
        commands = [("RPUSH", "list", str(i)) for i in range(2000)]
        replies = await redis.pipeline([*commands, ("LLEN", "list"), ("GET", "nothing"),
                                        ("LPUSH",)], timeout_s=5)
        assert replies[:2000] == list(range(1, 2001))
        assert replies[2000:2002] == [2000, None]
        assert isinstance(replies[2002], ReplyError) and replies[2002].kind == "ERR"
        assert redis.connects == 1  # every exchange above reused one connection
        big = b"\x00\xff" * 3_000_000
        await redis.execute("SET", "big", big, timeout_s=5)
        assert await redis.execute("GET", "big", timeout_s=5) == big
        with pytest.raises(BackendError) as refused:
            await redis.execute("LLEN", "big", timeout_s=5)  # WRONGTYPE
        assert "WRONGTYPE" in refused.value.detail
    assert redis_server.command("LLEN", "list") == "2000"


async def test_a_transaction_runs_all_or_reports_why_not(redis_server: RedisServer) -> None:
    async with open_redis(address(redis_server)) as redis:
        encoded = encode_commands([("XADD", "s", "*", "f", "v"), ("INCRBY", "n", 5),
                                   ("INCRBY", "s", 1)])
        first, second, third = await redis.transaction(encoded, timeout_s=5)
        assert isinstance(first, bytes) and second == 5
        assert isinstance(third, ReplyError) and third.kind == "WRONGTYPE"  # failed while running
        with pytest.raises(BackendError):  # refused while queueing: nothing ran
            await redis.transaction(encode_commands([("INCRBY", "n", 1), ("XADD", "s")]),
                                    timeout_s=5)
        assert await redis.execute("GET", "n", timeout_s=5) == b"5"


async def test_a_frozen_redis_answers_within_the_deadline_then_recovers(
    redis_server: RedisServer,
) -> None:
    async with open_redis(address(redis_server)) as redis:
        await redis.ping(timeout_s=2)
        redis_server.freeze()
        try:
            started = anyio.current_time()
            with pytest.raises(BackendTimeout):
                await redis.ping(timeout_s=0.3)
            assert anyio.current_time() - started < 1.0
        finally:
            redis_server.thaw()
        await redis.ping(timeout_s=2)  # the timed-out connection was thrown away, not reused


async def test_a_crashed_redis_is_reached_again_after_restart_with_back_off(
    redis_server: RedisServer,
) -> None:
    async with open_redis(address(redis_server)) as redis:
        await redis.execute("SET", "k", "v", timeout_s=2)
        redis_server.kill()
        with pytest.raises(BackendUnavailable):
            await redis.execute("GET", "k", timeout_s=2)  # the pooled connection is dead
        with pytest.raises(BackendUnavailable):
            await redis.execute("GET", "k", timeout_s=2)  # connect refused: back-off starts
        failures = redis.connect_failures
        with pytest.raises(BackendUnavailable, match="next connection attempt"):
            await redis.execute("GET", "k", timeout_s=2)  # inside the back-off: no attempt
        assert redis.connect_failures == failures
        redis_server.start()
        with anyio.fail_after(5):
            while True:
                try:
                    value = await redis.execute("GET", "k", timeout_s=2)
                    break
                except BackendUnavailable:
                    await anyio.sleep(0.05)  # until the back-off lets the next attempt through
        assert value == b"v"  # the AOF kept what was acknowledged


async def test_redis_down_at_open_then_up(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, find_redis_binary())
    from backends.ports import free_port

    server.port = free_port()
    async with open_redis(address(server)) as redis:
        with pytest.raises(BackendUnavailable):
            await redis.ping(timeout_s=1)
        server.start()
        try:
            await anyio.sleep(0.1)  # past the first back-off step
            await redis.ping(timeout_s=2)
        finally:
            server.stop()


async def test_the_pool_never_opens_more_than_its_bound(redis_server: RedisServer) -> None:
    async with open_redis(address(redis_server), max_connections=2) as redis:
        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for index in range(4):  # each holds a connection for 0.3 s
                tg.start_soon(lambda i=index: redis.execute("BLPOP", f"q{i}", 0.3, timeout_s=5))
        elapsed = anyio.current_time() - started
        assert redis.connects == 2
        assert 0.55 < elapsed < 2.0  # two rounds of two
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: redis.execute("BLPOP", "a", 1, timeout_s=5))
            tg.start_soon(lambda: redis.execute("BLPOP", "b", 1, timeout_s=5))
            await anyio.sleep(0.05)
            with pytest.raises(BackendTimeout):  # waiting for a connection counts in the deadline
                await redis.execute("PING", timeout_s=0.2)


async def test_auth_and_database_from_the_address(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, find_redis_binary(), password="s3cret pass")
    server.start()
    try:
        async with open_redis(address(server, db=3)) as redis:
            await redis.execute("SET", "where", "db3", timeout_s=2)
        assert server.command("-n", "3", "GET", "where") == "db3"
        async with open_redis(address(server, password="wrong")) as redis:
            with pytest.raises(BackendError, match="credentials"):
                await redis.ping(timeout_s=2)
        assert "s3cret" not in repr(address(server))
    finally:
        server.stop()


def test_the_client_runs_on_asyncio_too(redis_server: RedisServer) -> None:
    async def round_trip() -> list[object]:
        redis = RedisClient(address(redis_server))
        try:
            return list(await redis.pipeline([("SET", "a", 1), ("GET", "a")], timeout_s=2))
        finally:
            await redis.aclose()

    started = time.monotonic()
    assert anyio.run(round_trip, backend="asyncio") == ["OK", b"1"]
    assert time.monotonic() - started < 5
