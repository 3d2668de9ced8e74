"""`python -m bench.claims` (from the repository root): the server's CPU per ledger claim of the
common batch (`MetadataStore.prepare_batch`: a batch_id, no params or tags, known metric
names), grouped (`storage.postgres.statement_groups`) against one statement per claim
(`max_queued_claims=0`), measured in the same run on a private PostgreSQL 15 (issue 15).

    python -m bench.claims                       K = 8, 32 writers; 1.5 ms of work per batch
    python -m bench.claims --writers 32 --rounds 5 --work-ms 0

K writer tasks in one process each send `--batches` claims one after another; before each, a
writer spins `--work-ms` of Python CPU on the event loop (what parsing, validating and encoding
a 1000-point batch costs the server: ~2-3 ms), which is what lets claims arrive while another
is in flight, as in a loaded server. Reported: claims/s, the process's CPU per claim (all
threads, minus the spinning), that CPU per point for 1000-point batches, and claims per
statement. Modes alternate within each round, so a shared box's noise hits both alike.

This measures the storage call alone (no HTTP, no ClickHouse): the `breakdown` workload of
`python -m bench` shows the same cost inside a whole server, with py-spy's sampling noise.
PostgreSQL runs with fsync off (tests/backends/postgres.py), as in every bench target.

Owns only this workload. Must not import anyio at module level (the measurement runs one anyio
loop of its own per mode, like `bench.archive`'s seeding).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

# The test fixtures import their siblings as top-level modules (pytest puts tests/ on sys.path).
_TESTS_DIR = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS_DIR not in sys.path:
    sys.path.append(_TESTS_DIR)

_NAMES = tuple(f"m{index}" for index in range(10))
_POINTS_PER_BATCH = 1000
_MODES = {"grouped": None, "one per claim": 0}  # max_queued_claims (None: the default)
_MEASURE_DEADLINE_S = 300.0


@dataclass(frozen=True, slots=True)
class ClaimRun:
    mode: str
    writers: int
    claims: int
    wall_s: float
    cpu_s: float  # the process's CPU, without the writers' spinning
    statements: int

    @property
    def cpu_us_per_claim(self) -> float:
        return self.cpu_s / self.claims * 1e6


@contextlib.contextmanager
def _private_postgres() -> Iterator[str]:
    """An admin DSN of a fresh PostgreSQL 15 cluster, stopped (by PID) on exit."""
    from backends.ports import free_port
    from backends.postgres import PostgresCluster

    postgres_user = pwd.getpwnam("postgres")
    with tempfile.TemporaryDirectory(prefix="bench-claims-") as work:
        base = Path(work) / "postgres"
        base.mkdir()
        os.chmod(work, 0o755)
        os.chown(base, postgres_user.pw_uid, postgres_user.pw_gid)
        cluster = PostgresCluster(base_dir=base, port=free_port())
        try:
            cluster.initdb()
            cluster.start()
            yield cluster.dsn()
        finally:
            cluster.stop()


def _fresh_database(admin_dsn: str) -> str:
    name = f"claims_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return admin_dsn.rsplit("/", 1)[0] + "/" + name


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(dsn: str, *, mode: str, writers: int, batches: int, work_ms: float) -> ClaimRun:
    """One measurement in an anyio loop of its own, on a fresh database at `dsn`."""
    import anyio

    from mlrun.server.ports.run_metadata import CardinalityLimits
    from mlrun.server.storage.postgres.client import apply_postgres_migrations, open_postgres
    from mlrun.server.storage.postgres.metadata import MetadataStore
    from mlrun.wire.schemas import InitRun

    limits = CardinalityLimits()
    max_queued = _MODES[mode]

    async def main() -> ClaimRun:
        async with open_postgres(dsn, max_connections=8) as pg:
            await apply_postgres_migrations(pg)
            store = (MetadataStore(pg, timeout_s=3.0) if max_queued is None
                     else MetadataStore(pg, timeout_s=3.0, max_queued_claims=max_queued))
            runs: list[str] = []
            for _ in range(writers):  # each run learns its names from a first batch
                created, _ = await store.init_run(InitRun(project="bench"), limits=limits)
                runs.append(created.run_id)
                await store.prepare_batch(
                    run_id=created.run_id, batch_id="first", payload_hash=b"\0" * 32, seq=0,
                    points=_POINTS_PER_BATCH, first_version=1, metric_names=_NAMES, params=(),
                    tags=(), limits=limits)
            spun = [0.0]

            async def writer(run_id: str) -> None:
                for index in range(batches):
                    if work_ms:
                        start = time.thread_time()
                        while time.thread_time() - start < work_ms / 1000:
                            pass
                        spun[0] += time.thread_time() - start
                    prepared = await store.prepare_batch(
                        run_id=run_id, batch_id=f"b{index}", payload_hash=b"\1" * 32,
                        seq=index, points=_POINTS_PER_BATCH, first_version=index + 2,
                        metric_names=_NAMES, params=(), tags=(), limits=limits)
                    if prepared.outcome != "new":
                        raise RuntimeError(f"claim answered {prepared.outcome}, not new")

            before = store.claim_statistics()
            cpu_before, wall_before = _process_cpu_s(), time.monotonic()
            with anyio.fail_after(_MEASURE_DEADLINE_S):
                async with anyio.create_task_group() as group:
                    for run_id in runs:
                        group.start_soon(writer, run_id)
            cpu_after, wall_after = _process_cpu_s(), time.monotonic()
            after = store.claim_statistics()
            return ClaimRun(mode=mode, writers=writers, claims=writers * batches,
                            wall_s=wall_after - wall_before,
                            cpu_s=cpu_after - cpu_before - spun[0],
                            statements=after.statements - before.statements)

    result: ClaimRun = anyio.run(main, backend="trio")
    return result


def render(runs: Sequence[ClaimRun]) -> str:
    lines = [f"{'mode':<14} {'K':>3} {'rounds':>6} {'claims/s':>9} {'cpu us/claim':>22}"
             f" {'us/pt':>6} {'claims/stmt':>11}"]
    keys = sorted({(run.mode, run.writers) for run in runs}, key=lambda k: (k[1], k[0]))
    for mode, writers in keys:
        same = [run for run in runs if (run.mode, run.writers) == (mode, writers)]
        per_claim = sorted(run.cpu_us_per_claim for run in same)
        rate = statistics.median(run.claims / run.wall_s for run in same)
        median = statistics.median(per_claim)
        spread = f"{median:6.0f} ({per_claim[0]:.0f}-{per_claim[-1]:.0f})"
        per_statement = statistics.median(run.claims / run.statements for run in same)
        lines.append(f"{mode:<14} {writers:>3} {len(same):>6} {rate:>9,.0f} {spread:>22}"
                     f" {median / _POINTS_PER_BATCH:>6.3f} {per_statement:>11.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.claims", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", default="8,32",
                        help="comma list of concurrent writers (default 8,32)")
    parser.add_argument("--batches", type=int, default=60, help="claims per writer (default 60)")
    parser.add_argument("--work-ms", type=float, default=1.5,
                        help="Python CPU spun per batch before its claim (default 1.5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args(argv)
    writer_counts = [int(k) for k in args.writers.split(",")]
    if (min(writer_counts) < 1 or max(writer_counts) > 512 or not 1 <= args.batches <= 10_000
            or not 0 <= args.work_ms <= 100 or not 1 <= args.rounds <= 20):
        parser.error("writers 1-512, batches 1-10000, work-ms 0-100, rounds 1-20")
    runs: list[ClaimRun] = []
    with _private_postgres() as admin_dsn:
        for round_index in range(args.rounds):
            for writers in writer_counts:
                for mode in _MODES:
                    run = measure(_fresh_database(admin_dsn), mode=mode, writers=writers,
                                  batches=args.batches, work_ms=args.work_ms)
                    print(f"bench.claims: round {round_index + 1} K={writers} {mode}:"
                          f" {run.cpu_us_per_claim:.0f} us/claim,"
                          f" {run.claims / run.statements:.2f} claims/statement",
                          file=sys.stderr, flush=True)
                    runs.append(run)
    print(f"server CPU per ledger claim (storage call alone; {args.work_ms:g} ms of Python work"
          f" per batch; median (min-max) over rounds; us/pt for {_POINTS_PER_BATCH}-point"
          " batches)")
    print(render(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
