"""What the data-lifecycle API sends and answers (`DELETE /api/v1/runs/{run_id}`,
`DELETE /api/v1/projects/{project}`, `GET /api/v1/purge_jobs/{job_id}`): msgspec Structs, one
place for the server and any client. Must not import the server."""

from __future__ import annotations

from typing import Literal

import msgspec

PurgeKind = Literal["run", "project"]
PurgeState = Literal["pending", "running", "done"]
PurgePhase = Literal["objects", "clickhouse", "ledger", "done"]


class PurgeJobInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A purge job as the API shows it. `state`: pending (waiting for its settle time or a
    worker), running, done. `phase`: what the worker does next (objects, clickhouse, ledger),
    `done` at the end. `points_removed` is counted in ClickHouse before its rows are deleted
    (metrics and system metrics); timestamps are ISO-8601 UTC."""

    job_id: str
    kind: PurgeKind
    target: str
    project: str
    state: PurgeState
    phase: PurgePhase
    runs: int
    objects_total: int
    objects_deleted: int
    points_removed: int | None
    clickhouse_seconds: float | None
    ledger_rows_deleted: int
    attempts: int
    last_error: str | None
    created_at: str
    not_before: str
    updated_at: str
    finished_at: str | None
