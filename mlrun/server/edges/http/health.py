"""HTTP health routes: `GET /health` (liveness) and `GET /ready` (readiness).

`/health` answers 200 while the process serves requests, touching no backend, so a container
orchestrator never restarts a server because a database is slow. `/ready` renders the shared
`Readiness` report: 200 when every backend answers, else 503 with each backend's state, e.g.
`{"status": "unavailable", "backends": {"clickhouse": {"ok": false, "code": ..., ...}}}`.

Must not import storage drivers; it sees only `mlrun.server.usecases.readiness`.
"""

from __future__ import annotations

import msgspec

from mlrun.server.edges.http.app import Request, Response, Router, RouteSpec
from mlrun.server.usecases.readiness import BackendStatus, Readiness


class HealthBody(msgspec.Struct, frozen=True):
    status: str


class ReadinessBody(msgspec.Struct, frozen=True):
    status: str
    backends: dict[str, BackendStatus]


def add_health_routes(router: Router, readiness: Readiness) -> None:
    async def health(request: Request) -> Response:
        return Response.json(HealthBody(status="ok"))

    async def ready(request: Request) -> Response:
        report = await readiness.check()
        return Response.json(
            ReadinessBody(status="ready" if report.ready else "unavailable",
                          backends=report.backends),
            status=200 if report.ready else 503,
        )

    router.add("GET", "/health", health, RouteSpec(
        summary="Liveness: 200 while the process serves requests", scope=None,
        response=HealthBody, tags=("health",)))
    router.add("GET", "/ready", ready, RouteSpec(
        summary="Readiness: 200 when every backend answers, else 503 naming the failing ones",
        scope=None, response=ReadinessBody, other_success_statuses=(503,), tags=("health",)))
