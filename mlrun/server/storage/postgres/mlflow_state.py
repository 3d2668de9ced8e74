"""PostgreSQL side of the MLflow edge: `MlflowStateStore` implements the `MlflowState` port on the
side tables of sql/postgres/0006_mlflow.sql (mlflow_experiments, mlflow_experiment_tags,
mlflow_runs, mlflow_run_inputs, mlflow_step0_origins), next to the projects and runs they extend.

Every method is one `Postgres.run` call (one transaction, bounded by `timeout_s`); the reads
of a single SELECT (`experiments`, `run_extras`, `inputs`, `origins_of`, on every MLflow run and
experiment read) are one `Postgres.run_statement` call instead (autocommit: one round trip, no
BEGIN/COMMIT, same deadline). Keys and
values are checked against the columns' limits before any SQL (400 `value_too_long` naming the
field), so a constraint violation never becomes a 500.

Must not import trio or asyncio, the edges, ClickHouse or artifact storage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from mlrun.server import errors
from mlrun.server.ports.mlflow_state import (
    DatasetInput,
    ExperimentRecord,
    LifecycleStage,
    RunExtras,
    Step0Origins,
)
from mlrun.server.storage.postgres.client import Postgres
from mlrun.server.storage.postgres.metadata import run_not_found
from mlrun.server.storage.postgres.run_data import MAX_KEY_BYTES, check_bytes
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.schemas import MAX_VALUE_BYTES

MAX_USER_ID_BYTES = 256
RUN_NAME_TAG = "mlflow.runName"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _project_not_found(project_id: int) -> errors.NotFound:
    return errors.NotFound(f"experiment {project_id} does not exist",
                           code=ErrorCode.PROJECT_NOT_FOUND, field="experiment_id")


_EXPERIMENTS_SQL = """
SELECT p.id, p.name, coalesce(e.lifecycle_stage, 'active'),
    (extract(epoch FROM p.created_at) * 1000)::bigint,
    coalesce(e.last_update_ms, (extract(epoch FROM p.created_at) * 1000)::bigint),
    coalesce((SELECT jsonb_object_agg(t.key, t.value) FROM mlflow_experiment_tags t
              WHERE t.project_id = p.id), '{}'::jsonb)
FROM projects p LEFT JOIN mlflow_experiments e ON e.project_id = p.id
"""


class MlflowStateStore:
    def __init__(self, pg: Postgres, *, timeout_s: float = 5.0) -> None:
        self._pg = pg
        self._timeout_s = timeout_s

    # --- experiments ---------------------------------------------------------------------------

    async def experiments(self, *, ids: Sequence[int] | None = None,
                          names: Sequence[str] | None = None) -> list[ExperimentRecord]:
        def select(conn: psycopg.Connection[Any]) -> list[ExperimentRecord]:
            if ids is not None:
                rows = conn.execute(_EXPERIMENTS_SQL + " WHERE p.id = ANY(%s) ORDER BY p.id",
                                    (list(ids),)).fetchall()
            elif names is not None:
                rows = conn.execute(_EXPERIMENTS_SQL + " WHERE p.name = ANY(%s) ORDER BY p.id",
                                    (list(names),)).fetchall()
            else:
                rows = conn.execute(_EXPERIMENTS_SQL + " ORDER BY p.id").fetchall()
            return [ExperimentRecord(project_id=r[0], name=r[1], lifecycle_stage=r[2],
                                     creation_time_ms=r[3], last_update_time_ms=r[4],
                                     tags=dict(r[5])) for r in rows]

        return await self._pg.run_statement(select, timeout_s=self._timeout_s)

    async def touch_experiment(self, project_id: int, *,
                               lifecycle_stage: LifecycleStage | None = None,
                               new_name: str | None = None) -> None:
        now_ms = _now_ms()

        def touch(conn: psycopg.Connection[Any]) -> None:
            if new_name is not None:
                taken = conn.execute("SELECT id FROM projects WHERE name = %s AND id <> %s",
                                     (new_name, project_id)).fetchone()
                if taken is not None:
                    raise errors.Conflict(f"experiment {new_name!r} already exists",
                                          code=ErrorCode.PROJECT_EXISTS, field="new_name")
                updated = conn.execute("UPDATE projects SET name = %s WHERE id = %s",
                                       (new_name, project_id))
            else:
                updated = conn.execute("SELECT 1 FROM projects WHERE id = %s", (project_id,))
            if updated.rowcount == 0:
                raise _project_not_found(project_id)
            conn.execute(
                "INSERT INTO mlflow_experiments (project_id, lifecycle_stage, last_update_ms)"
                " VALUES (%(id)s, coalesce(%(stage)s, 'active'), %(now)s)"
                " ON CONFLICT (project_id) DO UPDATE SET last_update_ms = %(now)s,"
                " lifecycle_stage = coalesce(%(stage)s, mlflow_experiments.lifecycle_stage)",
                {"id": project_id, "stage": lifecycle_stage, "now": now_ms})

        await self._pg.run(touch, timeout_s=self._timeout_s)

    async def set_experiment_tags(self, project_id: int, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            check_bytes("key", key, MAX_KEY_BYTES)
            check_bytes("value", value, MAX_VALUE_BYTES)

        def upsert(conn: psycopg.Connection[Any]) -> None:
            if conn.execute("SELECT 1 FROM projects WHERE id = %s FOR NO KEY UPDATE",
                            (project_id,)).fetchone() is None:
                raise _project_not_found(project_id)
            for key in sorted(tags):
                conn.execute(
                    "INSERT INTO mlflow_experiment_tags (project_id, key, value)"
                    " VALUES (%s, %s, %s) ON CONFLICT (project_id, key)"
                    " DO UPDATE SET value = excluded.value", (project_id, key, tags[key]))

        await self._pg.run(upsert, timeout_s=self._timeout_s)

    async def delete_experiment_tag(self, project_id: int, key: str) -> None:
        def delete(conn: psycopg.Connection[Any]) -> None:
            deleted = conn.execute(
                "DELETE FROM mlflow_experiment_tags WHERE project_id = %s AND key = %s",
                (project_id, key))
            if deleted.rowcount == 0:
                raise errors.NotFound(f"experiment {project_id} has no tag {key!r}",
                                      code=ErrorCode.NOT_FOUND, field="key")

        await self._pg.run(delete, timeout_s=self._timeout_s)

    # --- runs ----------------------------------------------------------------------------------

    async def record_run(self, run_id: str, *, start_time_ms: int, user_id: str) -> None:
        check_bytes("user_id", user_id, MAX_USER_ID_BYTES)
        await self._pg.run(lambda conn: conn.execute(
            "INSERT INTO mlflow_runs (run_id, start_time_ms, user_id) VALUES (%s, %s, %s)"
            " ON CONFLICT (run_id) DO NOTHING", (run_id, start_time_ms, user_id)),
            timeout_s=self._timeout_s)

    async def run_extras(self, run_ids: Sequence[str]) -> dict[str, RunExtras]:
        def select(conn: psycopg.Connection[Any]) -> dict[str, RunExtras]:
            rows = conn.execute(
                "SELECT r.run_id, r.project_id,"
                " coalesce(m.start_time_ms, (extract(epoch FROM r.created_at) * 1000)::bigint),"
                " coalesce(m.end_time_ms, (extract(epoch FROM r.finished_at) * 1000)::bigint),"
                " coalesce(m.user_id, ''), coalesce(m.lifecycle_stage, 'active')"
                " FROM runs r LEFT JOIN mlflow_runs m ON m.run_id = r.run_id"
                " WHERE r.run_id = ANY(%s)", (list(run_ids),)).fetchall()
            return {r[0]: RunExtras(project_id=r[1], start_time_ms=r[2], end_time_ms=r[3],
                                    user_id=r[4], lifecycle_stage=r[5]) for r in rows}

        return await self._pg.run_statement(select, timeout_s=self._timeout_s)

    async def update_run(self, run_id: str, *, end_time_ms: int | None = None,
                         name: str | None = None,
                         lifecycle_stage: LifecycleStage | None = None) -> None:
        if name is not None:
            check_bytes("run_name", name, 1024)

        def update(conn: psycopg.Connection[Any]) -> None:
            found = conn.execute(
                "UPDATE runs SET name = coalesce(%s, name) WHERE run_id = %s",
                (name, run_id))
            if found.rowcount == 0:
                raise run_not_found(run_id)
            if name is not None:  # MLflow shows the name as this tag too
                conn.execute(
                    "INSERT INTO run_tags (run_id, key, value) VALUES (%s, %s, %s)"
                    " ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
                    (run_id, RUN_NAME_TAG, name))
            conn.execute(
                "INSERT INTO mlflow_runs (run_id, start_time_ms, end_time_ms, lifecycle_stage)"
                " SELECT run_id, (extract(epoch FROM created_at) * 1000)::bigint, %(end)s,"
                " coalesce(%(stage)s, 'active') FROM runs WHERE run_id = %(run)s"
                " ON CONFLICT (run_id) DO UPDATE SET"
                " end_time_ms = coalesce(%(end)s, mlflow_runs.end_time_ms),"
                " lifecycle_stage = coalesce(%(stage)s, mlflow_runs.lifecycle_stage)",
                {"end": end_time_ms, "stage": lifecycle_stage, "run": run_id})

        await self._pg.run(update, timeout_s=self._timeout_s)

    async def delete_tag(self, run_id: str, key: str) -> bool:
        def delete(conn: psycopg.Connection[Any]) -> bool:
            deleted = conn.execute("DELETE FROM run_tags WHERE run_id = %s AND key = %s",
                                   (run_id, key))
            return deleted.rowcount > 0

        return await self._pg.run(delete, timeout_s=self._timeout_s)

    async def log_inputs(self, run_id: str, inputs: Sequence[DatasetInput]) -> None:
        for index, one in enumerate(inputs):
            check_bytes(f"datasets[{index}].dataset.name", one.dataset.get("name", ""), 500)
            check_bytes(f"datasets[{index}].dataset.digest", one.dataset.get("digest", ""), 256)

        def insert(conn: psycopg.Connection[Any]) -> None:
            if conn.execute("SELECT 1 FROM runs WHERE run_id = %s",
                            (run_id,)).fetchone() is None:
                raise run_not_found(run_id)
            for one in inputs:
                conn.execute(
                    "INSERT INTO mlflow_run_inputs (run_id, name, digest, dataset, tags)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (run_id, name, digest)"
                    " DO UPDATE SET dataset = excluded.dataset, tags = excluded.tags",
                    (run_id, one.dataset.get("name", ""), one.dataset.get("digest", ""),
                     Jsonb(one.dataset), Jsonb(one.tags)))

        await self._pg.run(insert, timeout_s=self._timeout_s)

    async def inputs(self, run_ids: Sequence[str]) -> dict[str, list[DatasetInput]]:
        def select(conn: psycopg.Connection[Any]) -> dict[str, list[DatasetInput]]:
            found: dict[str, list[DatasetInput]] = {}
            for run_id, dataset, tags in conn.execute(
                    "SELECT run_id, dataset, tags FROM mlflow_run_inputs WHERE run_id = ANY(%s)"
                    " ORDER BY run_id, name, digest", (list(run_ids),)):
                found.setdefault(run_id, []).append(DatasetInput(dataset=dataset, tags=tags))
            return found

        return await self._pg.run_statement(select, timeout_s=self._timeout_s)

    async def step0_origins(self, run_id: str, claim: Mapping[str, int]) -> Step0Origins:
        names = sorted(claim)

        def claim_origins(conn: psycopg.Connection[Any]) -> Step0Origins:
            start = conn.execute(
                "SELECT coalesce(m.start_time_ms,"
                " (extract(epoch FROM r.created_at) * 1000)::bigint)"
                " FROM runs r LEFT JOIN mlflow_runs m ON m.run_id = r.run_id"
                " WHERE r.run_id = %s", (run_id,)).fetchone()
            if start is None:
                raise run_not_found(run_id)
            conn.execute(
                "INSERT INTO mlflow_step0_origins (run_id, name, first_ms)"
                " SELECT %s, n, f FROM unnest(%s::text[], %s::bigint[]) AS c(n, f)"
                " ON CONFLICT (run_id, name) DO NOTHING",
                (run_id, names, [claim[n] for n in names]))
            rows = conn.execute(
                "SELECT name, first_ms FROM mlflow_step0_origins"
                " WHERE run_id = %s AND name = ANY(%s)", (run_id, names)).fetchall()
            return Step0Origins(run_start_ms=start[0], first_ms=dict(rows))

        return await self._pg.run(claim_origins, timeout_s=self._timeout_s)

    async def origins_of(self, run_ids: Sequence[str]) -> dict[str, Step0Origins]:
        def select(conn: psycopg.Connection[Any]) -> dict[str, Step0Origins]:
            rows = conn.execute(
                "SELECT o.run_id, o.name, o.first_ms, coalesce(m.start_time_ms,"
                " (extract(epoch FROM r.created_at) * 1000)::bigint)"
                " FROM mlflow_step0_origins o JOIN runs r ON r.run_id = o.run_id"
                " LEFT JOIN mlflow_runs m ON m.run_id = o.run_id"
                " WHERE o.run_id = ANY(%s)", (list(run_ids),)).fetchall()
            found: dict[str, Step0Origins] = {}
            for run_id, name, first_ms, start_ms in rows:
                found.setdefault(run_id, Step0Origins(start_ms, {})).first_ms[name] = first_ms
            return found

        return await self._pg.run_statement(select, timeout_s=self._timeout_s)
