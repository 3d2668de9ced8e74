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
- Watch is UNIMPLEMENTED (allowed by the protocol; clients fall back to polling Check). A Watch
  that pushed changes would need readiness events, not a sleep-polling loop.

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
from mlrun.wire.proto.mlrun.v1 import ingest_pb2, query_pb2

log = logging.getLogger(__name__)

Readiness = Callable[[], Awaitable[bool]]

MLRUN_SERVICE_NAMES: Final[tuple[str, ...]] = (
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
    query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name,
)
DEFAULT_READINESS_TIMEOUT_S: Final = 2.0

_SERVING: Final = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_grpc.HealthServicer):
    """`grpc.health.v1.Health`; pass `HealthServicer(readiness).service` to `serve_grpc`."""

    def __init__(
        self,
        readiness: Readiness,
        *,
        service_names: Iterable[str] = MLRUN_SERVICE_NAMES,
        readiness_timeout_s: float = DEFAULT_READINESS_TIMEOUT_S,
    ) -> None:
        self._readiness = readiness
        self._known = frozenset(("", *service_names))
        self._readiness_timeout_s = readiness_timeout_s

    async def Check(self, message: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        if message.service not in self._known:
            raise GrpcAbort(GrpcCode.NOT_FOUND, f"unknown service {message.service[:100]!r}")
        ready = await self._is_ready()
        return health_pb2.HealthCheckResponse(status=_SERVING if ready else _NOT_SERVING)

    # The generated base declares a plain coroutine; purerpc needs an async generator here.
    async def Watch(  # type: ignore[override]
        self, message: health_pb2.HealthCheckRequest
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        raise GrpcAbort(GrpcCode.UNIMPLEMENTED, "Health/Watch is not implemented: poll Check")
        yield  # unreachable; makes this the async generator purerpc expects of a stream method

    async def _is_ready(self) -> bool:
        try:
            with anyio.fail_after(self._readiness_timeout_s):
                return await self._readiness()
        except TimeoutError:
            log.warning("readiness check took over %.1f s: NOT_SERVING", self._readiness_timeout_s)
        except Exception:
            log.warning("readiness check failed: NOT_SERVING", exc_info=True)
        return False
