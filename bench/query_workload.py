"""The `query` workload of `python -m bench`: `bench.query`'s seeding and timed read paths,
run on the bench's own target, converted into the bench report's `QuerySection`.

Owns only the adaptation (bench.query stays the one implementation of the read-path workload and
is also runnable alone as `python -m bench.query`). Must not import anyio.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import msgspec

from bench.errors import BenchError
from bench.query import Settings, run_workloads, seed
from bench.report import QueryLatency, QuerySection
from bench.targets import Target


def quick_settings(quick: bool) -> Settings:
    """Issue 5's sizes (bench.query's defaults, 50 requests instead of 100 to fit the 5-minute
    run), or a smoke size that keeps `--quick` under a minute."""
    return Settings(
        runs=500 if quick else 10_000,
        series_points=100_000 if quick else 1_000_000,
        full_points=10_000 if quick else 100_000,
        compare_runs=20,
        compare_points=1_000 if quick else 10_000,
        requests=5 if quick else 50,
    )


def run_query_workload(
    target: Target, settings: Settings, progress: Callable[[str], None]
) -> tuple[QuerySection, list[str]]:
    """Seed, time every read path; returns the section and bench.query's failed checks."""
    progress(f"query: seeding {settings.runs} runs, {settings.series_points} +"
             f" {settings.full_points} + {settings.compare_runs}x{settings.compare_points} points")
    try:
        run_ids, seed_s = seed(target, settings)
        progress("query: timing the read paths")
        results, problems = run_workloads(target, settings, run_ids)
    except httpx.HTTPError as exc:
        raise BenchError(f"query workload: {type(exc).__name__}: {exc}") from exc
    section = QuerySection(
        sizes=msgspec.structs.asdict(settings),
        seed_s=round(seed_s, 2),
        results=[msgspec.convert(msgspec.structs.asdict(r), QueryLatency) for r in results],
    )
    return section, [f"query: {problem}" for problem in problems]
