"""A resend that overtakes its own ledger mark is a duplicate and writes nothing.

The write path marks a batch committed in the ledger after the batch's answer went out (the
ledger marker, off the request's path). A client that resends at once can reach the ledger
first and find the batch still pending; the process that committed it knows better and
answers "duplicate" without writing the rows again. Real PostgreSQL and ClickHouse 18.16; the
one fake is the ledger's mark, held back on cue to open that window for as long as the test
needs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import anyio
import pytest

from mlrun.server.pipelines.clickhouse_write_path import ClickHouseWritePath
from mlrun.server.ports.keys import Principal
from mlrun.server.ports.run_metadata import CardinalityLimits
from mlrun.server.protocols.clickhouse import quote_string
from mlrun.server.storage.clickhouse.client import ClickHouse
from mlrun.server.storage.clickhouse.http_client import open_http_clickhouse
from mlrun.server.storage.clickhouse.migrations import apply_clickhouse_migrations
from mlrun.server.storage.postgres.client import Postgres
from mlrun.server.storage.postgres.metadata import MetadataStore
from mlrun.server.usecases.ingest import Ingest
from mlrun.wire.schemas import IngestBatch, InitRun, MetricSeries

from backends.clickhouse import ClickHouseServer

pytestmark = pytest.mark.timeout(120)
DEADLINE_S = 60
WRITER = Principal(key_id="writer", scopes=frozenset({"write"}))


class HeldMarks:
    """The real ledger's marks, held until `release` is set (the fault injected on cue)."""

    def __init__(self, ledger: MetadataStore) -> None:
        self._ledger = ledger
        self.release = anyio.Event()
        self.landed = anyio.Event()
        self.marked: list[tuple[str, str | None]] = []

    async def mark_batches_committed(self, batches: Iterable[tuple[str, str | None]]) -> None:
        await self.release.wait()
        batches = list(batches)
        await self._ledger.mark_batches_committed(batches)
        self.marked.extend(batches)
        self.landed.set()


@pytest.fixture
async def ch(clickhouse_server: ClickHouseServer, clickhouse_database: str
             ) -> AsyncIterator[ClickHouse]:
    async with open_http_clickhouse(
        host=clickhouse_server.host, port=clickhouse_server.port, user=clickhouse_server.user,
        password=clickhouse_server.password, database=clickhouse_database,
    ) as client:
        with anyio.fail_after(DEADLINE_S):
            await apply_clickhouse_migrations(client)
        yield client


async def raw_rows(ch: ClickHouse, run_id: str) -> int:
    rows = await ch.query_rows(
        f"SELECT count() AS n FROM metrics WHERE run_id = {quote_string(run_id)}",
        timeout_s=DEADLINE_S)
    return int(rows[0]["n"])


async def test_a_resend_before_the_mark_is_a_duplicate_and_writes_nothing(
    pg: Postgres, ch: ClickHouse
) -> None:
    store = MetadataStore(pg)
    marks = HeldMarks(store)
    path = ClickHouseWritePath(ch, marks, max_rows=100_000, max_bytes=16 << 20)
    ingest = Ingest(store, write_path=path, cardinality=CardinalityLimits())
    batch = IngestBatch(run_id="resent", batch_id="b1", series=[
        MetricSeries(name="loss", steps=list(range(10)), values=[i / 10 for i in range(10)])])
    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as group:
            await group.start(path.serve)
            await ingest.init_run(WRITER, InitRun(project="p", run_id="resent"))
            first = await ingest.log_batch(WRITER, batch)
            # Committed and answered; its mark is held, so the ledger still says pending.
            assert path.committed_unmarked("resent", "b1")
            again = await ingest.log_batch(WRITER, batch)
            rows_before_mark = await raw_rows(ch, "resent")
            marks.release.set()
            await marks.landed.wait()
            assert not path.committed_unmarked("resent", "b1")
            after_mark = await ingest.log_batch(WRITER, batch)
            path.close()
    assert (first.accepted, first.duplicate) == (10, False)
    assert (again.accepted, again.duplicate) == (0, True)
    assert rows_before_mark == 10  # not written a second time
    assert marks.marked == [("resent", "b1")]
    assert (after_mark.accepted, after_mark.duplicate) == (0, True)  # now from the ledger
    assert await raw_rows(ch, "resent") == 10


async def test_another_processes_pending_batch_is_still_checked_against_storage(
    pg: Postgres, ch: ClickHouse
) -> None:
    """This process did not commit it (the mark is not its own): the resend goes the old way,
    checked against storage and written again to repair any view a crash cut short."""
    store = MetadataStore(pg)
    path = ClickHouseWritePath(ch, HeldMarks(store), max_rows=100_000, max_bytes=16 << 20)
    first_process = ClickHouseWritePath(ch, HeldMarks(store), max_rows=100_000,
                                        max_bytes=16 << 20)
    batch = IngestBatch(run_id="elsewhere", batch_id="b1", series=[
        MetricSeries(name="loss", steps=list(range(10)), values=[0.5] * 10)])
    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as group:
            await group.start(first_process.serve)
            await group.start(path.serve)
            first = Ingest(store, write_path=first_process, cardinality=CardinalityLimits())
            await first.init_run(WRITER, InitRun(project="p", run_id="elsewhere"))
            await first.log_batch(WRITER, batch)
            second = Ingest(store, write_path=path, cardinality=CardinalityLimits())
            again = await second.log_batch(WRITER, batch)
            first_process.close()
            path.close()
            group.cancel_scope.cancel()  # the held marks never land; nothing waits for them
    assert (again.accepted, again.duplicate) == (0, True)
    assert await raw_rows(ch, "elsewhere") == 20  # rewritten (same versions: reads dedupe)
