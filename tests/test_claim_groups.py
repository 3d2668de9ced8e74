"""The common batch's ledger claims, grouped (`storage.postgres.statement_groups` behind
`MetadataStore.prepare_batch`), against real PostgreSQL (the Debian cluster; each test on a
fresh database).

A statement is held "in flight" the way production holds one: another connection keeps an
uncommitted ledger row that the leader's claim must wait for (the ON CONFLICT wait), so the
claims submitted meanwhile queue in a known order. Statements and transactions are counted by
wrapping the pool's two entry points (they still run for real). The only fault injected is a
driver error on cue, for the per-batch fallback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import anyio.abc
import psycopg
import pytest

from bench.claims import measure, render
from mlrun.server import errors
from mlrun.server.ports.run_metadata import BatchPreparation, CardinalityLimits
from mlrun.server.storage.postgres.client import Postgres, apply_postgres_migrations, open_postgres
from mlrun.server.storage.postgres.metadata import MetadataStore
from mlrun.wire.schemas import InitRun

pytestmark = pytest.mark.timeout(120)

TEST_DEADLINE_S = 60
LIMITS = CardinalityLimits()
HASH_A = b"\x01" * 32
HASH_B = b"\x02" * 32
Outcome = BatchPreparation | errors.MlrunError


@contextmanager
def _counting(pg: Postgres) -> Iterator[dict[str, int]]:
    """Counts `run` (transactions) and `run_statement` (autocommit statements) calls."""
    calls = {"run": 0, "run_statement": 0}
    real_run, real_statement = pg.run, pg.run_statement

    async def run(fn: Any, *, timeout_s: float = 10.0) -> Any:
        calls["run"] += 1
        return await real_run(fn, timeout_s=timeout_s)

    async def run_statement(fn: Any, *, timeout_s: float = 10.0) -> Any:
        calls["run_statement"] += 1
        return await real_statement(fn, timeout_s=timeout_s)

    pg.run, pg.run_statement = run, run_statement  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        pg.run, pg.run_statement = real_run, real_statement  # type: ignore[method-assign]


@asynccontextmanager
async def _held_ledger_row(dsn: str, run_id: str, batch_id: str) -> AsyncIterator[None]:
    """Another session inserts (run_id, batch_id) into the ledger and keeps it uncommitted
    until the block ends (then rolls back): a claim of that key waits meanwhile."""
    conn = await anyio.to_thread.run_sync(lambda: psycopg.connect(dsn, autocommit=False))
    try:
        await anyio.to_thread.run_sync(lambda: conn.execute(
            "INSERT INTO ingest_batches (run_id, batch_id, payload_hash, points)"
            " VALUES (%s, %s, %s, 0)", (run_id, batch_id, HASH_B)))
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(conn.rollback)
            await anyio.to_thread.run_sync(conn.close)


async def _new_run(store: MetadataStore, names: Sequence[str] = ("loss",)) -> str:
    """A running run that already knows `names` (its first batch, b0, is committed)."""
    created, _ = await store.init_run(InitRun(project="p"), limits=LIMITS)
    await _prepare(store, created.run_id, "b0", names=names)
    await store.mark_batch_committed(created.run_id, "b0")
    return created.run_id


async def _prepare(store: MetadataStore, run_id: str, batch_id: str, *,
                   payload_hash: bytes = HASH_A, names: Sequence[str] = ("loss",),
                   first_version: int = 1000, seq: int | None = 1) -> BatchPreparation:
    return await store.prepare_batch(
        run_id=run_id, batch_id=batch_id, payload_hash=payload_hash, seq=seq, points=10,
        first_version=first_version, metric_names=names, params=(), tags=(), limits=LIMITS)


async def _answer(store: MetadataStore, run_id: str, batch_id: str, **kwargs: Any) -> Outcome:
    try:
        return await _prepare(store, run_id, batch_id, **kwargs)
    except errors.MlrunError as exc:
        return exc


async def _ledger(pg: Postgres, run_id: str) -> dict[str, tuple[bytes, str, int | None]]:
    def fetch(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
        return conn.execute("SELECT batch_id, payload_hash, state, first_version"
                            " FROM ingest_batches WHERE run_id = %s", (run_id,)).fetchall()

    return {b: (bytes(h), s, v) for b, h, s, v in await pg.run(fetch, timeout_s=10)}


class _Answers(dict[str, Outcome]):
    """Answers by label; `count_reaches(n)` waits until n are in."""

    def __init__(self) -> None:
        super().__init__()
        self._waits: list[tuple[int, anyio.Event]] = []

    def __setitem__(self, label: str, outcome: Outcome) -> None:
        super().__setitem__(label, outcome)
        for n, event in self._waits:
            if len(self) >= n:
                event.set()

    async def count_reaches(self, n: int) -> None:
        event = anyio.Event()
        self._waits.append((n, event))
        if len(self) >= n:
            event.set()
        await event.wait()


def _code(outcome: Outcome) -> str:
    assert isinstance(outcome, errors.MlrunError), outcome
    return str(outcome.code)


@asynccontextmanager
async def _statement_in_flight(
    dsn: str, run_id: str, lead: Callable[[], Awaitable[None]], held_batch_id: str,
    followers: Sequence[Callable[[], Awaitable[None]]],
) -> AsyncIterator[anyio.abc.TaskGroup]:
    """Start `lead`, whose claim of `held_batch_id` waits for the ledger row another session
    holds, then each follower once the one before it is blocked (queued behind the statement,
    in this order). The row is released when the block ends; then every send finishes."""
    async with anyio.create_task_group() as tg, _held_ledger_row(dsn, run_id, held_batch_id):
        tg.start_soon(lead)
        await anyio.wait_all_tasks_blocked()
        for follower in followers:
            tg.start_soon(follower)
            await anyio.wait_all_tasks_blocked()
        yield tg


def _new(first_version: int, names: Sequence[str] = ("loss",)) -> BatchPreparation:
    return BatchPreparation("new", frozenset(names), [], first_version)


async def test_every_outcome_through_one_grouped_statement(pg: Postgres, pg_dsn: str
                                                          ) -> None:
    """Claims queued behind a statement in flight go as ONE statement and each gets the
    answer the transaction gives it alone: new, duplicate, 409 conflict, 404 unknown run, 409
    finished run from the statement; new metric names, a pending claim (retry, with its first
    attempt's versions) and a key repeated within the group are left to the transaction,
    which answers the repeats as sequential arrivals (the second copy a retry, a different
    payload a conflict)."""
    store = MetadataStore(pg)
    answers: dict[str, Outcome] = {}
    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)
        finished = await _new_run(store)
        await store.finish_run(finished, "finished")
        await _prepare(store, run_id, "dup")
        await store.mark_batch_committed(run_id, "dup")
        await _prepare(store, run_id, "pend", first_version=7)
        await _prepare(store, run_id, "conf")

        def send(label: str, target: str, batch_id: str, **kwargs: Any
                 ) -> Callable[[], Awaitable[None]]:
            async def go() -> None:
                answers[label] = await _answer(store, target, batch_id, **kwargs)
            return go

        group = [
            send("new", run_id, "b-new", first_version=11),
            send("duplicate", run_id, "dup", first_version=12),
            send("conflict", run_id, "conf", payload_hash=HASH_B),
            send("retry", run_id, "pend", first_version=13),
            send("unknown run", "nope", "b1"),
            send("finished run", finished, "b1"),
            send("new names", run_id, "b-names", names=("loss", "acc"), first_version=14),
            send("twice 1", run_id, "b-twice", first_version=15),
            send("twice 2", run_id, "b-twice", first_version=16),
            send("twice other", run_id, "b-twice", payload_hash=HASH_B, first_version=17),
        ]
        with _counting(pg) as calls:
            async with _statement_in_flight(
                    pg_dsn, run_id, send("lead", run_id, "b-lead", first_version=10), "b-lead",
                    group):
                pass
        ledger = await _ledger(pg, run_id)
    # The leader's statement, then one for the ten queued claims; the transaction only for
    # the new names, the pending claim and the two later copies of b-twice.
    assert calls == {"run_statement": 2, "run": 4}
    assert store.claim_statistics().largest == 10
    assert answers.pop("lead") == _new(10)
    assert answers.pop("new") == _new(11)
    assert answers.pop("duplicate") == BatchPreparation("duplicate", frozenset(), [], 12)
    assert _code(answers.pop("conflict")) == "batch_conflict"
    assert answers.pop("retry") == BatchPreparation("retry", frozenset({"loss"}), [], 7)
    assert _code(answers.pop("unknown run")) == "run_not_found"
    assert _code(answers.pop("finished run")) == "run_finished"
    assert answers.pop("new names") == _new(14, ("loss", "acc"))
    assert answers.pop("twice 1") == _new(15)
    assert answers.pop("twice 2") == BatchPreparation("retry", frozenset({"loss"}), [], 15)
    assert _code(answers.pop("twice other")) == "batch_conflict"
    assert answers == {}
    assert {b: (s, v) for b, (_, s, v) in ledger.items()} == {
        "b0": ("committed", 1000), "dup": ("committed", 1000), "pend": ("pending", 7),
        "conf": ("pending", 1000), "b-lead": ("pending", 10), "b-new": ("pending", 11),
        "b-names": ("pending", 14), "b-twice": ("pending", 15)}
    assert ledger["b-twice"][0] == HASH_A


async def test_concurrent_claims_share_few_statements(pg: Postgres) -> None:
    """64 batches of 4 runs at once (without seq): a handful of statements, every claim its own
    answer and its own ledger row."""
    store = MetadataStore(pg)
    answers: dict[tuple[str, str], Outcome] = {}
    with anyio.fail_after(TEST_DEADLINE_S):
        runs = [await _new_run(store, names=("loss", "acc")) for _ in range(4)]

        async def send(run_id: str, i: int) -> None:
            # No seq at all: a group whose seq array is all NULL.
            answers[run_id, f"c{i}"] = await _answer(store, run_id, f"c{i}", seq=None,
                                                     names=("acc", "loss"), first_version=i)

        before = store.claim_statistics()
        with _counting(pg) as calls:
            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(send, runs[i % 4], i)
        ledgers = [await _ledger(pg, run_id) for run_id in runs]
    stats = store.claim_statistics()
    assert calls["run"] == 0 and 1 <= calls["run_statement"] <= 3, calls
    assert (stats.statements - before.statements, stats.items - before.items) == (
        calls["run_statement"], 64)
    assert answers == {(runs[i % 4], f"c{i}"): _new(i, ("loss", "acc")) for i in range(64)}
    for r, ledger in enumerate(ledgers):
        assert {b: v for b, (_, s, v) in ledger.items() if s == "pending"} == {
            f"c{i}": i for i in range(r, 64, 4)}


async def test_cancelled_callers_leave_the_group_and_the_queue_moves_on(
        pg: Postgres, pg_dsn: str) -> None:
    """A leader cancelled while its statement is in flight still answers the claims it
    carries, then raises its cancellation; a queued caller that is cancelled leaves the queue
    (its batch is never claimed); the next claim after that is answered at once."""
    store = MetadataStore(pg)
    answers: dict[str, Outcome] = {}
    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)
        leader_scope = anyio.CancelScope()
        quitter_scope = anyio.CancelScope()

        async def lead() -> None:
            with leader_scope:
                answers["lead"] = await _answer(store, run_id, "b-lead")

        async def quit_early() -> None:
            with quitter_scope:
                answers["quitter"] = await _answer(store, run_id, "b-quit")

        async def follow(batch_id: str) -> None:
            answers[batch_id] = await _answer(store, run_id, batch_id, first_version=5)

        async with _statement_in_flight(pg_dsn, run_id, lead, "b-lead",
                                        [lambda: follow("f1"), quit_early, lambda: follow("f2")]):
            quitter_scope.cancel()
            leader_scope.cancel()
            await anyio.wait_all_tasks_blocked()
            assert answers == {}  # the leader waits for its statement (shielded)
        after = await _answer(store, run_id, "b-after", first_version=6)
        ledger = await _ledger(pg, run_id)
    assert leader_scope.cancelled_caught and quitter_scope.cancelled_caught
    assert answers == {"f1": _new(5), "f2": _new(5)}
    assert after == _new(6)
    assert sorted(ledger) == ["b-after", "b-lead", "b0", "f1", "f2"]  # the leader's claim landed
    stats = store.claim_statistics()
    # b0 (new name: the statement leaves it to the transaction), b-lead, [f1 f2], b-after
    assert (stats.statements, stats.abandoned) == (4, 1)


async def test_a_statement_past_its_deadline_fails_its_group_only(
        pg: Postgres, pg_dsn: str) -> None:
    """The group statement is bounded like any call: past `timeout_s` its claims get a
    retryable BackendTimeout (as each would alone), and the claims queued behind it go next."""
    store = MetadataStore(pg, timeout_s=0.5)
    answers = _Answers()
    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)

        async def send(batch_id: str) -> None:
            answers[batch_id] = await _answer(store, run_id, batch_id, first_version=3)

        async with _statement_in_flight(pg_dsn, run_id, lambda: send("b-stuck"), "b-stuck",
                                        [lambda: send("f1"), lambda: send("f2")]):
            with anyio.fail_after(5):
                await answers.count_reaches(3)
    assert isinstance(answers.pop("b-stuck"), errors.BackendTimeout)
    assert answers == {"f1": _new(3), "f2": _new(3)}


async def test_a_driver_error_leaves_each_claim_to_the_transaction(pg: Postgres) -> None:
    """When the grouped statement fails with a driver error (injected here on cue), nothing
    was claimed and every batch gets the transaction's answer instead, one by one."""
    store = MetadataStore(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)
        await _prepare(store, run_id, "dup")
        await store.mark_batch_committed(run_id, "dup")
        real_statement = pg.run_statement

        async def failing(fn: Any, *, timeout_s: float = 10.0) -> Any:
            raise errors.BackendError("injected", backend="postgres", detail="on cue")

        answers: dict[str, Outcome] = {}

        async def send(batch_id: str, first_version: int) -> None:
            answers[batch_id] = await _answer(store, run_id, batch_id,
                                              first_version=first_version)

        pg.run_statement = failing  # type: ignore[method-assign]
        try:
            with _counting(pg) as calls:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send, "b1", 1)
                    tg.start_soon(send, "dup", 2)
                    tg.start_soon(send, "b3", 3)
        finally:
            pg.run_statement = real_statement  # type: ignore[method-assign]
    assert calls["run"] == 3
    assert answers == {"b1": _new(1), "b3": _new(3),
                       "dup": BatchPreparation("duplicate", frozenset(), [], 2)}


async def test_a_full_queue_sends_claims_alone(pg: Postgres, pg_dsn: str) -> None:
    """Past `max_queued_claims` a claim does not wait for a place: it is executed alone."""
    store = MetadataStore(pg, max_queued_claims=2)
    answers = _Answers()
    with anyio.fail_after(TEST_DEADLINE_S):
        run_id = await _new_run(store)

        async def send(batch_id: str) -> None:
            answers[batch_id] = await _answer(store, run_id, batch_id, first_version=4)

        async with _statement_in_flight(pg_dsn, run_id, lambda: send("b-lead"), "b-lead",
                                        [lambda i=i: send(f"f{i}") for i in range(5)]):
            with anyio.fail_after(5):  # the three past the bound did not wait for b-lead
                await answers.count_reaches(3)
            assert set(answers) == {"f2", "f3", "f4"}
    stats = store.claim_statistics()
    assert answers == {"b-lead": _new(4), **{f"f{i}": _new(4) for i in range(5)}}
    assert (stats.overflows, stats.largest) == (3, 2)


def test_grouping_works_under_asyncio(pg_dsn: str) -> None:
    """The same grouping on asyncio (the server supports both event loops)."""
    answers: dict[str, Outcome] = {}

    async def main() -> int:
        async with open_postgres(pg_dsn, max_connections=4) as pg:
            store = MetadataStore(pg)
            with anyio.fail_after(TEST_DEADLINE_S):
                await apply_postgres_migrations(pg)
                run_id = await _new_run(store)

                async def send(i: int) -> None:
                    answers[f"c{i}"] = await _answer(store, run_id, f"c{i}", first_version=i)

                async with anyio.create_task_group() as tg:
                    for i in range(16):
                        tg.start_soon(send, i)
            return store.claim_statistics().statements

    statements = anyio.run(main, backend="asyncio")
    assert answers == {f"c{i}": _new(i) for i in range(16)}
    assert 1 <= statements <= 3


def test_the_claims_bench_measures_both_modes(pg_dsn: str) -> None:
    """`python -m bench.claims` measures grouped claims against one statement per claim:
    here only that it counted what it ran (no timing is asserted)."""
    grouped = measure(pg_dsn, mode="grouped", writers=8, batches=4, work_ms=0.2)
    alone = measure(pg_dsn, mode="one per claim", writers=8, batches=4, work_ms=0.2)
    assert (grouped.claims, alone.claims) == (32, 32)
    assert alone.statements == 32 and 1 <= grouped.statements < 32
    assert grouped.cpu_s > 0 and alone.cpu_s > 0
    table = render([grouped, alone]).splitlines()
    assert len(table) == 3 and table[1].startswith("grouped") and "1.00" in table[2]
