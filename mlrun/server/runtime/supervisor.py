"""The supervisor: one anyio task tree that owns the server's lifetime.

Owns the order of start-up and shutdown (DESIGN section 1):

    open storage (production clients or embedded defaults, per backend)
    └─ apply migrations, create the bucket      (retried until `startup_timeout_s`)
       └─ writers task group                    (drains last: what was accepted gets stored)
          └─ listeners task group               (stops first: HTTP graceful, gRPC cancelled)

`serve()` reports the real bound addresses through `task_status` once both listeners accept
connections, then runs until `shutdown_requested` is set. The caller (the entry point) owns
signals and the overall shutdown deadline.

Must not import trio, asyncio or hypercorn's backend modules: the HTTP serve function is
injected by `mlrun.__main__`, which picks the event loop.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from hypercorn.config import Config as HypercornConfig

from mlrun.server.edges.grpc.health import HealthServicer
from mlrun.server.edges.grpc.ingest_servicer import IngestServicer
from mlrun.server.edges.grpc.lifecycle_servicer import LifecycleServicer
from mlrun.server.edges.grpc.listener import serve_grpc
from mlrun.server.edges.grpc.query_servicer import QueryServicer
from mlrun.server.edges.http.api import add_write_routes
from mlrun.server.edges.http.app import App, Router
from mlrun.server.edges.http.artifact_api import add_artifact_routes, add_local_store_routes
from mlrun.server.edges.http.health import add_health_routes
from mlrun.server.edges.http.key_api import add_key_routes
from mlrun.server.edges.http.lifecycle_api import add_lifecycle_routes
from mlrun.server.edges.http.lifecycle_metrics import lifecycle_families
from mlrun.server.edges.http.mlflow import add_mlflow_routes
from mlrun.server.edges.http.openapi import add_openapi_route
from mlrun.server.edges.http.prometheus import (
    ExtraFamilies,
    PipelineGauges,
    add_metrics_route,
    claim_group_families,
)
from mlrun.server.edges.http.query_api import add_query_routes
from mlrun.server.edges.http.ui import add_ui_routes
from mlrun.server.errors import BackendUnavailable, ConfigError, MlrunError
from mlrun.server.pipelines.stream_backlog import StreamBacklog
from mlrun.server.ports.objects import ArtifactStore
from mlrun.server.runtime.config import Config
from mlrun.server.runtime.heap import freeze_startup_heap
from mlrun.server.runtime.write_paths import (
    build_write_path,
    drained_summary,
    metric_families,
    open_queue_redis,
    queue_keys,
)
from mlrun.server.storage.clickhouse.client import ClickHouse
from mlrun.server.storage.clickhouse.embedded import open_embedded_clickhouse
from mlrun.server.storage.clickhouse.http_client import open_http_clickhouse
from mlrun.server.storage.clickhouse.lifecycle import ClickHouseLifecycle
from mlrun.server.storage.clickhouse.metric_reads import MetricQueries
from mlrun.server.storage.clickhouse.migrations import apply_clickhouse_migrations
from mlrun.server.storage.objects.local import LocalArtifactStore, open_local_store
from mlrun.server.storage.objects.s3 import open_s3_store
from mlrun.server.storage.postgres.artifact_rows import PostgresArtifactRows
from mlrun.server.storage.postgres.client import Postgres, apply_postgres_migrations, open_postgres
from mlrun.server.storage.postgres.embedded import open_embedded_postgres
from mlrun.server.storage.postgres.keys import PostgresKeyDirectory
from mlrun.server.storage.postgres.lifecycle import PostgresLifecycle
from mlrun.server.storage.postgres.metadata import MetadataStore
from mlrun.server.storage.postgres.mlflow_state import MlflowStateStore
from mlrun.server.storage.postgres.planner_statistics import PlannerStatistics
from mlrun.server.storage.postgres.run_reads import RunQueries
from mlrun.server.storage.redis.client import RedisClient
from mlrun.server.telemetry import Telemetry
from mlrun.server.usecases.access import RunAccess
from mlrun.server.usecases.artifacts import Artifacts
from mlrun.server.usecases.auth import Authenticator
from mlrun.server.usecases.ingest import Ingest, IngestTimeouts
from mlrun.server.usecases.keys import (
    KeyManagement,
    load_or_create_bootstrap_key,
    serve_key_refresh,
)
from mlrun.server.usecases.lifecycle import Lifecycle, LifecycleSettings
from mlrun.server.usecases.mlflow.tracking import MlflowTracking
from mlrun.server.usecases.queries import Queries
from mlrun.server.usecases.readiness import Readiness

logger = logging.getLogger("mlrun.server")

# pg_advisory_lock key that serialises ClickHouse migrations between servers starting at once
# against the same databases ("mlrunCH1" as ASCII, so it is recognisable in pg_locks).
CLICKHOUSE_MIGRATION_LOCK_KEY = 0x6D6C72756E434831

ServeHttp = Callable[
    [App, HypercornConfig, Callable[[], Awaitable[None]]], Coroutine[Any, Any, None]
]


class StartupError(Exception):
    """Start-up could not complete; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class BoundAddresses:
    host: str
    http_port: int
    grpc_port: int


@dataclass(frozen=True, slots=True)
class Storage:
    postgres: Postgres
    clickhouse: ClickHouse
    artifacts: ArtifactStore
    modes: dict[str, str]  # backend name -> "server" | "embedded", for the start-up log


def prepare_data_dir(path: Path) -> Path:
    """Create the data dir (mode 755: the embedded PostgreSQL runs as another user)."""
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def local_signing_secret(data_dir: Path) -> bytes:
    """The HMAC key for the local artifact store's URLs, created once and kept in the data dir
    so URLs handed out before a restart stay valid until they expire."""
    secret_path = data_dir / "local-artifacts.key"
    try:
        return secret_path.read_bytes()
    except FileNotFoundError:
        pass
    secret = secrets.token_bytes(32)
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    return secret


@asynccontextmanager
async def open_storage(config: Config, *, public_base_url: str) -> AsyncIterator[Storage]:
    modes: dict[str, str] = {}
    needs_data_dir = (
        config.postgres.dsn is None
        or config.clickhouse.host is None
        or config.artifacts.endpoint is None
    )
    data_dir = prepare_data_dir(config.data_dir) if needs_data_dir else config.data_dir
    async with AsyncExitStack() as stack:
        if config.postgres.dsn is None:
            dsn = await stack.enter_async_context(open_embedded_postgres(data_dir))
            modes["postgres"] = "embedded"
        else:
            dsn = config.postgres.dsn.value
            modes["postgres"] = "server"
        postgres = await stack.enter_async_context(
            open_postgres(dsn, max_connections=config.postgres.max_connections)
        )

        clickhouse: ClickHouse
        if config.clickhouse.host is None:
            clickhouse = await stack.enter_async_context(
                open_embedded_clickhouse(
                    data_dir=data_dir / "clickhouse", database=config.clickhouse.database
                )
            )
            modes["clickhouse"] = "embedded"
        else:
            clickhouse = await stack.enter_async_context(
                open_http_clickhouse(
                    host=config.clickhouse.host,
                    port=config.clickhouse.port,
                    user=config.clickhouse.user,
                    password=config.clickhouse.password.value,
                    database=config.clickhouse.database,
                )
            )
            modes["clickhouse"] = "server"

        artifacts: ArtifactStore
        if config.artifacts.endpoint is None:
            artifacts = await stack.enter_async_context(
                open_local_store(
                    root=data_dir / "artifacts",
                    public_base_url=public_base_url,
                    signing_secret=local_signing_secret(data_dir),
                )
            )
            modes["artifacts"] = "embedded"
        else:
            artifacts = await stack.enter_async_context(
                open_s3_store(
                    endpoint=config.artifacts.endpoint,
                    access_key=config.artifacts.access_key,
                    secret_key=config.artifacts.secret_key.value,
                    bucket=config.artifacts.bucket,
                    region=config.artifacts.region,
                )
            )
            modes["artifacts"] = "server"
        yield Storage(postgres=postgres, clickhouse=clickhouse, artifacts=artifacts, modes=modes)


async def prepare_schemas(storage: Storage, *, startup_timeout_s: float) -> None:
    """Apply migrations and create the bucket, retrying while a backend is still coming up.
    Every attempt is bounded by what is left of `startup_timeout_s`."""
    deadline = anyio.current_time() + startup_timeout_s
    delay_s = 0.2
    stage = "postgres"
    while True:
        remaining_s = deadline - anyio.current_time()
        try:
            with anyio.fail_after(max(remaining_s, 0.01)):
                stage = "postgres"
                applied_pg = await apply_postgres_migrations(
                    storage.postgres, timeout_s=min(60.0, max(remaining_s, 1.0)))
                stage = "clickhouse"
                async with storage.postgres.advisory_lock(
                    CLICKHOUSE_MIGRATION_LOCK_KEY, timeout_s=60.0
                ):
                    applied_ch = await apply_clickhouse_migrations(storage.clickhouse)
                stage = "artifacts"
                await storage.artifacts.ensure_bucket(timeout_s=10.0)
        except TimeoutError:
            raise StartupError(
                f"{stage} did not answer within the start-up timeout "
                f"(MLRUN_STARTUP_TIMEOUT_S={startup_timeout_s:g})"
            ) from None
        except BackendUnavailable as exc:
            remaining_s = deadline - anyio.current_time()
            if remaining_s <= delay_s:
                raise StartupError(
                    f"{exc.backend} did not become available within the start-up timeout "
                    f"(MLRUN_STARTUP_TIMEOUT_S={startup_timeout_s:g}): {exc.message}"
                ) from exc
            logger.warning("waiting for %s: %s (retrying in %.1fs)", exc.backend, exc.message,
                           delay_s)
            await anyio.sleep(delay_s)  # a retry back-off, not polling for an event
            delay_s = min(delay_s * 2, 5.0)
            continue
        logger.info("schemas ready (applied: postgres %s, clickhouse %s)",
                    applied_pg or "none", applied_ch or "none")
        return


@asynccontextmanager
async def open_prepared_storage(config: Config, *, public_base_url: str
                                ) -> AsyncIterator[Storage]:
    """`open_storage`, then `prepare_schemas`: what `mlrun serve` and `mlrun process` start
    with. A failure of either is a `StartupError` (one line for the operator)."""
    async with AsyncExitStack() as stack:
        try:
            storage = await stack.enter_async_context(
                open_storage(config, public_base_url=public_base_url))
            logger.info("storage: %s", ", ".join(f"{k}={v}" for k, v in storage.modes.items()))
            await prepare_schemas(storage, startup_timeout_s=config.startup_timeout_s)
        except (ConfigError, MlrunError) as exc:
            raise StartupError(str(exc)) from exc
        yield storage


def bind_http_socket(host: str, port: int) -> socket.socket:
    """Bind the HTTP listening socket ourselves so the real port is known even for port 0,
    before any slow start-up work: a port clash fails in milliseconds, not after migrations."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror}") from exc
    return sock


def public_base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def hypercorn_config(sock: socket.socket, *, graceful_timeout_s: float) -> HypercornConfig:
    config = HypercornConfig()
    # Hand the socket's descriptor to hypercorn, which wraps it in a socket object of its own;
    # detach ours so the descriptor has exactly one owner.
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = graceful_timeout_s
    # Idle kept-alive connections stay open longer than clients keep them in their pools
    # (httpx 5 s, the SDK 4 s): with hypercorn's default of 5 s both ends time out
    # together and a request sent just as the server closes fails with "server disconnected".
    # The server must be the side that waits longer (nginx uses 75 s for the same reason).
    config.keep_alive_timeout = 75.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    return config


@dataclass(frozen=True, slots=True)
class Services:
    """What the edges call: built once per process from storage and config."""

    readiness: Readiness
    authenticator: Authenticator
    ingest: Ingest
    pipelines: tuple[PipelineGauges, ...]
    telemetry: Telemetry
    keys: KeyManagement
    artifacts: Artifacts
    queries: Queries
    # The local artifact store's URL signing key (None when artifacts live on S3).
    local_signing_secret: bytes | None = None
    # More /metrics families (the queue's, in queued mode).
    metric_families: tuple[ExtraFamilies, ...] = ()
    # The MLflow-compatible edge's use-cases (None: its routes are not mounted).
    mlflow: MlflowTracking | None = None
    # Deletes, purge jobs, retention and pruning (None: no lifecycle routes).
    lifecycle: Lifecycle | None = None


def build_http_app(services: Services, *, max_body_bytes: int) -> App:
    router = Router()
    add_health_routes(router, services.readiness)
    add_write_routes(router, services.ingest, services.authenticator)
    add_key_routes(router, services.keys, services.authenticator)
    add_artifact_routes(router, services.artifacts, services.authenticator)
    store = services.artifacts.store
    if isinstance(store, LocalArtifactStore) and services.local_signing_secret is not None:
        add_local_store_routes(router, store, signing_secret=services.local_signing_secret)
    add_query_routes(router, services.queries, services.authenticator)
    if services.lifecycle is not None:
        add_lifecycle_routes(router, services.lifecycle, services.authenticator)
    add_metrics_route(router, services.telemetry, services.pipelines, services.metric_families)
    add_openapi_route(router)
    if services.mlflow is not None:
        add_mlflow_routes(router, services.mlflow, services.artifacts, services.authenticator)
    add_ui_routes(router, auth_disabled=services.authenticator.disabled)
    return App(router, max_body_bytes=max_body_bytes, telemetry=services.telemetry)


def build_authenticator(config: Config) -> Authenticator:
    if config.auth.disabled:
        logger.warning("MLRUN_AUTH_DISABLED: every request is the local admin (loopback only)")
        return Authenticator(bootstrap_key=None, disabled=True)
    if config.auth.bootstrap_api_key is not None:
        return Authenticator(bootstrap_key=config.auth.bootstrap_api_key.value, disabled=False)
    key, path, created = load_or_create_bootstrap_key(prepare_data_dir(config.data_dir))
    logger.info("no MLRUN_API_KEY set: %s the bootstrap admin key in %s",
                "generated" if created else "using", path)
    return Authenticator(bootstrap_key=key, disabled=False)


async def serve(
    config: Config,
    *,
    serve_http: ServeHttp,
    shutdown_requested: anyio.Event,
    task_status: anyio.abc.TaskStatus[BoundAddresses] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until `shutdown_requested` is set; then stop listeners, drain, close."""
    http_sock = bind_http_socket(config.listen.host, config.listen.http_port)
    http_port: int = http_sock.getsockname()[1]
    base_url = public_base_url(config.listen.host, http_port)
    try:
        async with AsyncExitStack() as stack:
            storage = await stack.enter_async_context(
                open_prepared_storage(config, public_base_url=base_url))
            redis = await stack.enter_async_context(open_queue_redis(config))
            await _run_listeners(
                config, storage, redis, http_sock, base_url, serve_http, shutdown_requested,
                task_status,
            )
    finally:
        if http_sock.fileno() != -1:  # start-up failed before hypercorn took the descriptor
            http_sock.close()
    logger.info("storage closed; bye")


async def _run_listeners(
    config: Config,
    storage: Storage,
    redis: RedisClient | None,
    http_sock: socket.socket,
    base_url: str,
    serve_http: ServeHttp,
    shutdown_requested: anyio.Event,
    task_status: anyio.abc.TaskStatus[BoundAddresses],
) -> None:
    metadata = MetadataStore(storage.postgres, timeout_s=IngestTimeouts().metadata_s)
    # INGEST_MODE: straight into ClickHouse, or into the Redis queue (`redis` set).
    write_path = build_write_path(
        config, storage.clickhouse, metadata, redis,
        before_ledger_mark=(_kill_self if config.fault_injection == "kill_before_ledger_mark"
                            else None),
    )
    planner_statistics = PlannerStatistics(storage.postgres)
    authenticator = build_authenticator(config)
    key_directory = PostgresKeyDirectory(storage.postgres)
    run_reads, metric_reads = RunQueries(storage.postgres), MetricQueries(storage.clickhouse)
    ingest = Ingest(
        metadata,
        write_path=write_path,
        cardinality=config.cardinality,
        on_runs_created=planner_statistics.note_runs_created,
    )
    queries = Queries(run_reads, metric_reads)
    lifecycle = build_lifecycle(config, storage, authenticator, redis)
    services = Services(
        readiness=Readiness([storage.postgres, storage.clickhouse, storage.artifacts,
                             *([redis] if redis is not None else [])]),
        authenticator=authenticator,
        ingest=ingest,
        pipelines=write_path.pipelines,
        telemetry=Telemetry(),
        keys=KeyManagement(key_directory, authenticator),
        artifacts=Artifacts(storage.artifacts, PostgresArtifactRows(storage.postgres)),
        queries=queries,
        local_signing_secret=(
            local_signing_secret(prepare_data_dir(config.data_dir))
            if isinstance(storage.artifacts, LocalArtifactStore) else None
        ),
        mlflow=MlflowTracking(
            ingest=ingest, queries=queries, runs=run_reads, metrics=metric_reads,
            state=MlflowStateStore(storage.postgres, timeout_s=IngestTimeouts().metadata_s),
            run_access=RunAccess(metadata.run_project)),
        metric_families=(*metric_families(write_path), lifecycle_families(lifecycle),
                         claim_group_families(metadata)),
        lifecycle=lifecycle,
    )
    app = build_http_app(services, max_body_bytes=config.ingest.max_body_bytes)

    async def grpc_ready() -> bool:
        return (await services.readiness.check()).ready

    health = HealthServicer(grpc_ready)
    grpc_services = [
        health.service,
        IngestServicer(ingest=services.ingest, authenticator=services.authenticator,
                       artifacts=services.artifacts).service,
        QueryServicer(queries=services.queries, authenticator=services.authenticator,
                      artifacts=services.artifacts).service,
        LifecycleServicer(lifecycle=lifecycle, authenticator=services.authenticator).service,
    ]
    http_port: int = http_sock.getsockname()[1]
    hc_config = hypercorn_config(
        http_sock, graceful_timeout_s=max(1.0, config.shutdown_timeout_s / 2)
    )
    grpc_scope = anyio.CancelScope()
    keys_scope = anyio.CancelScope()
    statistics_scope = anyio.CancelScope()
    lifecycle_scope = anyio.CancelScope()
    # Writers outlive listeners: on shutdown the listeners stop first (in-flight requests
    # finish, still served by the writers), then the write path closes and drains.
    async with anyio.create_task_group() as writers:
        await writers.start(write_path.serve)
        # The key view is loaded before the listeners accept anything (usecases.auth).
        await writers.start(_serve_key_refresh_until_cancelled, authenticator, key_directory,
                            keys_scope)
        await writers.start(_serve_planner_statistics_until_cancelled, planner_statistics,
                            statistics_scope)
        # Purge jobs, retention and pruning; a job cut short here resumes at its recorded phase
        # (on this server's next start or on another server).
        await writers.start(_serve_lifecycle_until_cancelled, lifecycle, lifecycle_scope)
        try:
            async with anyio.create_task_group() as listeners:
                listeners.start_soon(serve_http, app, hc_config, shutdown_requested.wait)
                grpc_port: int = await listeners.start(
                    _serve_grpc_until_cancelled,
                    config.listen.host,
                    config.listen.grpc_port,
                    grpc_services,
                    grpc_scope,
                    services.telemetry,
                )
                freeze_startup_heap()
                logger.info("HTTP listening on %s", base_url)
                logger.info("gRPC listening on %s:%d", config.listen.host, grpc_port)
                task_status.started(BoundAddresses(config.listen.host, http_port, grpc_port))
                await shutdown_requested.wait()
                logger.info("shutting down: listeners stop accepting, accepted work drains")
                health.close()  # Health/Watch streams say NOT_SERVING and end
                grpc_scope.cancel()
            logger.info("listeners stopped")
        finally:
            keys_scope.cancel()
            statistics_scope.cancel()
            lifecycle_scope.cancel()
            write_path.close()
    logger.info("writers drained: %s", drained_summary(write_path))


def build_lifecycle(config: Config, storage: Storage, authenticator: Authenticator,
                    redis: RedisClient | None) -> Lifecycle:
    settings = config.lifecycle

    def forget_keys(key_ids: Sequence[str]) -> None:
        for key_id in key_ids:
            authenticator.remove_key(key_id)

    return Lifecycle(
        PostgresLifecycle(storage.postgres), ClickHouseLifecycle(storage.clickhouse),
        storage.artifacts,
        settings=LifecycleSettings(
            settle_s=settings.purge_settle_s,
            interval_s=settings.housekeeping_interval_s,
            retention_days=settings.retention_days,
            ledger_retention_s=settings.ledger_retention_days * 24 * 3600,
            upload_max_age_s=settings.upload_max_age_h * 3600,
        ),
        fault_point=(partial(_kill_at, _LIFECYCLE_FAULTS[config.fault_injection])
                     if config.fault_injection in _LIFECYCLE_FAULTS else None),
        forget_keys=forget_keys,
        queue_backlog=(StreamBacklog(redis, queue_keys(config)) if redis is not None else None),
    )


async def _serve_lifecycle_until_cancelled(
    lifecycle: Lifecycle,
    scope: anyio.CancelScope,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await lifecycle.serve(task_status=task_status)


# MLRUN_FAULT_INJECTION values that kill the server at a point of the housekeeper's work.
_LIFECYCLE_FAULTS = {
    "kill_mid_purge": "purge_clickhouse_deletes_started",
    "kill_mid_retention": "retention_partition_dropped",
}


def _kill_at(wanted: str, reached: str) -> None:
    """Die at the housekeeper's point `wanted`, as a power cut would."""
    if reached == wanted:
        logger.warning("fault injection: SIGKILL at %s", reached)
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_self() -> None:
    """MLRUN_FAULT_INJECTION=kill_before_ledger_mark: die as a power cut would, mid-write."""
    logger.warning("fault injection: SIGKILL before the ledger mark")
    os.kill(os.getpid(), signal.SIGKILL)


async def _serve_key_refresh_until_cancelled(
    authenticator: Authenticator,
    directory: PostgresKeyDirectory,
    scope: anyio.CancelScope,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await serve_key_refresh(authenticator, directory, task_status=task_status)


async def _serve_planner_statistics_until_cancelled(
    statistics: PlannerStatistics,
    scope: anyio.CancelScope,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await statistics.serve(task_status=task_status)


async def _serve_grpc_until_cancelled(
    host: str,
    port: int,
    services: list[object],
    scope: anyio.CancelScope,
    telemetry: Telemetry,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await serve_grpc(host=host, port=port, services=services,
                         on_call_finished=telemetry.observe_grpc, task_status=task_status)
