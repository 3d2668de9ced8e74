"""The standard `grpc.health.v1.Health` service on the gRPC port (what grpc_health_probe, Kubernetes
and load balancers ask).

Owns: `HealthServicer`. Readiness is injected (`readiness: async () -> bool`, wired by the
supervisor to the same check as HTTP `/ready`), so this module imports no storage code.
Must not import trio, asyncio, storage or the HTTP edge.

Invariants:
- Check answers SERVING or NOT_SERVING for "" (the whole server) and for each MLRun service name,
  from one readiness answer; any other name is NOT_FOUND, as the health protocol requires.
- Check never hangs and never fails because a backend does: readiness that raises or takes longer
  than `readiness_timeout_s` reads as NOT_SERVING (logged), never as an error status.
- Watch streams the status: the current one at once, then each change, as the protocol asks
  (an unknown service gets SERVICE_UNKNOWN and the stream stays open). Whether remote backends
  answer can only be learnt by asking them, so a change is found by probing readiness every
  `watch_interval_s`; probes are shared (at most one readiness check per interval whatever
  the number of watchers), and a watcher waits on an event between them. `close()` (the
  supervisor calls it when shutdown starts) sends NOT_SERVING to every watcher and ends the
  streams OK, so long-lived watches never hold the gRPC drain.

Note: `mlrun.wire.proto.grpc.health.v1.health_pb2` registers the standard `grpc.health.v1.*`
names in protobuf's default pool, so grpcio-health-checking's `grpc_health.v1.health_pb2` cannot
be imported into the same process (duplicate symbol). Clients in this project use ours.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Final

import anyio

from mlrun.server.edges.grpc.listener import GrpcAbort
from mlrun.server.errors import GrpcCode
from mlrun.wire.proto.grpc.health.v1 import health_grpc, health_pb2
from mlrun.wire.proto.mlrun.v1 import ingest_pb2, lifecycle_pb2, query_pb2

log = logging.getLogger(__name__)

Readiness = Callable[[], Awaitable[bool]]

MLRUN_SERVICE_NAMES: Final[tuple[str, ...]] = (
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
    query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name,
    lifecycle_pb2.DESCRIPTOR.services_by_name["LifecycleService"].full_name,
)
DEFAULT_READINESS_TIMEOUT_S: Final = 2.0
DEFAULT_WATCH_INTERVAL_S: Final = 1.0

_SERVING: Final = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN: Final = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_grpc.HealthServicer):
    """`grpc.health.v1.Health`; pass `HealthServicer(readiness).service` to `serve_grpc`."""

    def __init__(
        self,
        readiness: Readiness,
        *,
        service_names: Iterable[str] = MLRUN_SERVICE_NAMES,
        readiness_timeout_s: float = DEFAULT_READINESS_TIMEOUT_S,
        watch_interval_s: float = DEFAULT_WATCH_INTERVAL_S,
    ) -> None:
        self._readiness = readiness
        self._known = frozenset(("", *service_names))
        self._readiness_timeout_s = readiness_timeout_s
        self._watch_interval_s = watch_interval_s
        self._probe_lock = anyio.Lock()
        self._probed_at = float("-inf")
        self._probed_ready = False
        self._closed = anyio.Event()

    def close(self) -> None:
        """Shutdown started: watchers get NOT_SERVING and their streams end."""
        self._closed.set()

    async def Check(self, message: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        if message.service not in self._known:
            raise GrpcAbort(GrpcCode.NOT_FOUND, f"unknown service {message.service[:100]!r}")
        ready = await self._is_ready()
        return health_pb2.HealthCheckResponse(status=_SERVING if ready else _NOT_SERVING)

    # The generated base declares a plain coroutine; purerpc needs an async generator here.
    async def Watch(  # type: ignore[override]
        self, message: health_pb2.HealthCheckRequest
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if message.service not in self._known:
            yield health_pb2.HealthCheckResponse(status=_SERVICE_UNKNOWN)
            await self._closed.wait()  # open until the client leaves or the server stops
            return
        sent: int | None = None
        while not self._closed.is_set():
            status = _SERVING if await self._shared_probe() else _NOT_SERVING
            if status != sent:
                sent = status
                yield health_pb2.HealthCheckResponse(status=status)
            with anyio.move_on_after(self._watch_interval_s):
                await self._closed.wait()
        if sent != _NOT_SERVING:
            yield health_pb2.HealthCheckResponse(status=_NOT_SERVING)

    async def _shared_probe(self) -> bool:
        """Readiness, asked at most once per `watch_interval_s` for all watchers together."""
        async with self._probe_lock:
            now = anyio.current_time()
            if now - self._probed_at >= self._watch_interval_s * 0.9:
                self._probed_ready = await self._is_ready()
                self._probed_at = anyio.current_time()
            return self._probed_ready

    async def _is_ready(self) -> bool:
        try:
            with anyio.fail_after(self._readiness_timeout_s):
                return await self._readiness()
        except TimeoutError:
            log.warning("readiness check took over %.1f s: NOT_SERVING", self._readiness_timeout_s)
        except Exception:
            log.warning("readiness check failed: NOT_SERVING", exc_info=True)
        return False
