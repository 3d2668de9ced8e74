"""`mlrun process`: one processor of queued ingest, as one anyio task tree.

Same config and same start-up as `mlrun serve` (`runtime.supervisor`: storage opened, the
schemas applied under their locks, retried until `MLRUN_STARTUP_TIMEOUT_S`), then:

    processor task group    StreamProcessor (+ its LedgerMarker): stream entries -> ClickHouse
    HTTP on PROCESSOR_HTTP_PORT   /health, /ready (PostgreSQL, ClickHouse, Redis), /metrics
    queue monitor           the stream gauges /metrics shows (refreshed every second)

On shutdown (`shutdown_requested`): HTTP stops, the processor stops taking entries, inserts and
acknowledges the round in flight, the ledger marker makes its last attempt; then storage
closes. The caller (the entry point) owns signals and the overall deadline.

Redis down at start-up does not stop start-up: `/ready` answers 503 naming redis and the
processor retries with back-off until it answers.

Must not import trio, asyncio or hypercorn's backend modules (the HTTP serve function is
injected by `mlrun.__main__`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from contextlib import AsyncExitStack

import anyio
import anyio.abc

from mlrun.server.edges.http.app import App, Router
from mlrun.server.edges.http.health import add_health_routes
from mlrun.server.edges.http.prometheus import add_metrics_route
from mlrun.server.edges.http.queue_metrics import processor_families, queue_families
from mlrun.server.pipelines.ledger_marker import LedgerMarker
from mlrun.server.pipelines.queue_monitor import QueueMonitor
from mlrun.server.pipelines.stream_processor import StreamProcessor
from mlrun.server.runtime.config import Config
from mlrun.server.runtime.heap import freeze_startup_heap
from mlrun.server.runtime.supervisor import (
    ServeHttp,
    bind_http_socket,
    hypercorn_config,
    open_prepared_storage,
    public_base_url,
)
from mlrun.server.runtime.write_paths import queue_keys, redis_address
from mlrun.server.storage.postgres.metadata import MetadataStore
from mlrun.server.storage.redis.client import open_redis
from mlrun.server.telemetry import Telemetry
from mlrun.server.usecases.ingest import IngestTimeouts
from mlrun.server.usecases.readiness import Readiness

logger = logging.getLogger("mlrun.processor")

_MONITOR_INTERVAL_S = 1.0
_MAX_PROBE_BODY_BYTES = 64 * 1024


def consumer_name(config: Config) -> str:
    """MLRUN_PROCESSOR_NAME, else host name and PID: unique among live processors. A fixed name
    lets a restarted processor take its own pending entries back at once instead of after
    the claim timeout."""
    return config.queue.processor_name or f"{socket.gethostname()}-{os.getpid()}"


def _kill_self() -> None:
    """MLRUN_FAULT_INJECTION=kill_before_stream_ack: die as a power cut would, after the insert
    committed and before its entries are acknowledged."""
    logger.warning("fault injection: SIGKILL before the stream ack")
    os.kill(os.getpid(), signal.SIGKILL)


async def serve_processor(
    config: Config,
    *,
    serve_http: ServeHttp,
    shutdown_requested: anyio.Event,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run one processor until `shutdown_requested`; reports its HTTP port when started."""
    http_sock = bind_http_socket(config.listen.host, config.queue.processor_http_port)
    http_port: int = http_sock.getsockname()[1]
    base_url = public_base_url(config.listen.host, http_port)
    try:
        async with AsyncExitStack() as stack:
            storage = await stack.enter_async_context(
                open_prepared_storage(config, public_base_url=base_url))
            redis = await stack.enter_async_context(open_redis(redis_address(config)))
            keys = queue_keys(config)
            processor = StreamProcessor(
                redis, storage.clickhouse,
                LedgerMarker(MetadataStore(storage.postgres,
                                           timeout_s=IngestTimeouts().metadata_s)),
                keys=keys, group=config.queue.group, consumer=consumer_name(config),
                read_entries=config.queue.processor_read_entries,
                claim_idle_s=config.queue.claim_idle_s,
                before_ack=(_kill_self if config.fault_injection == "kill_before_stream_ack"
                            else None))
            monitor = QueueMonitor(redis, keys, config.queue.group,
                                   interval_s=_MONITOR_INTERVAL_S)
            telemetry = Telemetry()
            router = Router()
            add_health_routes(router, Readiness([storage.postgres, storage.clickhouse, redis]))
            add_metrics_route(router, telemetry, (),
                              (queue_families(monitor), processor_families(processor)))
            app = App(router, max_body_bytes=_MAX_PROBE_BODY_BYTES, telemetry=telemetry)
            hc_config = hypercorn_config(http_sock, graceful_timeout_s=1.0)
            async with anyio.create_task_group() as tg:
                tg.start_soon(monitor.serve)
                tg.start_soon(serve_http, app, hc_config, shutdown_requested.wait)
                async with anyio.create_task_group() as processing:
                    await processing.start(processor.serve)
                    logger.info("processor %s consuming %s:0..%d (group %s)",
                                processor.consumer, keys.prefix, keys.partitions - 1,
                                config.queue.group)
                    freeze_startup_heap()
                    logger.info("processor HTTP listening on %s", base_url)
                    task_status.started(http_port)
                    await shutdown_requested.wait()
                    logger.info("shutting down: the round in flight is committed, then exit")
                    processor.close()
                tg.cancel_scope.cancel()  # the monitor (HTTP has stopped on the same event)
            statistics = processor.statistics()
            logger.info("processor drained: %d batches, %d rows committed; ledger marks "
                        "left %d", statistics.entries_committed, statistics.rows_committed,
                        processor.marker.statistics().pending)
    finally:
        if http_sock.fileno() != -1:  # start-up failed before hypercorn took the descriptor
            http_sock.close()
