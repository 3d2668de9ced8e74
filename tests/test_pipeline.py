"""Pipeline admission, group commit and failure handling, with a flush injected on cue.

The flush here is a fake on purpose: these tests decide exactly when a "backend" stalls, fails
or rejects. The same pipeline against a real ClickHouse is covered by the ingest tests.
"""

from __future__ import annotations

import functools

import anyio
import pytest

from mlrun.server.errors import BackendError, BackendTimeout, BackendUnavailable, Overloaded
from mlrun.server.pipelines.group_commit import Pipeline, reserve_all


class ScriptedFlush:
    """Records flushes; can be held, or told to fail the next N calls."""

    def __init__(self) -> None:
        self.flushed: list[tuple[bytes, int]] = []
        self.gate = anyio.Event()
        self.gate.set()
        self.outages = 0
        self.reject_next = False

    async def __call__(self, payload: bytes, rows: int) -> None:
        await self.gate.wait()
        if self.outages:
            self.outages -= 1
            raise BackendUnavailable("down", backend="clickhouse")
        if self.reject_next:
            self.reject_next = False
            raise BackendError("bad data", backend="clickhouse", detail="Code: 27")
        self.flushed.append((payload, rows))


def make_pipeline(max_rows: int = 100, max_bytes: int = 10_000) -> Pipeline:
    return Pipeline("metrics", backend="clickhouse", max_rows=max_rows, max_bytes=max_bytes)


async def test_full_pipeline_rejects_without_waiting_and_frees_on_release() -> None:
    pipeline = make_pipeline(max_rows=10)
    held = pipeline.reserve_nowait(8, 100)
    with pytest.raises(Overloaded) as caught:
        pipeline.reserve_nowait(3, 10)
    assert caught.value.retry_after_s >= 1
    assert pipeline.statistics().rejected_requests == 1
    held.release()
    held.release()  # idempotent
    assert pipeline.statistics().queued_rows == 0
    pipeline.reserve_nowait(10, 100)


async def test_reserve_all_is_all_or_none() -> None:
    metrics = make_pipeline(max_rows=100)
    system = make_pipeline(max_rows=5)
    with pytest.raises(Overloaded):
        reserve_all([(metrics, 50, 500), (system, 6, 60)])
    assert metrics.statistics().queued_rows == 0
    reservations = reserve_all([(metrics, 50, 500), (system, 5, 50)])
    assert [r.rows for r in reservations] == [50, 5]


async def test_group_commit_answers_each_ticket_after_its_flush() -> None:
    pipeline = make_pipeline()
    flush = ScriptedFlush()
    flush.gate = anyio.Event()  # hold the first flush so the rest queue up behind it
    results: list[int] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.serve_writer, flush)

            async def request(n: int) -> None:
                ticket = pipeline.submit_nowait(pipeline.reserve_nowait(1, 1), bytes([n]), 1)
                await ticket.wait(5)
                results.append(n)

            tg.start_soon(request, 0)
            await anyio.wait_all_tasks_blocked()  # the writer now holds item 0 at the gate
            for n in range(1, 10):
                tg.start_soon(request, n)
            await anyio.wait_all_tasks_blocked()
            assert results == []  # nothing is acknowledged before its flush committed
            flush.gate.set()
            await anyio.wait_all_tasks_blocked()
            pipeline.close()
    assert sorted(results) == list(range(10))
    # The first flush carried one item; the other nine went together in the second.
    assert [rows for _, rows in flush.flushed] == [1, 9]
    assert sorted(b"".join(p for p, _ in flush.flushed)) == list(range(10))
    stats = pipeline.statistics()
    assert stats.queued_rows == 0 and stats.committed_rows == 10 and stats.flushes == 2


async def test_outage_is_retried_until_it_commits() -> None:
    pipeline = make_pipeline()
    flush = ScriptedFlush()
    flush.outages = 3
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.serve_writer, flush)
            ticket = pipeline.submit_nowait(pipeline.reserve_nowait(2, 2), b"ab", 2)
            await ticket.wait(5)
            pipeline.close()
    assert flush.flushed == [(b"ab", 2)]
    assert pipeline.statistics().flush_errors == 3


async def test_ticket_deadline_gives_retryable_timeout_and_the_item_is_dropped() -> None:
    pipeline = make_pipeline()
    flush = ScriptedFlush()
    flush.outages = 10**6  # the backend never comes back within this test
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(pipeline.serve_writer, flush, max_backoff_s=0.05))
            ticket = pipeline.submit_nowait(pipeline.reserve_nowait(3, 3), b"xyz", 3)
            with pytest.raises(BackendTimeout) as caught:
                await ticket.wait(0.3)
            assert caught.value.retryable and caught.value.code == "commit_timeout"
            # On its next retry (back-off <= 0.05 s) the writer sees nobody waits any more
            # and frees the capacity.
            await anyio.sleep(0.5)
            assert pipeline.statistics().queued_rows == 0
            pipeline.close()
    assert flush.flushed == []
    assert pipeline.statistics().abandoned_requests == 1


async def test_rejected_payload_fails_its_tickets_and_the_writer_goes_on() -> None:
    pipeline = make_pipeline()
    flush = ScriptedFlush()
    flush.reject_next = True
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.serve_writer, flush)
            bad = pipeline.submit_nowait(pipeline.reserve_nowait(1, 1), b"x", 1)
            with pytest.raises(BackendError):
                await bad.wait(5)
            good = pipeline.submit_nowait(pipeline.reserve_nowait(1, 1), b"y", 1)
            await good.wait(5)
            pipeline.close()
    assert flush.flushed == [(b"y", 1)]


async def test_close_drains_what_was_queued_then_refuses_new_work() -> None:
    pipeline = make_pipeline()
    flush = ScriptedFlush()
    tickets = [pipeline.submit_nowait(pipeline.reserve_nowait(1, 1), b"q", 1) for _ in range(5)]
    pipeline.close()
    with pytest.raises(BackendUnavailable) as caught:
        pipeline.reserve_nowait(1, 1)
    assert caught.value.code == "shutting_down"
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipeline.serve_writer, flush)
            for ticket in tickets:
                await ticket.wait(5)
    assert sum(rows for _, rows in flush.flushed) == 5


async def test_retry_after_follows_the_drain_rate() -> None:
    pipeline = make_pipeline(max_rows=1_000_000, max_bytes=10**9)
    assert pipeline.retry_after_s() == 5  # nothing flushed yet: the fixed fallback
    pipeline._record_flush(1000, 1.0)  # 1000 rows/s
    pipeline.reserve_nowait(4500, 1)
    assert pipeline.retry_after_s() == 5  # ceil(4500 / 1000)
    pipeline.reserve_nowait(100_000, 1)
    assert pipeline.retry_after_s() == 30  # capped
