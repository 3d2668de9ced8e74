"""`GET /openapi.json`: the OpenAPI 3.1 document of every route, generated from the router.

Owns the rendering of `RouteSpec`s (mlrun.server.edges.http.app) into OpenAPI: paths, path and query
parameters, request bodies, responses (success statuses with their schemas, every declared
error status with `ErrorBody`), security, tags. Schemas come from the msgspec Structs
themselves through `msgspec.json.schema_components`; nothing here is written by hand, so a
route or a payload that changes changes the document with it.

Rules of the rendering:
- Every route may also answer 413 (body too large), 500 and 503 (a backend is down), so those
  are documented on every operation; a route's own `errors` add the rest. A status the route
  declares as a success (e.g. /ready's 503) keeps its success schema. 431 (request head too
  large, answered by hypercorn without a body) is documented everywhere without content.
- A request body is required unless every field of its Struct has a default.
- A route with a `scope` requires an API key: `Authorization: Bearer <key>` (`bearerAuth`) or
  `X-API-Key` (`apiKeyHeader`), and names the scope in `x-mlrun-scope`. Public routes
  (`scope=None`) declare `security: []`.
- Query parameters are the fields of the route's query record; optional ones are not required,
  carry `allowEmptyValue` (the app's query parser drops `?name=` as if it were absent), and
  their schema drops any `null` alternative (a query string has no null).
- A route declared `documented=False` (the MLflow-compatible surface, which follows MLflow's
  own API and error shape) is left out.
- Path parameters take the wire schema of their name when there is one (`run_id`), else a
  non-empty string.

The document is rendered once, at the first request (after every route was added), and the
encoded bytes are served from then on. Must not import storage or the use-cases.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from mlrun.server.edges.http.app import Request, Response, Route, Router, RouteSpec
from mlrun.wire.schemas import ErrorBody, RunId

OPENAPI_VERSION: Final = "3.1.0"
# Statuses any route may answer besides its own `errors` (see RouteSpec).
# 400: more than one credential (`duplicate_credentials`); 431: a request line and headers
# over 16 KiB (`headers_too_large`), checked before routing.
COMMON_ERROR_STATUSES: Final = (400, 413, 431, 500, 503)
SECURITY_SCHEMES: Final[dict[str, Any]] = {
    "bearerAuth": {"type": "http", "scheme": "bearer",
                   "description": "Authorization: Bearer <API key>"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
_REF_TEMPLATE: Final = "#/components/schemas/{name}"
_PATH_PARAMETER: Final = re.compile(r"\{([a-z_]+)\}")
_PATH_PARAMETER_TYPES: Final[dict[str, Any]] = {"run_id": RunId}
_STATUS_TEXT: Final[dict[int, str]] = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No content", 400: "Invalid input",
    401: "Missing or invalid API key", 403: "The key lacks the scope or the project",
    404: "Not found", 405: "Method not allowed", 409: "Conflict",
    413: "Request body too large", 429: "Overloaded: retry after Retry-After seconds",
    431: "Request line and headers over 16 KiB",
    500: "Internal error", 503: "A backend is unavailable (retryable)",
}


def _operation_id(method: str, template: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", template.replace("{", "by_")).strip("_")
    return f"{method.lower()}_{words}"


def _parameter_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema without the `null` alternative of an optional field."""
    alternatives = schema.get("anyOf")
    if isinstance(alternatives, list):
        kept = [a for a in alternatives if a != {"type": "null"}]
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
        if len(kept) == 1:
            return {**rest, **kept[0]}
        return {**rest, "anyOf": kept}
    return {k: v for k, v in schema.items() if k != "default" or v is not None}


class _Schemas:
    """Every type the routes mention, rendered in one `schema_components` call."""

    def __init__(self, routes: Sequence[Route]) -> None:
        kinds: list[Any] = [ErrorBody, *_PATH_PARAMETER_TYPES.values()]
        for route in routes:
            for kind in (route.spec.request, route.spec.response, route.spec.query):
                if kind is not None and kind not in kinds:
                    kinds.append(kind)
        rendered, self.components = msgspec.json.schema_components(
            kinds, ref_template=_REF_TEMPLATE
        )
        self._by_kind = dict(zip(kinds, rendered, strict=True))

    def of(self, kind: Any) -> dict[str, Any]:
        schema: dict[str, Any] = self._by_kind[kind]
        return schema

    def resolved(self, kind: Any) -> dict[str, Any]:
        schema = self.of(kind)
        ref = schema.get("$ref")
        if isinstance(ref, str):
            resolved: dict[str, Any] = self.components[ref.rsplit("/", 1)[-1]]
            return resolved
        return schema


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _parameters(template: str, spec: RouteSpec, schemas: _Schemas) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = []
    for name in _PATH_PARAMETER.findall(template):
        kind = _PATH_PARAMETER_TYPES.get(name)
        schema = schemas.of(kind) if kind is not None else {"type": "string", "minLength": 1}
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    if spec.query is not None:
        record = schemas.resolved(spec.query)
        required = set(record.get("required", []))
        for name, schema in record.get("properties", {}).items():
            parameter: dict[str, Any] = {
                "name": name, "in": "query", "required": name in required,
                "schema": _parameter_schema(schema),
            }
            if name not in required:
                # The app reads `?name=` as if the parameter were absent.
                parameter["allowEmptyValue"] = True
            if "description" in schema:
                parameter["description"] = schema["description"]
            parameters.append(parameter)
    return parameters


def _responses(spec: RouteSpec, schemas: _Schemas) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status in (spec.success_status, *spec.other_success_statuses):
        response: dict[str, Any] = {"description": _STATUS_TEXT.get(status, "Success")}
        if spec.response is not None:
            response["content"] = _json_content(schemas.of(spec.response))
        responses[str(status)] = response
    error_schema = schemas.of(ErrorBody)
    for status in sorted({*spec.errors, *COMMON_ERROR_STATUSES}):
        if str(status) in responses:
            continue
        response = {"description": _STATUS_TEXT.get(status, "Error"),
                    "content": _json_content(error_schema)}
        if status == 429:
            response["headers"] = {"Retry-After": {
                "description": "whole seconds to wait before sending the same request again",
                "schema": {"type": "integer", "minimum": 1}}}
        responses[str(status)] = response
    return responses


def build_openapi(routes: Sequence[Route], *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI document of `routes`."""
    schemas = _Schemas([route for route in routes if route.spec.documented])
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        spec = route.spec
        if not spec.documented:
            continue
        operation: dict[str, Any] = {
            "operationId": _operation_id(route.method, route.template),
            "summary": spec.summary,
            "tags": list(spec.tags),
            "responses": _responses(spec, schemas),
        }
        parameters = _parameters(route.template, spec, schemas)
        if parameters:
            operation["parameters"] = parameters
        if spec.request is not None:
            # A body whose fields all have defaults may be left out (e.g. finish: "finished").
            body_required = bool(schemas.resolved(spec.request).get("required"))
            operation["requestBody"] = {"required": body_required,
                                        "content": _json_content(schemas.of(spec.request))}
        elif spec.stream_body:
            operation["requestBody"] = {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}}}}
        if spec.scope is None:
            operation["security"] = []
        else:
            operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
            operation["x-mlrun-scope"] = spec.scope
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schemas.components, "securitySchemes": SECURITY_SCHEMES},
    }


def add_openapi_route(router: Router, *, title: str = "MLRun", version: str = "1") -> None:
    """Serve `GET /openapi.json` for every route of `router`, this one included."""
    rendered: list[bytes] = []

    async def openapi(request: Request) -> Response:
        if not rendered:
            document = build_openapi(router.routes, title=title, version=version)
            rendered.append(msgspec.json.encode(document))
        return Response(status=200, body=rendered[0])

    router.add("GET", "/openapi.json", openapi, RouteSpec(
        summary="This document: the OpenAPI 3.1 description of every route", scope=None,
        response=dict[str, Any], tags=("meta",)))
