"""`Router.match`: answering parameterless paths from a table changes no routing decision.

Every (method, path) below is matched by the table path and by the full scan; both must agree
(route, parameters, or the error), including precedence (the first matching route wins, even a
parameterised one added before a literal one), 405 for a known path with another method, and
routes added after the table was built."""

from __future__ import annotations

import pytest

from mlrun.server.edges.http.app import MethodNotAllowed, Request, Response, Router, RouteSpec
from mlrun.server.errors import NotFound


async def _handler(request: Request) -> Response:
    return Response.json({})


SPEC = RouteSpec(summary="t", scope=None, response=None)


def outcome(router: Router, method: str, path: str, *, scan: bool) -> object:
    try:
        route, params = router._scan(method, path) if scan else router.match(method, path)
    except (NotFound, MethodNotAllowed) as exc:
        return type(exc).__name__
    return route.method, route.template, params


def test_table_answers_exactly_what_the_scan_answers() -> None:
    router = Router()
    router.add("GET", "/runs/{run_id}", _handler, SPEC)
    router.add("GET", "/runs/compare", _handler, SPEC)   # shadowed by the route above for GET
    router.add("POST", "/runs/compare", _handler, SPEC)  # first for POST
    router.add("GET", "/health", _handler, SPEC)
    router.add("GET", "/health", _handler, SPEC)         # a duplicate never wins
    router.add("PUT", "/files/{key}", _handler, SPEC, path_tail=True)
    cases = [("GET", "/runs/compare"), ("POST", "/runs/compare"), ("GET", "/health"),
             ("POST", "/health"), ("GET", "/nope"), ("GET", "/runs/abc"), ("PUT", "/files/a/b"),
             ("DELETE", "/runs/compare")]
    for method, path in cases:
        assert outcome(router, method, path, scan=False) == outcome(router, method, path,
                                                                   scan=True), (method, path)
    assert outcome(router, "GET", "/runs/compare", scan=False) == (
        "GET", "/runs/{run_id}", {"run_id": "compare"})
    assert outcome(router, "POST", "/health", scan=False) == "MethodNotAllowed"
    # A route added after the table was built is seen.
    router.add("GET", "/late", _handler, SPEC)
    assert outcome(router, "GET", "/late", scan=False) == ("GET", "/late", {})


@pytest.mark.parametrize("path", ["/health\n", "/health/", "/HEALTH"])
def test_near_misses_take_the_scan(path: str) -> None:
    router = Router()
    router.add("GET", "/health", _handler, SPEC)
    assert outcome(router, "GET", path, scan=False) == outcome(router, "GET", path, scan=True)
