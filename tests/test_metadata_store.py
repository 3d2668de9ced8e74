"""MetadataStore (the write path's PostgreSQL side) against real PostgreSQL.

Every test gets a fresh database with the migrations applied. Most run twice, on the Debian
PostgreSQL 15 cluster and on the embedded pgserver (PostgreSQL 16); the races (many concurrent
transactions, two pools standing in for two server processes) run on the Debian cluster.
No mocks: concurrency is real concurrency, a "restart" is a closed and reopened pool.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import psycopg
import pytest

from mlrun.server import errors
from mlrun.server.ports.run_metadata import BatchPreparation, CardinalityLimits
from mlrun.server.storage.postgres.client import Postgres, apply_postgres_migrations, open_postgres
from mlrun.server.storage.postgres.metadata import MetadataStore
from mlrun.server.storage.postgres.run_data import render_param_value
from mlrun.wire.schemas import InitRun, Param, Tag

pytestmark = [pytest.mark.timeout(120), pytest.mark.postgres_engines("debian", "embedded")]

TEST_DEADLINE_S = 60
LIMITS = CardinalityLimits()
HASH_A = b"\x01" * 32
HASH_B = b"\x02" * 32


@asynccontextmanager
async def _open_migrated(dsn: str) -> AsyncIterator[Postgres]:
    async with open_postgres(dsn, max_connections=8) as pg:
        with anyio.fail_after(TEST_DEADLINE_S):
            await apply_postgres_migrations(pg)
        yield pg


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[Postgres]:
    async with _open_migrated(pg_dsn) as opened:
        yield opened


@pytest.fixture
async def debian_pg(postgres_dsn: str) -> AsyncIterator[Postgres]:
    async with _open_migrated(postgres_dsn) as opened:
        yield opened


async def _rows(pg: Postgres, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    def fetch(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
        return conn.execute(query, params).fetchall()

    return await pg.run(fetch, timeout_s=10)


async def _new_run(store: MetadataStore, project: str = "p", **kwargs: Any) -> str:
    created, _ = await store.init_run(InitRun(project=project, **kwargs), limits=LIMITS)
    return created.run_id


async def _prepare(
    store: MetadataStore,
    run_id: str,
    batch_id: str | None = "b1",
    *,
    payload_hash: bytes = HASH_A,
    names: Sequence[str] = ("loss",),
    params: Sequence[Param] = (),
    tags: Sequence[Tag] = (),
    limits: CardinalityLimits = LIMITS,
    first_version: int = 1000,
) -> BatchPreparation:
    return await store.prepare_batch(
        run_id=run_id,
        batch_id=batch_id,
        payload_hash=payload_hash,
        seq=1,
        points=10,
        first_version=first_version,
        metric_names=names,
        params=params,
        tags=tags,
        limits=limits,
    )


# --- projects ------------------------------------------------------------------------------


async def test_create_and_list_projects(pg: Postgres) -> None:
    store = MetadataStore(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        beta = await store.create_project("beta", "second")
        await store.create_project("alpha", "")
        with pytest.raises(errors.Conflict) as caught:
            await store.create_project("beta", "again")
        projects = await store.list_projects()
    assert caught.value.code == "project_exists"
    assert caught.value.field == "name"
    assert caught.value.http_status == 409
    assert [(p.name, p.description) for p in projects] == [("alpha", ""), ("beta", "second")]
    assert beta.created_at.endswith("Z")
    assert datetime.fromisoformat(beta.created_at).utcoffset() is not None
    assert projects[1].created_at == beta.created_at


# --- runs ----------------------------------------------------------------------------------


async def test_init_run_creates_project_on_first_use_and_is_idempotent(pg: Postgres) -> None:
    store = MetadataStore(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        first, warnings = await store.init_run(InitRun(project="vision"), limits=LIMITS)
        again, _ = await store.init_run(
            InitRun(project="vision", run_id=first.run_id, name="other"), limits=LIMITS
        )
        named, _ = await store.init_run(
            InitRun(project="vision", run_id="my-run.1", name="resnet"), limits=LIMITS
        )
        with pytest.raises(errors.Conflict) as caught:
            await store.init_run(InitRun(project="nlp", run_id=first.run_id), limits=LIMITS)
        projects = await store.list_projects()
    assert warnings == []
    assert first.created and first.status == "running" and first.project == "vision"
    assert len(first.run_id) == 32 and int(first.run_id, 16) >= 0
    assert first.name == first.run_id  # a run without a name is named after its id
    assert (again.created, again.run_id, again.name) == (False, first.run_id, first.name)
    assert (named.run_id, named.name, named.created) == ("my-run.1", "resnet", True)
    assert caught.value.code == "run_project_mismatch" and caught.value.field == "project"
    # The refused init created nothing: project "nlp" does not exist.
    assert [p.name for p in projects] == ["vision"]


async def test_concurrent_inits_of_one_new_run(pg: Postgres) -> None:
    store = MetadataStore(pg)
    results: list[bool] = []

    async def init() -> None:
        created, _ = await store.init_run(
            InitRun(project="fresh", run_id="shared-run", tags={"k": "v"}, config={"lr": 0.1}),
            limits=LIMITS,
        )
        results.append(created.created)

    with anyio.fail_after(TEST_DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(init)
        runs = await _rows(pg, "SELECT run_id FROM runs")
        projects = await _rows(pg, "SELECT name FROM projects")
        params = await _rows(pg, "SELECT key, value FROM run_params")
    assert sorted(results) == [False] * 19 + [True]
    assert runs == [("shared-run",)] and projects == [("fresh",)]
    assert params == [("lr", "0.1")]


async def test_init_run_stores_config_as_canonical_write_once_params(pg: Postgres) -> None:
    store = MetadataStore(pg)
    config: dict[str, str | int | float | bool | None] = {
        "lr": 0.1, "epochs": 10, "tiny": 1e-5, "big": 2**70, "amp": True, "ema": False,
        "scheduler": None, "optimizer": "adamw", "bad": float("nan"), "top": float("-inf"),
    }
    with anyio.fail_after(TEST_DEADLINE_S):
        created, warnings = await store.init_run(
            InitRun(project="p", run_id="r1", config=config), limits=LIMITS
        )
        # Resuming the run: the same values are fine, a changed one is kept and warned about.
        _, rewarnings = await store.init_run(
            InitRun(project="p", run_id="r1", config={"lr": 0.2, "epochs": 10, "new": "x"}),
            limits=LIMITS,
        )
        rows = dict(await _rows(pg, "SELECT key, value FROM run_params WHERE run_id = 'r1'"))
    assert created.created and warnings == []
    assert rows == {
        "lr": "0.1", "epochs": "10", "tiny": "1e-05", "big": str(2**70), "amp": "true",
        "ema": "false", "scheduler": "null", "optimizer": "adamw", "bad": "nan", "top": "-inf",
        "new": "x",
    }
    assert [(w.code, w.field) for w in rewarnings] == [("param_conflict", "config.lr")]


def test_render_param_value_round_trips() -> None:
    for value in (0.1, 1 / 3, 1e300, -0.0, 5e-324, 123456789.123456789):
        assert float(render_param_value(value)) == value
    assert math.isnan(float(render_param_value(float("nan"))))
    assert int(render_param_value(-(2**80))) == -(2**80)
    assert render_param_value(True) == "true" and render_param_value(1) == "1"
    assert render_param_value(None) == "null" and render_param_value("0.10") == "0.10"


async def test_init_run_tags_are_limited_per_run(pg: Postgres) -> None:
    store = MetadataStore(pg)
    limits = CardinalityLimits(max_tag_keys_per_run=2)
    with anyio.fail_after(TEST_DEADLINE_S):
        _, warnings = await store.init_run(
            InitRun(project="p", run_id="r1", tags={"c": "3", "a": "1", "b": "2"}), limits=limits
        )
        rows = await _rows(pg, "SELECT key, value FROM run_tags ORDER BY key")
    assert rows == [("a", "1"), ("b", "2")]  # admitted in sorted order
    assert [(w.code, w.field, w.limit, w.dropped) for w in warnings] == [
        ("tag_keys_limit", "tags", 2, 1)
    ]


async def test_finish_run(pg: Postgres) -> None:
    store = MetadataStore(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)
        finished = await store.finish_run(run_id, "failed")
        again = await store.finish_run(run_id, "failed")
        with pytest.raises(errors.Conflict) as other_status:
            await store.finish_run(run_id, "finished")
        with pytest.raises(errors.NotFound) as unknown:
            await store.finish_run("nope", "finished")
        # Init of a finished run finds it again and stores nothing more.
        reinit, warnings = await store.init_run(
            InitRun(project="p", run_id=run_id, config={"late": 1}, tags={"late": "1"}),
            limits=LIMITS,
        )
        rows = await _rows(pg, "SELECT status, finished_at FROM runs")
        late = await _rows(
            pg, "SELECT (SELECT count(*) FROM run_params), (SELECT count(*) FROM run_tags)"
        )
    assert (finished.status, again.status) == ("failed", "failed")
    assert other_status.value.code == "run_finished"
    assert unknown.value.code == "run_not_found" and unknown.value.field == "run_id"
    assert rows[0][0] == "failed" and rows[0][1] is not None
    assert (reinit.created, reinit.status, warnings, late) == (False, "failed", [], [(0, 0)])


async def test_heartbeat(pg: Postgres) -> None:
    store = MetadataStore(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)
        before = await _rows(pg, "SELECT last_heartbeat_at FROM runs")
        state = await store.heartbeat(run_id)
        after = await _rows(pg, "SELECT last_heartbeat_at FROM runs")
        await store.finish_run(run_id, "killed")
        with pytest.raises(errors.Conflict) as finished:
            await store.heartbeat(run_id)
        with pytest.raises(errors.NotFound) as unknown:
            await store.heartbeat("nope")
    assert before == [(None,)] and after[0][0] is not None
    assert state.status == "running"
    assert finished.value.code == "run_finished"
    assert unknown.value.code == "run_not_found"


# --- the ledger ----------------------------------------------------------------------------


async def test_batch_outcomes(pg: Postgres) -> None:
    store = MetadataStore(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)
        new = await _prepare(store, run_id)
        # The first attempt never reached mark_committed; the retry is told to write the
        # versions the first attempt was given, not its own.
        retry = await _prepare(store, run_id, first_version=2000)
        await store.mark_batch_committed(run_id, "b1")
        duplicate = await _prepare(store, run_id)
        with pytest.raises(errors.Conflict) as conflict:
            await _prepare(store, run_id, payload_hash=HASH_B)
        unnamed = await _prepare(store, run_id, batch_id=None)
        await store.mark_batch_committed(run_id, None)  # a no-op, not an error
        ledger = await _rows(pg, "SELECT batch_id, payload_hash, state, points FROM ingest_batches")
    assert new == BatchPreparation("new", frozenset({"loss"}), [], 1000)
    assert retry == BatchPreparation("retry", frozenset({"loss"}), [], 1000)
    assert duplicate == BatchPreparation("duplicate", frozenset(), [], 1000)
    assert conflict.value.code == "batch_conflict" and conflict.value.field == "batch_id"
    assert unnamed.outcome == "new"
    assert [(w.code, w.field) for w in unnamed.warnings] == [("not_deduplicated", "batch_id")]
    assert ledger == [("b1", HASH_A, "committed", 10)]


async def test_batch_into_unknown_or_finished_run(pg: Postgres) -> None:
    store = MetadataStore(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        with pytest.raises(errors.NotFound) as unknown:
            await _prepare(store, "nope")
        run_id = await _new_run(store)
        await store.finish_run(run_id, "finished")
        with pytest.raises(errors.Conflict) as finished:
            await _prepare(store, run_id, params=[Param(name="x", value=1)])
        with pytest.raises(errors.Conflict) as finished_unnamed:
            await _prepare(store, run_id, batch_id=None)
        written = await _rows(
            pg,
            "SELECT (SELECT count(*) FROM ingest_batches), (SELECT count(*) FROM run_params),"
            " (SELECT count(*) FROM run_metric_names)",
        )
    assert unknown.value.code == "run_not_found" and unknown.value.http_status == 404
    assert finished.value.code == "run_finished" and finished.value.http_status == 409
    assert finished_unnamed.value.code == "run_finished"
    assert written == [(0, 0, 0)]


async def test_oversized_values_are_refused_before_any_write(pg: Postgres) -> None:
    store = MetadataStore(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)
        with pytest.raises(errors.InvalidInput) as param:
            # Past the column's 32000 bytes (in characters it would pass an unchecked caller).
            await _prepare(store, run_id, params=[Param(name="note", value="€" * 11_000)])
        with pytest.raises(errors.InvalidInput) as name:
            await _prepare(store, run_id, names=["é" * 200])
        ledger = await _rows(pg, "SELECT count(*) FROM ingest_batches")
    assert (param.value.code, param.value.field) == ("value_too_long", "params.note")
    assert (name.value.code, name.value.field) == ("value_too_long", "metrics")
    assert ledger == [(0,)]


async def test_fifty_concurrent_identical_batches(debian_pg: Postgres) -> None:
    store = MetadataStore(debian_pg)
    outcomes: list[str] = []
    failures: list[BaseException] = []

    async def submit() -> None:
        try:
            prepared = await _prepare(store, run_id, "same", names=["loss", "acc"])
            if prepared.outcome != "duplicate":
                await store.mark_batch_committed(run_id, "same")
            outcomes.append(prepared.outcome)
        except errors.MlrunError as exc:
            failures.append(exc)

    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(submit)
        ledger = await _rows(debian_pg, "SELECT batch_id, state FROM ingest_batches")
        names = await _rows(debian_pg, "SELECT name FROM run_metric_names ORDER BY name")
    assert failures == []
    assert len(outcomes) == 50
    assert outcomes.count("new") == 1
    assert set(outcomes) <= {"new", "retry", "duplicate"}
    assert ledger == [("same", "committed")]
    assert names == [("acc",), ("loss",)]


async def test_ledger_survives_reopening_the_pool(postgres_dsn: str) -> None:
    with anyio.fail_after(TEST_DEADLINE_S):
        async with _open_migrated(postgres_dsn) as pg:
            store = MetadataStore(pg)
            run_id = await _new_run(store)
            await _prepare(store, run_id, "done")
            await store.mark_batch_committed(run_id, "done")
            await _prepare(store, run_id, "half")  # "crash" before its points were committed
        async with _open_migrated(postgres_dsn) as pg:
            store = MetadataStore(pg)
            done = await _prepare(store, run_id, "done")
            half = await _prepare(store, run_id, "half")
            with pytest.raises(errors.Conflict) as conflict:
                await _prepare(store, run_id, "done", payload_hash=HASH_B)
    assert done.outcome == "duplicate"
    assert half.outcome == "retry"
    assert conflict.value.code == "batch_conflict"


# --- cardinality, params, tags -------------------------------------------------------------


async def test_metric_names_limit(pg: Postgres) -> None:
    store = MetadataStore(pg)
    limits = CardinalityLimits(max_metric_names_per_run=3)
    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)
        first = await _prepare(store, run_id, "1", names=["b", "a"], limits=limits)
        second = await _prepare(store, run_id, "2", names=["e", "a", "d", "c"], limits=limits)
        known = await _prepare(store, run_id, "3", names=["c", "b", "a"], limits=limits)
        full = await _prepare(store, run_id, "4", names=["z", "a"], limits=limits)
        stored = await _rows(pg, "SELECT name FROM run_metric_names ORDER BY name")
    assert first.admitted_metric_names == {"a", "b"} and first.warnings == []
    assert second.admitted_metric_names == {"a", "c"}  # new names admitted in sorted order
    assert [(w.code, w.field, w.limit, w.dropped) for w in second.warnings] == [
        ("metric_names_limit", "metrics", 3, 2)
    ]
    assert known.admitted_metric_names == {"a", "b", "c"} and known.warnings == []
    assert full.admitted_metric_names == {"a"} and full.warnings[0].dropped == 1
    assert stored == [("a",), ("b",), ("c",)]


async def test_params_are_write_once(pg: Postgres) -> None:
    store = MetadataStore(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)
        first = await _prepare(
            store, run_id, "1",
            params=[Param(name="lr", value=0.1), Param(name="x", value=1),
                    Param(name="x", value=2)],
        )
        same = await _prepare(store, run_id, "2", params=[Param(name="lr", value=0.1)])
        changed = await _prepare(
            store, run_id, "3",
            params=[Param(name="lr", value=0.2), Param(name="opt", value="sgd")],
        )
        rows = await _rows(pg, "SELECT key, value FROM run_params ORDER BY key")
    assert [(w.code, w.field) for w in first.warnings] == [("param_conflict", "params.x")]
    assert same.warnings == []
    # The clash is a warning, not a refusal: the batch's metrics are still admitted.
    assert changed.outcome == "new" and changed.admitted_metric_names == {"loss"}
    assert [(w.code, w.field) for w in changed.warnings] == [("param_conflict", "params.lr")]
    assert rows == [("lr", "0.1"), ("opt", "sgd"), ("x", "1")]


async def test_tags_upsert_and_limits(pg: Postgres) -> None:
    store = MetadataStore(pg)
    limits = CardinalityLimits(max_tag_keys_per_run=3, max_tags_per_project=4)
    with anyio.fail_after(TEST_DEADLINE_S):
        run1 = await _new_run(store, "p")
        run2 = await _new_run(store, "p")
        await _prepare(store, run1, "1", tags=[Tag(key="a", value="1"), Tag(key="b", value="1")],
                       limits=limits)
        upsert = await _prepare(
            store, run1, "2",
            tags=[Tag(key="a", value="2"), Tag(key="a", value="3"), Tag(key="d", value="1"),
                  Tag(key="c", value="1")],
            limits=limits,
        )
        project = await _prepare(
            store, run2, "1",
            tags=[Tag(key="f", value="1"), Tag(key="e", value="1"), Tag(key="a", value="9")],
            limits=limits,
        )
        run_tags = await _rows(pg, "SELECT run_id, key, value FROM run_tags ORDER BY 1, 2")
        project_keys = await _rows(pg, "SELECT key FROM project_tag_keys ORDER BY key")
    assert [(w.code, w.limit, w.dropped) for w in upsert.warnings] == [("tag_keys_limit", 3, 1)]
    assert [(w.code, w.field, w.limit, w.dropped) for w in project.warnings] == [
        ("project_tags_limit", "tags", 4, 1)
    ]
    assert run_tags == sorted([
        (run1, "a", "3"), (run1, "b", "1"), (run1, "c", "1"),  # last value wins; d dropped
        (run2, "a", "9"), (run2, "e", "1"),  # a known to the project; f over its limit
    ])
    assert project_keys == [("a",), ("b",), ("c",), ("e",)]


async def test_cardinality_limits_hold_across_two_server_processes(postgres_dsn: str) -> None:
    """Two pools with their own stores stand in for two server processes racing for names."""
    limits = CardinalityLimits(
        max_metric_names_per_run=10, max_tag_keys_per_run=1000, max_tags_per_project=7
    )
    admitted: list[frozenset[str]] = []

    async def race(store: MetadataStore, worker: int, run_id: str) -> None:
        for batch in range(6):
            prepared = await _prepare(
                store, run_id, f"w{worker}-{batch}",
                names=[f"m{worker}-{batch}-{i}" for i in range(3)] + ["shared"],
                tags=[Tag(key=f"t{worker}-{batch}", value="v")],
                limits=limits,
            )
            admitted.append(prepared.admitted_metric_names)

    with anyio.fail_after(TEST_DEADLINE_S):
        async with (
            open_postgres(postgres_dsn, max_connections=4) as pg_a,
            open_postgres(postgres_dsn, max_connections=4) as pg_b,
        ):
            await apply_postgres_migrations(pg_a)
            await apply_postgres_migrations(pg_b)
            store_a, store_b = MetadataStore(pg_a), MetadataStore(pg_b)
            run_1 = await _new_run(store_a, "shared-project")
            run_2 = await _new_run(store_b, "shared-project")
            async with anyio.create_task_group() as tg:
                for worker in range(8):
                    store = store_a if worker % 2 else store_b
                    tg.start_soon(race, store, worker, run_1 if worker < 4 else run_2)
            names = await _rows(
                pg_a, "SELECT run_id, count(*) FROM run_metric_names GROUP BY run_id"
            )
            stored_names = {
                name for (name,) in await _rows(pg_a, "SELECT name FROM run_metric_names")
            }
            project_keys = await _rows(pg_b, "SELECT count(*) FROM project_tag_keys")
            tag_keys = await _rows(pg_b, "SELECT count(DISTINCT key) FROM run_tags")
    assert sorted(count for _, count in names) == [10, 10]
    assert len(admitted) == 48
    assert frozenset().union(*admitted) == stored_names  # nothing admitted that was not stored
    assert project_keys == [(7,)] and tag_keys == [(7,)]


async def test_known_names_batch_is_one_round_trip_with_its_own_answer(pg: Postgres) -> None:
    """A batch with an id, no params or tags and only metric names the run has is claimed by
    one autocommit statement (Postgres.run_statement), not a BEGIN/claim/COMMIT transaction;
    concurrent ones share one (the first goes alone, the four that queued behind it go
    together: `statement_groups`) and each gets its own answer, and every other case still
    gets the transaction's answer."""
    store = MetadataStore(pg)
    calls = {"run": 0, "run_statement": 0}
    real_run, real_statement = pg.run, pg.run_statement

    async def run(fn: Any, *, timeout_s: float = 10.0) -> Any:
        calls["run"] += 1
        return await real_run(fn, timeout_s=timeout_s)

    async def run_statement(fn: Any, *, timeout_s: float = 10.0) -> Any:
        calls["run_statement"] += 1
        return await real_statement(fn, timeout_s=timeout_s)

    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)
        first = await _prepare(store, run_id, "b0")  # "loss" is new: the full transaction
        await store.mark_batch_committed(run_id, "b0")
        pg.run, pg.run_statement = run, run_statement  # type: ignore[method-assign]
        answers: dict[str, BatchPreparation] = {}

        async def send(batch_id: str) -> None:
            answers[batch_id] = await _prepare(store, run_id, batch_id, first_version=7)

        async with anyio.create_task_group() as tg:
            for i in range(1, 6):
                tg.start_soon(send, f"b{i}")
        fast_calls = dict(calls)
        duplicate = await _prepare(store, run_id, "b0")
        with pytest.raises(errors.Conflict) as conflict:
            await _prepare(store, run_id, "b1", payload_hash=HASH_B)
        retry = await _prepare(store, run_id, "b2", first_version=99)
        new_name = await _prepare(store, run_id, "b6", names=("loss", "acc"))
        with pytest.raises(errors.NotFound) as unknown:
            await _prepare(store, "nope", "b1")
        pg.run, pg.run_statement = real_run, real_statement  # type: ignore[method-assign]
        await store.finish_run(run_id, "finished")
        with pytest.raises(errors.Conflict) as finished:
            await _prepare(store, run_id, "b7")
        ledger = await _rows(pg, "SELECT batch_id, state FROM ingest_batches ORDER BY batch_id")
    assert first == BatchPreparation("new", frozenset({"loss"}), [], 1000)
    assert fast_calls == {"run": 0, "run_statement": 2}
    assert answers == {f"b{i}": BatchPreparation("new", frozenset({"loss"}), [], 7)
                       for i in range(1, 6)}
    assert duplicate == BatchPreparation("duplicate", frozenset(), [], 1000)
    assert conflict.value.code == "batch_conflict"
    assert retry == BatchPreparation("retry", frozenset({"loss"}), [], 7)
    assert new_name == BatchPreparation("new", frozenset({"loss", "acc"}), [], 1000)
    assert unknown.value.code == "run_not_found"
    assert finished.value.code == "run_finished"
    assert ledger == [("b0", "committed")] + [(f"b{i}", "pending") for i in range(1, 7)]
