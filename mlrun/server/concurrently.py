"""Awaiting independent reads at once, with plain (not grouped) errors.

Owns `both`: the read paths (`queries`, `storage.metric_queries`) issue independent
statements concurrently so a request pays one round trip of latency, not the sum.

Must not import anything of the server but anyio: it is used from the use-case layer and from
storage alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

import anyio

A = TypeVar("A")
B = TypeVar("B")


async def both(
    first: Callable[[], Awaitable[A]], second: Callable[[], Awaitable[B]]
) -> tuple[A, B]:
    """Await two independent reads at once; the first failure is raised as itself (not as an
    exception group), after the other read was cancelled."""
    results: list[object] = [None, None]

    async def run(index: int, call: Callable[[], Awaitable[object]]) -> None:
        results[index] = await call()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(run, 0, first)
            group.start_soon(run, 1, second)
    except BaseExceptionGroup as failed:
        cancelled = anyio.get_cancelled_exc_class()
        leaves = _leaves(failed)
        raise next((e for e in leaves if not isinstance(e, cancelled)), leaves[0]) from None
    return cast(A, results[0]), cast(B, results[1])


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))
        else:
            leaves.append(exc)
    return leaves
