"""HTTP routes of the read API (`GET /api/v1/runs`, run detail, metric and system-metric series,
`POST /api/v1/runs/compare`): decode, authenticate, call `Queries`, encode.

Only translation lives here: the query string is decoded into the route's query record
(`mlrun.wire.query_schemas`; a wrong type, an out-of-range value or an unknown parameter is a
400 `invalid_field` naming the parameter), the JSON body into `CompareRuns`, the API key comes
from the headers. The filter grammar, authorization and every read live in
`mlrun.server.usecases.queries`, shared with the gRPC edge.

A parameter given more than once: list parameters (`names`, `tags`, `params`, `status`) join
the values as one comma list; any other takes its last value.

Must not import storage drivers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

import msgspec

from mlrun.server.edges import payloads
from mlrun.server.edges.http.api import decode_body, path_run_id
from mlrun.server.edges.http.app import Request, Response, Router, RouteSpec
from mlrun.server.errors import InvalidInput
from mlrun.server.usecases.auth import Authenticator
from mlrun.server.usecases.listing import given, listing_from_query
from mlrun.server.usecases.queries import Queries, SeriesRequest, parse_names
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.query_schemas import (
    CompareResult,
    CompareRuns,
    ListRunsQuery,
    MetricsQuery,
    MetricsResult,
    Query,
    RunDetail,
    RunPage,
    SystemMetricsQuery,
)

Q = TypeVar("Q", bound=Query)

_LIST_PARAMETERS = frozenset({"names", "tags", "params", "status"})
_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"unknown field `(?P<name>[^`]*)`")


def decode_query(query: Mapping[str, list[str]], kind: type[Q]) -> Q:
    """The query string as the route's record; errors name the parameter."""
    flat = {
        name: ",".join(values) if name in _LIST_PARAMETERS else values[-1]
        for name, values in query.items()
        if values
    }
    try:
        return msgspec.convert(flat, kind, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        unknown = _UNKNOWN.search(message)
        if unknown is not None:  # worded as what it is: a query parameter, not a body field
            name = unknown["name"]
            accepted = ", ".join(kind.__struct_fields__)
            raise InvalidInput(f"unknown query parameter {name!r}; this route accepts: "
                               f"{accepted}", code=ErrorCode.INVALID_FIELD, field=name) from None
        raise payloads.invalid_input(message, kind=kind, default_field="query",
                                     what="query parameter ") from None


def add_query_routes(router: Router, queries: Queries, authenticator: Authenticator) -> None:
    async def list_runs(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        listing = listing_from_query(decode_query(request.query, ListRunsQuery))
        return Response.json(await queries.list_runs(principal, listing))

    async def get_run(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        return Response.json(await queries.get_run(principal, path_run_id(request)))

    async def metrics(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        run_id = path_run_id(request)
        query = decode_query(request.query, MetricsQuery)
        series = SeriesRequest(
            system=False, names=parse_names(given(query.names)),
            max_points=given(query.max_points), start=given(query.start_step),
            end=given(query.end_step), method=query.method, cursor=given(query.cursor),
            layout=query.layout,
        )
        return Response.json(await queries.series(principal, run_id, series))

    async def system_metrics(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        run_id = path_run_id(request)
        query = decode_query(request.query, SystemMetricsQuery)
        series = SeriesRequest(
            system=True, names=parse_names(given(query.names)),
            max_points=given(query.max_points), start=given(query.start_ms),
            end=given(query.end_ms), method=query.method, cursor=given(query.cursor),
            layout=query.layout,
        )
        return Response.json(await queries.series(principal, run_id, series))

    async def compare(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        return Response.json(
            await queries.compare(principal, decode_body(request.body, CompareRuns))
        )

    tags = ("read",)
    router.add("GET", "/api/v1/runs", list_runs, RouteSpec(
        summary="List and search runs (filters, sort, keyset pagination)", scope="read",
        query=ListRunsQuery, response=RunPage, errors=(400, 401, 403), tags=tags))
    router.add("POST", "/api/v1/runs/compare", compare, RouteSpec(
        summary="Compare metric series of up to 100 runs", scope="read", request=CompareRuns,
        response=CompareResult, errors=(400, 401, 403, 404), tags=tags))
    router.add("GET", "/api/v1/runs/{run_id}", get_run, RouteSpec(
        summary="A run with its params, tags, artifacts count and metric summaries",
        scope="read", response=RunDetail, errors=(400, 401, 403, 404), tags=tags))
    router.add("GET", "/api/v1/runs/{run_id}/metrics", metrics, RouteSpec(
        summary="Metric series of a run, downsampled (lttb, minmax, avg) or raw pages",
        scope="read", query=MetricsQuery, response=MetricsResult,
        errors=(400, 401, 403, 404), tags=tags))
    router.add("GET", "/api/v1/runs/{run_id}/system_metrics", system_metrics, RouteSpec(
        summary="System metric series of a run (keyed by timestamp), as for metrics",
        scope="read", query=SystemMetricsQuery, response=MetricsResult,
        errors=(400, 401, 403, 404), tags=tags))

