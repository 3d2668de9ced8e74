"""HTTP routes of the write API (`/api/v1/...`): decode, authenticate, call `Ingest`, encode.

Only translation lives here: msgspec decoding (a malformed body is 400 `malformed_json`; a wrong
type or value is 400 `invalid_field` naming the field, e.g. `metrics[3].step`), the API key
from the headers, and the status code of each answer. Every rule about what is stored lives in
`mlrun.server.usecases.ingest`, shared with the gRPC edge.

Must not import storage drivers.
"""

from __future__ import annotations

import msgspec

from mlrun.server.edges import payloads
from mlrun.server.edges.http.app import Request, Response, Router, RouteSpec
from mlrun.server.ports.keys import Principal
from mlrun.server.usecases.auth import Authenticator
from mlrun.server.usecases.ingest import Ingest
from mlrun.wire.schemas import (
    CreateProject,
    FinishRun,
    IngestBatchBody,
    IngestResult,
    InitRun,
    Project,
    ProjectList,
    RunCreatedWithWarnings,
    RunState,
)

# The HTTP routes' name for JSON decoding (one implementation, in mlrun.server.edges.payloads).
decode_body = payloads.decode_json


def path_run_id(request: Request) -> str:
    return payloads.run_id(request.path_params["run_id"])


def add_write_routes(router: Router, ingest: Ingest, authenticator: Authenticator) -> None:
    def principal_of(request: Request) -> Principal:
        return authenticator.authenticate(request.headers)

    async def create_project(request: Request) -> Response:
        principal = principal_of(request)
        project = await ingest.create_project(principal, decode_body(request.body, CreateProject))
        return Response.json(project, status=201)

    async def list_projects(request: Request) -> Response:
        principal = principal_of(request)
        return Response.json(ProjectList(projects=await ingest.list_projects(principal)))

    async def init_run(request: Request) -> Response:
        principal = principal_of(request)
        created, warnings = await ingest.init_run(principal, decode_body(request.body, InitRun))
        body = RunCreatedWithWarnings(**msgspec.structs.asdict(created), warnings=warnings)
        return Response.json(body, status=201 if created.created else 200)

    async def log_batch(request: Request) -> Response:
        principal = principal_of(request)
        body = decode_body(request.body, IngestBatchBody)
        result = await ingest.log_batch(principal, body.batch())
        return Response.json(result)

    async def finish_run(request: Request) -> Response:
        principal = principal_of(request)
        run_id = path_run_id(request)
        finish = decode_body(request.body, FinishRun) if request.body.strip() else FinishRun()
        return Response.json(await ingest.finish_run(principal, run_id, finish.status))

    async def heartbeat(request: Request) -> Response:
        principal = principal_of(request)
        return Response.json(await ingest.heartbeat(principal, path_run_id(request)))

    tags = ("write",)
    router.add("POST", "/api/v1/projects", create_project, RouteSpec(
        summary="Create a project", scope="write", request=CreateProject, response=Project,
        success_status=201, errors=(400, 401, 403, 409), tags=tags))
    router.add("GET", "/api/v1/projects", list_projects, RouteSpec(
        summary="List projects", scope="read", response=ProjectList, errors=(401, 403),
        tags=tags))
    router.add("POST", "/api/v1/runs", init_run, RouteSpec(
        summary="Start a run (idempotent on run_id; the project is created on first use)",
        scope="write", request=InitRun, response=RunCreatedWithWarnings, success_status=201,
        other_success_statuses=(200,), errors=(400, 401, 403, 409), tags=tags))
    router.add("POST", "/api/v1/ingest/batch", log_batch, RouteSpec(
        summary="Log a batch of metrics, params and tags (idempotent on run_id + batch_id)",
        scope="write", request=IngestBatchBody, response=IngestResult,
        errors=(400, 401, 403, 404, 409, 429), tags=tags))
    router.add("POST", "/api/v1/runs/{run_id}/finish", finish_run, RouteSpec(
        summary="Finish a run", scope="write", request=FinishRun, response=RunState,
        errors=(400, 401, 403, 404, 409), tags=tags))
    router.add("POST", "/api/v1/runs/{run_id}/heartbeat", heartbeat, RouteSpec(
        summary="Record that a run is alive", scope="write", response=RunState,
        errors=(400, 401, 403, 404, 409), tags=tags))
