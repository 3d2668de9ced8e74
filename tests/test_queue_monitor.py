"""The queue as servers and processors see it, against a real redis-server: the snapshot of a
refresh (stream lengths, pending and lag of the group, counters, dead letters, memory), the
processors' drain rate and the Retry-After a full queue answers with, and an unreachable
Redis."""

from __future__ import annotations

import anyio
import pytest

from mlrun.server.pipelines.queue_monitor import QueueMonitor
from mlrun.server.pipelines.stream_entries import StreamKeys
from mlrun.server.storage.redis.client import open_redis
from mlrun.server.storage.redis.connection import RedisAddress

from backends.redis import RedisServer

pytestmark = pytest.mark.timeout(60)
KEYS = StreamKeys("m", 2)


async def test_a_refresh_sees_streams_group_counters_and_memory(
    redis_server: RedisServer,
) -> None:
    async with open_redis(RedisAddress(redis_server.host, redis_server.port)) as redis:
        monitor = QueueMonitor(redis, KEYS, "g")
        assert not monitor.snapshot.reachable  # before the first refresh
        await redis.pipeline(
            [("XGROUP", "CREATE", "m:0", "g", "0", "MKSTREAM"),
             *[("XADD", "m:0", "*", "f", "v") for _ in range(5)],
             ("XADD", "m:1", "*", "f", "v"),
             ("XREADGROUP", "GROUP", "g", "c", "COUNT", 2, "STREAMS", "m:0", ">"),
             ("SET", "m:queued-bytes", 1234), ("XADD", "m:dead-letter", "*", "f", "v")],
            timeout_s=5)
        snapshot = await monitor.refresh()
        assert snapshot.reachable
        assert (snapshot.entries, snapshot.bytes, snapshot.pending, snapshot.lag,
                snapshot.consumers, snapshot.dead_letters) == (6, 1234, 2, 3, 1, 1)
        assert snapshot.used_memory_bytes > 0 and snapshot.max_memory_bytes == 0
        assert not snapshot.memory_full


async def test_the_drain_rate_sets_retry_after(redis_server: RedisServer) -> None:
    async with open_redis(RedisAddress(redis_server.host, redis_server.port)) as redis:
        monitor = QueueMonitor(redis, KEYS, "g")
        await redis.pipeline([("XADD", "m:0", "*", "f", "v") for _ in range(100)], timeout_s=5)
        await monitor.refresh()
        assert monitor.retry_after_s(max_entries=100) == 5  # nothing drained yet
        for _ in range(3):
            await anyio.sleep(0.2)
            await redis.execute("INCRBY", "m:drained-entries", 10, timeout_s=5)  # ~50/s
            await monitor.refresh()
        assert 20 < monitor.drain_rate_entries_per_s < 100
        # The top tenth of a 100-entry bound (10 entries) at ~50/s: one second.
        assert monitor.retry_after_s(max_entries=100) == 1
        assert monitor.retry_after_s(max_entries=10) >= 2  # 99 above 90 % of 10


async def test_the_processing_hash_gives_rows_redeliveries_and_insert_latency(
    redis_server: RedisServer,
) -> None:
    """What processors add to the processing hash (as `StreamProcessor` does): every process
    that watches the queue shows all processors' rows, rows/s, redeliveries and inserts."""
    keys = StreamKeys("p", 2)
    async with open_redis(RedisAddress(redis_server.host, redis_server.port)) as redis:
        monitor = QueueMonitor(redis, keys, "g")
        before = await monitor.refresh()
        assert (before.drained_rows_total, before.redelivered_total,
                before.insert_latency().total) == (0, 0, 0)
        hash_key = keys.processing_stats
        await redis.pipeline([
            ("HINCRBY", hash_key, "redelivered", 3), ("HINCRBY", hash_key, "inserts", 4),
            ("HINCRBY", hash_key, "insert_us", 40_000),
            ("HINCRBY", hash_key, "insert_bucket:3", 1),  # <= 10 ms
            ("HINCRBY", hash_key, "insert_bucket:4", 2),  # <= 25 ms
            # the fourth insert took longer than the last bucket
        ], timeout_s=5)
        for _ in range(3):
            await anyio.sleep(0.2)
            await redis.pipeline([("INCRBY", keys.drained_counter, 2),
                                  ("HINCRBY", hash_key, "rows", 2000)], timeout_s=5)  # ~10k/s
            snapshot = await monitor.refresh()
        assert (snapshot.drained_total, snapshot.drained_rows_total,
                snapshot.redelivered_total) == (6, 6000, 3)
        assert 4000 < monitor.drain_rate_rows_per_s < 20000
        latency = snapshot.insert_latency()
        assert (latency.total, latency.sum_s) == (4, 0.04)
        assert dict(latency.cumulative())["0.01"] == 1
        assert dict(latency.cumulative())["0.025"] == 3
        assert dict(latency.cumulative())["+Inf"] == 4


async def test_an_unreachable_redis_is_reported_not_raised(redis_server: RedisServer) -> None:
    async with open_redis(RedisAddress(redis_server.host, redis_server.port)) as redis:
        monitor = QueueMonitor(redis, KEYS, "g")
        assert (await monitor.refresh()).reachable
        redis_server.kill()
        snapshot = await monitor.refresh()
        assert not snapshot.reachable and "redis" in (snapshot.error or "")
        redis_server.start()
        for _ in range(100):  # past the client's reconnect back-off
            if (await monitor.refresh()).reachable:
                break
            await anyio.sleep(0.1)
        assert monitor.snapshot.reachable
