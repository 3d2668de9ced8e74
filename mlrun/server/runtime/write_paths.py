"""Which write path a server runs, from `INGEST_MODE`: the composition of both modes.

    direct   ClickHouseWritePath: group commit straight into ClickHouse, marks the ledger
    queued   RedisWritePath: entries into the Redis streams; `mlrun process` does the rest

Owns building either one from the config and storage (and the queue's Redis client, key
names and metrics for queued mode), so the supervisor stays the same for both and the edges
and the ingest use-case never learn which one runs.

Part of the composition root: may import anything below it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from mlrun.server.edges.http.prometheus import ExtraFamilies
from mlrun.server.edges.http.queue_metrics import admission_families, queue_families
from mlrun.server.pipelines.clickhouse_write_path import ClickHouseWritePath
from mlrun.server.pipelines.queue_monitor import QueueMonitor
from mlrun.server.pipelines.redis_write_path import RedisWritePath
from mlrun.server.pipelines.stream_entries import StreamKeys
from mlrun.server.ports.write_path import BatchLedger
from mlrun.server.runtime.config import Config
from mlrun.server.storage.clickhouse.client import ClickHouse
from mlrun.server.storage.redis.client import RedisClient, open_redis
from mlrun.server.storage.redis.connection import RedisAddress

AnyWritePath = ClickHouseWritePath | RedisWritePath


def redis_address(config: Config) -> RedisAddress:
    redis = config.queue.redis
    if redis is None:  # load_config refuses queued mode without REDIS_URL
        raise ValueError("REDIS_URL is not set")
    return RedisAddress(host=redis.host, port=redis.port, username=redis.username,
                        password=redis.password.value if redis.password else None, db=redis.db)


def queue_keys(config: Config) -> StreamKeys:
    return StreamKeys(config.queue.stream, config.queue.partitions)


@contextlib.asynccontextmanager
async def open_queue_redis(config: Config) -> AsyncIterator[RedisClient | None]:
    """The queue's Redis client in queued mode (connected on first use, so Redis may still be
    down at start-up: `/ready` says so), None in direct mode."""
    if config.ingest.mode != "queued":
        yield None
        return
    async with open_redis(redis_address(config)) as redis:
        yield redis


def build_write_path(config: Config, clickhouse: ClickHouse, ledger: BatchLedger,
                     redis: RedisClient | None, *,
                     before_ledger_mark: Callable[[], None] | None) -> AnyWritePath:
    if redis is None:
        return ClickHouseWritePath(clickhouse, ledger,
                                   max_rows=config.ingest.pipeline_max_rows,
                                   max_bytes=config.ingest.pipeline_max_bytes,
                                   before_ledger_mark=before_ledger_mark)
    keys = queue_keys(config)
    return RedisWritePath(redis, clickhouse, QueueMonitor(redis, keys, config.queue.group),
                          keys=keys, max_entries=config.queue.max_entries,
                          max_bytes=config.queue.max_bytes,
                          pipeline_max_rows=config.ingest.pipeline_max_rows,
                          pipeline_max_bytes=config.ingest.pipeline_max_bytes)


def metric_families(write_path: AnyWritePath) -> tuple[ExtraFamilies, ...]:
    """What `/metrics` shows beyond the pipelines' gauges."""
    if isinstance(write_path, RedisWritePath):
        return queue_families(write_path.monitor), admission_families(write_path)
    return ()


def drained_summary(write_path: AnyWritePath) -> str:
    """The shutdown log line's account of what the writers did."""
    if isinstance(write_path, RedisWritePath):
        pipeline, admission = write_path.statistics()
        return (f"{pipeline.committed_rows} rows queued in {admission.admitted_entries} "
                f"batches; the processors commit them")
    pipelines, marks = write_path.statistics()
    committed = ", ".join(f"{p.name} committed {p.committed_rows} rows" for p in pipelines)
    return f"{committed}; ledger marks written {marks.marked}, left {marks.pending}"
