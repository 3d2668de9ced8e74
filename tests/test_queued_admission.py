"""Queued mode's admission: a full XADD buffer makes a request wait (bounded) instead of 429.

Two levels:
- `Pipeline.reserve` on its own, with a flush held on cue (a fake flush on purpose: these
  tests decide exactly when the buffer drains): room goes to the waiters in arrival order,
  nobody takes room past a waiter, the wait ends at its deadline with 429, at most a pipeline's
  worth may wait, a cancelled waiter gives its room back, close() refuses the waiters.
- End to end on real servers: a queued `mlrun serve` with a small XADD buffer, real Redis
  frozen (SIGSTOP) for half a second while twice the buffer's worth of batches arrive at once:
  every one is answered 200 (the ones beyond the buffer after a wait), none 429, and all of
  them are stored exactly once. Without the wait, half of them were refused. (A 503 may come
  when the server's view of the queue times out during the freeze: retried, as clients do.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from test_queued_ingest import create_run, metric, queued_env, start, wait_drained

from mlrun.server.errors import BackendUnavailable, Overloaded
from mlrun.server.pipelines.group_commit import Pipeline, Reservation

from backends.redis import RedisServer
from ingest_load import AUTH, assert_exactly_once, batch_body
from readback import ClickHouseReader

__all__ = ["queued_env", "start"]  # fixtures shared with the queued-ingest tests

DEADLINE_S = 10.0


def make_pipeline(max_rows: int = 10) -> Pipeline:
    return Pipeline("redis_stream", backend="redis", max_rows=max_rows, max_bytes=10_000)


async def test_room_goes_to_the_waiters_in_arrival_order_and_nobody_barges() -> None:
    pipeline = make_pipeline(max_rows=10)
    held, kept = pipeline.reserve_nowait(6, 6), pipeline.reserve_nowait(4, 4)
    granted: dict[str, Reservation] = {}

    async def wait_for(name: str, rows: int) -> None:
        granted[name] = await pipeline.reserve(rows, 1, wait_s=DEADLINE_S)

    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as group:
            group.start_soon(wait_for, "first", 5)
            await anyio.sleep(0.01)
            group.start_soon(wait_for, "second", 5)
            await anyio.sleep(0.01)
            assert pipeline.statistics().waiting_requests == 2
            held.release()  # room for the first only (4 + 5 + 5 > 10)
            await anyio.sleep(0.01)
            assert list(granted) == ["first"] and granted["first"].waited
            # A newcomer that fits beside the first must not pass the second.
            with pytest.raises(Overloaded):
                pipeline.reserve_nowait(1, 1)
            granted["first"].release()
    assert list(granted) == ["first", "second"]
    statistics = pipeline.statistics()
    assert (statistics.waiting_requests, statistics.admitted_after_wait) == (0, 2)
    assert statistics.queued_rows == 4 + 5
    kept.release()


async def test_a_wait_ends_at_its_deadline_with_429_and_leaves_the_line() -> None:
    pipeline = make_pipeline(max_rows=10)
    pipeline.reserve_nowait(10, 10)
    started = anyio.current_time()
    with pytest.raises(Overloaded) as refused:
        await pipeline.reserve(5, 1, wait_s=0.2)
    assert 0.2 <= anyio.current_time() - started < 2.0
    assert refused.value.retry_after_s >= 1
    statistics = pipeline.statistics()
    assert (statistics.waiting_requests, statistics.wait_timeouts,
            statistics.rejected_requests) == (0, 1, 1)


async def test_at_most_a_pipelines_worth_waits_then_429_at_once() -> None:
    pipeline = make_pipeline(max_rows=10)
    held = pipeline.reserve_nowait(10, 10)
    results: list[Reservation] = []

    async def wait_for() -> None:
        results.append(await pipeline.reserve(5, 1, wait_s=DEADLINE_S))

    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as group:
            group.start_soon(wait_for)
            group.start_soon(wait_for)
            await anyio.sleep(0.01)
            started = anyio.current_time()
            with pytest.raises(Overloaded):  # 10 rows wait already: the line is full
                await pipeline.reserve(1, 1, wait_s=DEADLINE_S)
            assert anyio.current_time() - started < 0.5
            held.release()
    assert len(results) == 2


async def test_a_cancelled_waiter_leaves_no_room_taken() -> None:
    pipeline = make_pipeline(max_rows=10)
    held = pipeline.reserve_nowait(10, 10)
    returned: list[Reservation] = []
    with anyio.fail_after(DEADLINE_S):
        with anyio.move_on_after(0.05):  # cancelled while waiting
            await pipeline.reserve(4, 1, wait_s=DEADLINE_S)
        assert pipeline.statistics().waiting_requests == 0
        scope = anyio.CancelScope()

        async def waiter() -> None:
            with scope:
                returned.append(await pipeline.reserve(4, 1, wait_s=DEADLINE_S))

        async with anyio.create_task_group() as group:
            group.start_soon(waiter)
            await anyio.sleep(0.01)
            held.release()  # grants the waiter synchronously...
            scope.cancel()  # ...which is cancelled before it runs again
    for reservation in returned:  # either handed to the caller (who releases it) or given back
        reservation.release()
    statistics = pipeline.statistics()
    assert (statistics.waiting_requests, statistics.queued_rows) == (0, 0)


async def test_close_refuses_the_waiters_as_shutting_down() -> None:
    pipeline = make_pipeline(max_rows=10)
    pipeline.reserve_nowait(10, 10)
    refusals: list[BaseException] = []

    async def wait_for() -> None:
        try:
            await pipeline.reserve(5, 1, wait_s=DEADLINE_S)
        except BackendUnavailable as exc:
            refusals.append(exc)

    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as group:
            group.start_soon(wait_for)
            await anyio.sleep(0.01)
            pipeline.close()
    assert len(refusals) == 1 and refusals[0].code == "shutting_down"


def test_a_full_xadd_buffer_makes_requests_wait_not_429(
    queued_env: dict[str, str], start: Callable[..., Any], redis_server: RedisServer,
    clickhouse_reader: ClickHouseReader,
) -> None:
    # The XADD buffer holds 4 batches of 200 points; 8 arrive while Redis is frozen.
    env = {**queued_env, "MLRUN_PIPELINE_MAX_ROWS": "800"}
    server = start("serve", env, "server")
    start("process", env, "processor")
    create_run(server.base_url, "q-room")
    answers: dict[int, list[int]] = {}
    barrier = threading.Barrier(9)

    def send(index: int) -> None:
        # A 503 (the queue view may time out while Redis is frozen: "unreachable") is retried
        # with the same batch, as the SDK does; a 429 is what must not happen.
        statuses = answers.setdefault(index, [])
        with httpx.Client(headers=AUTH, timeout=15) as http:
            barrier.wait(timeout=10)
            for _ in range(20):
                answer = http.post(f"{server.base_url}/api/v1/ingest/batch",
                                   content=batch_body("q-room", 0, index, 25, 200))
                statuses.append(answer.status_code)
                if answer.status_code != 503:
                    return
                time.sleep(0.2)  # the retry back-off of a client that got a 503

    senders = [threading.Thread(target=send, args=(index,)) for index in range(8)]
    for sender in senders:
        sender.start()
    redis_server.freeze()
    try:
        barrier.wait(timeout=10)
        time.sleep(0.5)  # the batches arrive and fill the buffer; Redis answers nothing
    finally:
        redis_server.thaw()
    for sender in senders:
        sender.join(timeout=30)
    assert len(answers) == 8 and all(statuses[-1] == 200 for statuses in answers.values()), \
        answers
    assert not any(429 in statuses for statuses in answers.values()), answers
    assert metric(server.base_url, "mlrun_pipeline_admitted_after_wait_total") >= 1
    assert metric(server.base_url, "mlrun_pipeline_rejected_total") == 0
    wait_drained(server, env)
    assert_exactly_once(clickhouse_reader, "q-room", set(range(8 * 200)))
