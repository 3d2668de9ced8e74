"""Run listing against real PostgreSQL (the Debian 15 cluster and the embedded 16): every filter,
every sort in both directions, every page boundary, cursor stability under concurrent inserts,
sorting by a metric's last value (with real ClickHouse), project-scoped keys, and the plan of
the issue's hot query (a page of 100 filtered by a tag and a param over 10k runs) using indexes.

Expectations are computed in Python from the seeded rows, independently of the SQL: filters as
set comprehensions, orders as Python sorts (names are plain ASCII of one shape, so the cluster's
collation orders them as Python does).
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import pytest

from mlrun.server.errors import InvalidInput, PermissionDenied
from mlrun.server.ports.keys import Principal
from mlrun.server.protocols.clickhouse import METRIC_COLUMNS, encode_metric_rows
from mlrun.server.storage.clickhouse.client import ClickHouse
from mlrun.server.storage.clickhouse.http_client import open_http_clickhouse
from mlrun.server.storage.clickhouse.metric_reads import MetricQueries
from mlrun.server.storage.clickhouse.migrations import apply_clickhouse_migrations
from mlrun.server.storage.postgres.client import Postgres
from mlrun.server.storage.postgres.run_reads import NUMERIC_VALUE, RunQueries
from mlrun.server.usecases.listing import RunListing, build_listing
from mlrun.server.usecases.queries import Queries

from backends.clickhouse import ClickHouseServer

pytestmark = [pytest.mark.timeout(300), pytest.mark.postgres_engines("debian", "embedded")]

DEADLINE_S = 120
READER = Principal(key_id="reader", scopes=frozenset({"read"}))
BASE = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
LR_VALUES = ["0.1", "0.01", "1e-3", "0.0001", "1", "3", "-2.5", ".5", "5.", "1e+20", "1e400",
             "adam", "nan", "inf", "true", "", "1e4000", "0x10"]
_NUMBER = re.compile(r"^[-+]?([0-9]+([.][0-9]*)?|[.][0-9]+)([eE][-+]?[0-9]{1,3})?$")


@dataclass
class SeededRun:
    run_id: str
    project: str
    name: str
    status: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    @property
    def duration(self) -> timedelta | None:
        return None if self.finished_at is None else self.finished_at - self.created_at


def make_runs(count: int, seed: int = 1) -> list[SeededRun]:
    rng = random.Random(seed)
    runs = []
    for index in range(count):
        created = BASE + timedelta(seconds=index // 3)  # ties in threes: run_id breaks them
        status = rng.choice(["running", "finished", "failed", "killed"])
        finished = None if status == "running" else created + timedelta(
            seconds=rng.choice([5, 60, 60, 3600]))
        tags = {"team": rng.choice(["cv", "nlp", "rl"])}
        if rng.random() < 0.3:
            tags["gpu"] = rng.choice(["a100", "h100"])
        params = {"lr": rng.choice(LR_VALUES), "opt": rng.choice(["adam", "sgd"])}
        if rng.random() < 0.2:
            del params["lr"]
        runs.append(SeededRun(
            run_id=f"run-{index:05d}", project="alpha" if index % 5 else "beta",
            name=f"exp-{rng.randrange(1000):03d}-{index:05d}", status=status, created_at=created,
            updated_at=created + timedelta(seconds=rng.randrange(10_000)), finished_at=finished,
            tags=tags, params=params))
    return runs


def seed(dsn: str, runs: list[SeededRun]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        for project in sorted({r.project for r in runs}):
            cur.execute("INSERT INTO projects (name) VALUES (%s) ON CONFLICT DO NOTHING",
                        (project,))
        projects: dict[str, int] = dict(
            cur.execute("SELECT name, id FROM projects").fetchall())
        with cur.copy("COPY runs (run_id, project_id, name, status, created_at, updated_at,"
                      " finished_at) FROM STDIN") as copy:
            for r in runs:
                copy.write_row((r.run_id, projects[r.project], r.name, r.status, r.created_at,
                                r.updated_at, r.finished_at))
        with cur.copy("COPY run_tags (run_id, key, value) FROM STDIN") as copy:
            for r in runs:
                for key, value in r.tags.items():
                    copy.write_row((r.run_id, key, value))
        with cur.copy("COPY run_params (run_id, key, value) FROM STDIN") as copy:
            for r in runs:
                for key, value in r.params.items():
                    copy.write_row((r.run_id, key, value))
        cur.execute("ANALYZE")


@pytest.fixture
async def ch(clickhouse_server: ClickHouseServer,
             clickhouse_database: str) -> AsyncIterator[ClickHouse]:
    async with open_http_clickhouse(
        host=clickhouse_server.host, port=clickhouse_server.port, user=clickhouse_server.user,
        password=clickhouse_server.password, database=clickhouse_database,
    ) as opened:
        with anyio.fail_after(DEADLINE_S):
            await apply_clickhouse_migrations(opened)
        yield opened


@pytest.fixture
async def seeded(pg: Postgres, pg_dsn: str) -> list[SeededRun]:
    runs = make_runs(300)
    await anyio.to_thread.run_sync(seed, pg_dsn, runs)
    return runs


@pytest.fixture
def queries(pg: Postgres, ch: ClickHouse) -> Queries:
    return Queries(RunQueries(pg), MetricQueries(ch))


def listing(**fields: Any) -> RunListing:
    defaults: dict[str, Any] = dict(
        project=None, statuses=(), tags=(), params=(), text=None, created_after=None,
        created_before=None, sort="-created_at", limit=100, cursor=None, include_total=False)
    return build_listing(**{**defaults, **fields})


async def walk(queries: Queries, principal: Principal = READER, **fields: Any) -> list[str]:
    """Every page of a listing, following next_cursor; checks each page's size."""
    limit = fields.get("limit", 100)
    seen: list[str] = []
    cursor = None
    with anyio.fail_after(DEADLINE_S):
        for _ in range(10_000):
            page = await queries.list_runs(principal, listing(**{**fields, "cursor": cursor}))
            assert len(page.runs) <= limit
            seen += [run.run_id for run in page.runs]
            cursor = page.next_cursor
            if cursor is None:
                return seen
            assert len(page.runs) == limit  # a page that is not the last is full
    raise AssertionError("too many pages")


def numeric(text: str) -> Decimal | None:
    return Decimal(text) if _NUMBER.match(text) else None


def expected_order(runs: list[SeededRun], column: str, descending: bool) -> list[str]:
    def key(run: SeededRun) -> Any:
        if column == "duration":
            return run.duration
        return getattr(run, column)

    present = [r for r in runs if key(r) is not None]
    absent = [r for r in runs if key(r) is None]
    ordered = sorted(present, key=lambda r: (key(r), r.run_id), reverse=descending)
    return [r.run_id for r in ordered] + sorted((r.run_id for r in absent), reverse=descending)


# --------------------------------------------------------------------------- filters


Predicate = Callable[[SeededRun], bool]


def param_matches(op: str, operand: str) -> Predicate:
    def matches(run: SeededRun) -> bool:
        value = run.params.get("lr")
        if value is None:
            return False
        if op == "=":
            return value == operand
        if op == "!=":
            return value != operand
        number = numeric(value)
        if number is None:
            return False
        target = Decimal(operand)
        return {">": number > target, ">=": number >= target, "<": number < target,
                "<=": number <= target}[op]
    return matches


FILTERS: list[tuple[dict[str, Any], Predicate]] = [
    ({"project": "beta"}, lambda r: r.project == "beta"),
    ({"project": "no-such-project"}, lambda r: False),
    ({"statuses": ["failed"]}, lambda r: r.status == "failed"),
    ({"statuses": ["finished", "killed"]}, lambda r: r.status in ("finished", "killed")),
    ({"tags": ["gpu"]}, lambda r: "gpu" in r.tags),
    ({"tags": ["team=cv"]}, lambda r: r.tags["team"] == "cv"),
    ({"tags": ["team=cv", "gpu=h100"]}, lambda r: r.tags["team"] == "cv"
     and r.tags.get("gpu") == "h100"),
    ({"tags": ["nope"]}, lambda r: False),
    ({"params": ["lr=adam"]}, param_matches("=", "adam")),
    ({"params": ["lr="]}, param_matches("=", "")),
    ({"params": ["lr!=adam"]}, param_matches("!=", "adam")),
    ({"params": ["lr>0.01"]}, param_matches(">", "0.01")),
    ({"params": ["lr>=0.01"]}, param_matches(">=", "0.01")),
    ({"params": ["lr<1e-3"]}, param_matches("<", "1e-3")),
    ({"params": ["lr<=1e-3"]}, param_matches("<=", "1e-3")),
    ({"params": ["lr>1e300"]}, param_matches(">", "1e300")),
    ({"params": ["lr<-1"]}, param_matches("<", "-1")),
    ({"params": ["lr>0", "opt=sgd"], "tags": ["team=nlp"]},
     lambda r: param_matches(">", "0")(r) and r.params["opt"] == "sgd"
     and r.tags["team"] == "nlp"),
    ({"text": "EXP-1"}, lambda r: "exp-1" in r.name),
    ({"text": "run-0004"}, lambda r: "run-0004" in r.run_id),
    ({"created_after": BASE + timedelta(seconds=30)},
     lambda r: r.created_at >= BASE + timedelta(seconds=30)),
    ({"created_before": BASE + timedelta(seconds=30)},
     lambda r: r.created_at < BASE + timedelta(seconds=30)),
    ({"created_after": BASE + timedelta(seconds=10), "created_before": BASE + timedelta(
        seconds=20), "project": "alpha"},
     lambda r: BASE + timedelta(seconds=10) <= r.created_at < BASE + timedelta(seconds=20)
     and r.project == "alpha"),
]


@pytest.mark.parametrize(("fields", "predicate"), FILTERS)
async def test_every_filter_matches_exactly_what_it_says(
    queries: Queries, seeded: list[SeededRun], fields: dict[str, Any], predicate: Predicate
) -> None:
    expected = expected_order([r for r in seeded if predicate(r)], "created_at", True)
    assert await walk(queries, limit=37, **fields) == expected
    with anyio.fail_after(DEADLINE_S):
        page = await queries.list_runs(READER, listing(include_total=True, limit=5, **fields))
    assert page.total == len(expected)


@pytest.mark.parametrize("column", ["created_at", "updated_at", "name", "status", "duration"])
@pytest.mark.parametrize("descending", [True, False])
async def test_every_sort_walks_every_run_once_in_order(
    queries: Queries, seeded: list[SeededRun], column: str, descending: bool
) -> None:
    sort = ("-" if descending else "") + column
    expected = expected_order(seeded, column, descending)
    assert await walk(queries, sort=sort, limit=23) == expected
    assert await walk(queries, sort=sort, limit=1000) == expected


@pytest.mark.parametrize("limit", [1, 59, 60, 61])
async def test_page_boundaries(queries: Queries, seeded: list[SeededRun], limit: int) -> None:
    beta = expected_order([r for r in seeded if r.project == "beta"], "created_at", True)
    assert len(beta) == 60
    assert await walk(queries, project="beta", limit=limit) == beta
    with anyio.fail_after(DEADLINE_S):
        page = await queries.list_runs(READER, listing(project="beta", limit=limit))
        assert (page.next_cursor is None) == (limit >= 60)
        empty = await queries.list_runs(READER, listing(project="gamma", include_total=True))
    assert empty.runs == [] and empty.next_cursor is None and empty.total == 0


async def test_pages_stay_stable_while_runs_are_created_and_finished(
    queries: Queries, seeded: list[SeededRun], pg_dsn: str
) -> None:
    expected = expected_order(seeded, "created_at", True)
    seen: list[str] = []
    cursor = None
    late = 0
    with anyio.fail_after(DEADLINE_S):
        while True:
            page = await queries.list_runs(READER, listing(limit=40, cursor=cursor))
            seen += [run.run_id for run in page.runs]
            cursor = page.next_cursor
            if cursor is None:
                break
            late += 1
            newcomers = [SeededRun(
                run_id=f"late-{late}-{i}", project="alpha", name="late", status="running",
                created_at=BASE + timedelta(seconds=when), updated_at=BASE, finished_at=None)
                for i, when in enumerate((1_000, 50, -5))]
            await anyio.to_thread.run_sync(seed, pg_dsn, newcomers)
    # Every run that existed before the walk appears exactly once, in order; runs created
    # meanwhile appear only where the walk had not been yet.
    original = [run_id for run_id in seen if run_id.startswith("run-")]
    assert original == expected
    assert len(seen) == len(set(seen))


async def test_a_project_scoped_key_sees_only_its_project(
    queries: Queries, seeded: list[SeededRun]
) -> None:
    beta_key = Principal(key_id="k", scopes=frozenset({"read"}), project="beta")
    beta = expected_order([r for r in seeded if r.project == "beta"], "created_at", True)
    assert await walk(queries, principal=beta_key, limit=50) == beta
    assert await walk(queries, principal=beta_key, project="beta") == beta
    with pytest.raises(PermissionDenied):
        await walk(queries, principal=beta_key, project="alpha")
    writer_only = Principal(key_id="w", scopes=frozenset({"write"}))
    with pytest.raises(PermissionDenied):
        await walk(queries, principal=writer_only)


async def test_sort_by_a_metrics_last_value_with_ties_and_missing_values(
    queries: Queries, seeded: list[SeededRun], ch: ClickHouse
) -> None:
    rng = random.Random(5)
    last: dict[str, float] = {}
    rows = []
    version = 1
    for run in seeded[:200]:
        if run.run_id.endswith("7"):
            continue  # no loss at all: sorts last
        final = float(rng.choice([0.1, 0.2, 0.3, 0.25, 0.5]))  # many ties
        for step, value in ((0, 9.0), (3, final), (1, 7.0)):  # out of order
            rows.append((run.run_id, "loss", step, value, 0, version))
            version += 1
        last[run.run_id] = final
    with anyio.fail_after(DEADLINE_S):
        await ch.insert_rowbinary("metrics", METRIC_COLUMNS, encode_metric_rows(rows),
                                  timeout_s=DEADLINE_S)
    for descending in (False, True):
        with_value = sorted((r for r in seeded if r.run_id in last),
                            key=lambda r: (last[r.run_id], r.run_id), reverse=descending)
        without = sorted((r.run_id for r in seeded if r.run_id not in last), reverse=descending)
        expected = [r.run_id for r in with_value] + without
        sort = ("-" if descending else "") + "metric:loss"
        assert await walk(queries, sort=sort, limit=17) == expected
    filtered = await walk(queries, sort="metric:loss", tags=["team=cv"], limit=1000)
    assert filtered == [i for i in await walk(queries, sort="metric:loss", limit=1000)
                        if next(r for r in seeded if r.run_id == i).tags["team"] == "cv"]


async def test_malformed_filters_name_their_parameter(queries: Queries) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"params": ["lr"]}, "params"), ({"params": ["lr>x"]}, "params"),
        ({"params": ["lr>1e5000"]}, "params"), ({"params": [">1"]}, "params"),
        ({"tags": ["=v"]}, "tags"), ({"statuses": ["paused"]}, "status"),
        ({"sort": "size"}, "sort"), ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"),
        ({"text": "a\x00"}, "q"), ({"cursor": "AAAA"}, "cursor"),
    ]
    for fields, name in cases:
        with pytest.raises(InvalidInput) as caught:
            await queries.list_runs(READER, listing(**fields))
        assert caught.value.field == name, fields


async def test_a_tag_and_param_filtered_page_over_10k_runs_is_served_by_indexes(
    queries: Queries, pg_dsn: str
) -> None:
    runs = make_runs(10_000, seed=3)
    await anyio.to_thread.run_sync(seed, pg_dsn, runs)

    def explain(statement: str, *args: Any) -> str:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            rows = conn.execute("EXPLAIN " + statement, args).fetchall()
        return "\n".join(row[0] for row in rows)

    # The project as its id, as storage.run_queries sends it (looked up first).
    page_sql = (
        "SELECT r.run_id FROM runs r WHERE r.project_id = %s AND EXISTS (SELECT 1"
        " FROM run_tags t WHERE t.run_id = r.run_id AND t.key = %s"
        " AND md5(t.value) = md5(%s) AND t.value = %s) AND EXISTS (SELECT 1 FROM run_params q"
        " WHERE q.run_id = r.run_id"
        f" AND q.key = %s AND {NUMERIC_VALUE} > %s) ORDER BY r.created_at DESC, r.run_id DESC"
        " LIMIT 101")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT id FROM projects WHERE name = 'alpha'").fetchone()
    assert row is not None
    plan = await anyio.to_thread.run_sync(
        lambda: explain(page_sql, row[0], "team", "cv", "cv", "lr", Decimal("0.001")))
    # Whichever way the planner starts (the project's runs in created_at order, or the tag
    # and numeric param indexes when they are selective), no table is read whole.
    for table in ("runs", "run_tags", "run_params"):
        assert f"Seq Scan on {table}" not in plan, plan
    assert "runs_project_created_idx" in plan or "run_params_key_numeric_idx" in plan, plan
    numeric_plan = await anyio.to_thread.run_sync(lambda: explain(
        f"SELECT q.run_id FROM run_params q WHERE q.key = %s AND {NUMERIC_VALUE} > %s",
        "lr", Decimal("100")))
    assert "run_params_key_numeric_idx" in numeric_plan, numeric_plan

    expected = expected_order(
        [r for r in runs if r.project == "alpha" and r.tags["team"] == "cv"
         and param_matches(">", "0.001")(r)], "created_at", True)
    assert await walk(queries, project="alpha", tags=["team=cv"], params=["lr>0.001"],
                      limit=100) == expected
