"""`mlrun.v1.LifecycleService` over the lifecycle use-cases (`usecases.lifecycle.Lifecycle`):
DeleteRun, DeleteProject, GetPurgeJob, the gRPC twins of the HTTP routes in
`edges.http.lifecycle_api` (same validation, same errors, timestamps as epoch milliseconds).

Must not import trio, asyncio, storage drivers or the HTTP edge's app.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mlrun.server.edges import payloads
from mlrun.server.edges.grpc import artifact_methods
from mlrun.server.edges.lifecycle_params import job_id, project_name
from mlrun.server.ports.keys import Principal
from mlrun.server.usecases.auth import Authenticator
from mlrun.server.usecases.lifecycle import Lifecycle
from mlrun.wire.lifecycle import PurgeJobInfo
from mlrun.wire.proto.mlrun.v1 import lifecycle_grpc, lifecycle_pb2


def _ms(iso: str | None) -> int:
    return 0 if iso is None else int(datetime.fromisoformat(iso).timestamp() * 1000)


def render_job(job: PurgeJobInfo) -> lifecycle_pb2.PurgeJob:
    message = lifecycle_pb2.PurgeJob(
        job_id=job.job_id, kind=job.kind, target=job.target, project=job.project,
        state=job.state, phase=job.phase, runs=job.runs, objects_total=job.objects_total,
        objects_deleted=job.objects_deleted, ledger_rows_deleted=job.ledger_rows_deleted,
        attempts=job.attempts, last_error=job.last_error or "",
        created_at_ms=_ms(job.created_at), not_before_ms=_ms(job.not_before),
        updated_at_ms=_ms(job.updated_at), finished_at_ms=_ms(job.finished_at))
    if job.points_removed is not None:
        message.points_removed = job.points_removed
    if job.clickhouse_seconds is not None:
        message.clickhouse_seconds = job.clickhouse_seconds
    return message


class LifecycleServicer(lifecycle_grpc.LifecycleServiceServicer):
    """Pass `LifecycleServicer(...).service` to `serve_grpc`. Methods take a second parameter
    named `request` (purerpc passes the call's headers to it), hence the `override` ignores."""

    def __init__(self, *, lifecycle: Lifecycle, authenticator: Authenticator) -> None:
        self._lifecycle = lifecycle
        self._authenticator = authenticator

    def _principal(self, request: Any) -> Principal:
        return artifact_methods.principal_from_metadata(
            self._authenticator, request.custom_metadata or ())

    async def DeleteRun(  # type: ignore[override]
        self, message: lifecycle_pb2.DeleteRunRequest, request: Any
    ) -> lifecycle_pb2.PurgeJob:
        principal = self._principal(request)
        return render_job(await self._lifecycle.delete_run(principal,
                                                           payloads.run_id(message.run_id)))

    async def DeleteProject(  # type: ignore[override]
        self, message: lifecycle_pb2.DeleteProjectRequest, request: Any
    ) -> lifecycle_pb2.PurgeJob:
        principal = self._principal(request)
        return render_job(await self._lifecycle.delete_project(principal,
                                                               project_name(message.project)))

    async def GetPurgeJob(  # type: ignore[override]
        self, message: lifecycle_pb2.GetPurgeJobRequest, request: Any
    ) -> lifecycle_pb2.PurgeJob:
        principal = self._principal(request)
        return render_job(await self._lifecycle.get_job(principal, job_id(message.job_id)))
