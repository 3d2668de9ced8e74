"""HTTP health routes: `GET /health` (liveness) and `GET /ready` (readiness).

`/health` answers 200 while the process serves requests, touching no backend, so a container
orchestrator never restarts a server because a database is slow. `/ready` renders the shared
`Readiness` report: 200 when every backend answers, else 503 with each backend's state, e.g.
`{"status": "unavailable", "backends": {"clickhouse": {"ok": false, "code": ..., ...}}}`.

Must not import storage drivers; it sees only `mlrun.server.readiness`.
"""

from __future__ import annotations

from mlrun.server.http.app import Request, Response, Router
from mlrun.server.readiness import Readiness


def add_health_routes(router: Router, readiness: Readiness) -> None:
    async def health(request: Request) -> Response:
        return Response.json({"status": "ok"})

    async def ready(request: Request) -> Response:
        report = await readiness.check()
        return Response.json(
            {"status": "ready" if report.ready else "unavailable", "backends": report.backends},
            status=200 if report.ready else 503,
        )

    router.add("GET", "/health", health)
    router.add("GET", "/ready", ready)
