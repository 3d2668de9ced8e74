"""PlannerStatistics against real PostgreSQL: ANALYZE after a burst of new runs, not before,
and the write path reporting only runs it really created.

Each test gets a fresh database with the migrations applied (Debian PostgreSQL 15).
"""

from __future__ import annotations

import anyio
import psycopg
import pytest

from mlrun.server.ports.keys import Principal
from mlrun.server.ports.run_metadata import CardinalityLimits
from mlrun.server.ports.write_path import BatchWrite, PointColumns, WriteReservation
from mlrun.server.storage.postgres.client import Postgres
from mlrun.server.storage.postgres.metadata import MetadataStore
from mlrun.server.storage.postgres.planner_statistics import PlannerStatistics
from mlrun.server.usecases.ingest import Ingest
from mlrun.wire.schemas import InitRun

pytestmark = pytest.mark.timeout(120)
DEADLINE_S = 60
WRITER = Principal(key_id="writer", scopes=frozenset({"write"}))


def insert_runs(dsn: str, count: int, offset: int = 0) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO projects (name) VALUES ('p') ON CONFLICT DO NOTHING")
        conn.execute(
            "INSERT INTO runs (run_id, project_id, name) SELECT 'r' || i, id, 'r' || i"
            " FROM projects, generate_series(%s::int, %s::int) AS i WHERE projects.name = 'p'",
            (offset, offset + count - 1))


def counted_runs(dsn: str) -> float:
    """What the planner believes `runs` holds (-1 or 0 before any ANALYZE)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = 'runs'::regclass"
                           ).fetchone()
    assert row is not None
    return float(row[0])


async def test_analyzes_after_a_burst_of_new_runs_and_not_before(
    pg: Postgres, pg_dsn: str
) -> None:
    refreshed = anyio.Event()

    def on_refreshed() -> None:
        refreshed.set()

    statistics = PlannerStatistics(pg, min_changed_runs=10, changed_fraction=0.5,
                                   min_interval_s=0.0, on_refreshed=on_refreshed)
    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as group:
            await group.start(statistics.serve)
            insert_runs(pg_dsn, 100)
            statistics.note_runs_created(9)
            await anyio.sleep(0.3)  # the serve loop had every chance to run
            assert statistics.analyzed == 0 and counted_runs(pg_dsn) <= 0

            statistics.note_runs_created(91)  # past the 10-run minimum: due
            await refreshed.wait()
            assert statistics.analyzed == 1 and counted_runs(pg_dsn) == 100
            refreshed = anyio.Event()

            # Now half of what PostgreSQL counted (50 runs) is due, not the 10-run minimum.
            insert_runs(pg_dsn, 60, offset=1000)
            statistics.note_runs_created(49)
            await anyio.sleep(0.3)
            assert statistics.analyzed == 1
            statistics.note_runs_created(11)
            await refreshed.wait()
            assert statistics.analyzed == 2 and counted_runs(pg_dsn) == 160
            group.cancel_scope.cancel()


class NoMetricWrites:
    """A write path for use-cases that must not write metrics here: any use fails the test."""

    def reserve_nowait(self, run_id: str, metrics: PointColumns,
                       system_metrics: PointColumns) -> WriteReservation:
        raise AssertionError("init_run wrote metrics")

    async def reserve(self, run_id: str, metrics: PointColumns, system_metrics: PointColumns,
                      *, wait_s: float) -> WriteReservation:
        raise AssertionError("init_run wrote metrics")

    async def holds(self, write: BatchWrite, *, timeout_s: float) -> bool:
        raise AssertionError("init_run read metrics")

    def committed_unmarked(self, run_id: str, batch_id: str) -> bool:
        raise AssertionError("init_run asked about a batch")


async def test_the_write_path_reports_only_runs_it_created(pg: Postgres) -> None:
    created: list[int] = []
    ingest = Ingest(MetadataStore(pg), write_path=NoMetricWrites(),
                    cardinality=CardinalityLimits(), on_runs_created=created.append)
    with anyio.fail_after(DEADLINE_S):
        first, _ = await ingest.init_run(WRITER, InitRun(project="p", run_id="a"))
        again, _ = await ingest.init_run(WRITER, InitRun(project="p", run_id="a"))
        other, _ = await ingest.init_run(WRITER, InitRun(project="p"))
    assert (first.created, again.created, other.created) == (True, False, True)
    assert created == [1, 1]
