"""HTTP routes of the data lifecycle: `DELETE /api/v1/runs/{run_id}`,
`DELETE /api/v1/projects/{project}` and `GET /api/v1/purge_jobs/{job_id}` (all need the `admin`
scope; a project-scoped admin acts only on its project).

Only translation lives here: path parameters, the API key, status codes. The rules (what a
delete removes at once, what the purge job does later) live in `usecases.lifecycle`.

Must not import storage drivers.
"""

from __future__ import annotations

from mlrun.server.edges.http.api import path_run_id
from mlrun.server.edges.http.app import Request, Response, Router, RouteSpec
from mlrun.server.edges.lifecycle_params import job_id, project_name
from mlrun.server.usecases.auth import Authenticator
from mlrun.server.usecases.lifecycle import Lifecycle
from mlrun.wire.lifecycle import PurgeJobInfo


def add_lifecycle_routes(router: Router, lifecycle: Lifecycle,
                         authenticator: Authenticator) -> None:
    async def delete_run(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        job = await lifecycle.delete_run(principal, path_run_id(request))
        return Response.json(job, status=202)

    async def delete_project(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        job = await lifecycle.delete_project(principal,
                                             project_name(request.path_params["project"]))
        return Response.json(job, status=202)

    async def get_job(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        return Response.json(
            await lifecycle.get_job(principal, job_id(request.path_params["job_id"])))

    tags = ("lifecycle",)
    router.add("DELETE", "/api/v1/runs/{run_id}", delete_run, RouteSpec(
        summary="Delete a run: gone from every read at once; a purge job removes its data",
        scope="admin", response=PurgeJobInfo, success_status=202,
        errors=(400, 401, 403, 404), tags=tags))
    router.add("DELETE", "/api/v1/projects/{project}", delete_project, RouteSpec(
        summary="Delete a project with its runs and project-scoped keys; a purge job removes"
                " their data", scope="admin", response=PurgeJobInfo, success_status=202,
        errors=(400, 401, 403, 404), tags=tags))
    router.add("GET", "/api/v1/purge_jobs/{job_id}", get_job, RouteSpec(
        summary="A purge job's state and progress", scope="admin", response=PurgeJobInfo,
        errors=(400, 401, 403, 404), tags=tags))
