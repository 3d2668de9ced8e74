"""Counting a `Postgres`'s calls in tests: how many transactions (`run`) and autocommit
statements (`run_statement`) a piece of storage code spends, with the real calls made."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlrun.server.storage.postgres.client import Postgres


@contextmanager
def counting_calls(pg: Postgres) -> Iterator[dict[str, int]]:
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
