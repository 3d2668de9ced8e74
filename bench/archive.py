"""`python -m bench.archive` (from the repository root): `mlrun export` and `mlrun import` of one
big run (default 10M metric points), timed, with the commands' peak and sampled RSS.

    python -m bench.archive                       10M points in 5 series + 100k system points
    python -m bench.archive --points 1000000      smaller
    python -m bench.archive --timeout-s 600       each command is killed (by PID) past this

Starts its own PostgreSQL 15 and clickhouse-server 18.16 (the test suite's classes, as
bench.targets does) under a temp dir, with two databases on each: the source, seeded directly
(the run row through the archive's own PostgreSQL writer, the points by one INSERT ... SELECT
FROM numbers() per series inside ClickHouse, so seeding costs no Python per point), and the
target. Then runs `python -m mlrun export --run RUN` against the source and `python -m mlrun
import FILE` against the target as child processes, the way an operator does, and reports for
each: wall time, points/s, CPU seconds of the command (user + system, from wait4), peak RSS
(ru_maxrss) and RSS sampled every 0.25 s. Checks that the target holds every point and the
same summaries. Writes `archive-<time>.json` under `--out`. Exit 1 when a check failed.

Must not import anyio at module level (the seeding runs one anyio loop of its own).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from bench.errors import BenchError

_RUN_ID = "bench-archive-run"
_SERIES = 5
_SYSTEM_POINTS = 100_000
_T0_MS = 1_700_000_000_000
_RSS_SAMPLE_S = 0.25


def _tests_on_path() -> None:
    tests = Path(__file__).resolve().parents[1] / "tests"
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))


@contextlib.contextmanager
def _backends(work: Path) -> Iterator[tuple[Any, Any]]:
    _tests_on_path()
    from backends.clickhouse import ClickHouseServer, find_clickhouse_binary
    from backends.ports import free_port
    from backends.postgres import PostgresCluster

    with contextlib.ExitStack() as stack:
        user = pwd.getpwnam("postgres")
        pg_dir = work / "postgres"
        pg_dir.mkdir()
        os.chown(pg_dir, user.pw_uid, user.pw_gid)
        postgres = PostgresCluster(base_dir=pg_dir, port=free_port())
        stack.callback(postgres.stop)
        postgres.initdb()
        postgres.start()
        clickhouse = ClickHouseServer(work / "clickhouse", find_clickhouse_binary())
        stack.callback(clickhouse.stop)
        clickhouse.start()
        yield postgres, clickhouse


def _environment(postgres: Any, clickhouse: Any, database: str, data_dir: Path
                 ) -> dict[str, str]:
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    return {
        "DATABASE_URL": postgres.dsn(database),
        "CLICKHOUSE_HOST": clickhouse.host,
        "CLICKHOUSE_PORT": str(clickhouse.port),
        "CLICKHOUSE_USER": clickhouse.user,
        "CLICKHOUSE_PASSWORD": clickhouse.password,
        "CLICKHOUSE_DATABASE": database,
        "MLRUN_DATA_DIR": str(data_dir),  # the local artifact store's key lives there
        "MLRUN_STARTUP_TIMEOUT_S": "60",
    }


def _seed(env: dict[str, str], points: int) -> None:
    import anyio

    from mlrun.server.protocols.export_file import RunFields
    from mlrun.server.runtime.config import load_config
    from mlrun.server.runtime.supervisor import open_prepared_storage
    from mlrun.server.storage.postgres.run_archive import PostgresRunArchive

    names = [f"train/series_{index}" for index in range(_SERIES)]
    per_series = points // _SERIES

    async def seed() -> None:
        config = load_config({**os.environ, **env})
        async with open_prepared_storage(config, public_base_url="http://127.0.0.1") as storage:
            now = datetime.datetime.now(datetime.UTC)
            await PostgresRunArchive(storage.postgres).commit_run(RunFields(
                run_id=_RUN_ID, project="bench-archive", project_description="", name="big",
                status="finished", created_at=now, updated_at=now, finished_at=now,
                last_heartbeat_at=None, params={"lr": "0.001"}, tags={"size": "10M"},
                metric_names=names), [], digest="0" * 64)
            for index, name in enumerate(names):
                await storage.clickhouse.execute(
                    "INSERT INTO metrics SELECT"
                    f" '{_RUN_ID}', '{name}', number, sin(number / 1000) + {index},"
                    f" {_T0_MS} + number * 10, number + 1 FROM numbers({per_series})",
                    timeout_s=600)
            await storage.clickhouse.execute(
                "INSERT INTO system_metrics SELECT"
                f" '{_RUN_ID}', 'cpu', number, number % 100, {_T0_MS} + number * 1000, number + 1"
                f" FROM numbers({_SYSTEM_POINTS})", timeout_s=600)

    anyio.run(seed)


def _measure(command: list[str], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run `python -m mlrun ...`; wall time, CPU, peak RSS (wait4) and RSS samples."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "mlrun", *command],
                               env={**os.environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    samples: list[int] = []
    done = threading.Event()

    statm = Path(f"/proc/{process.pid}/statm")
    page_bytes = os.sysconf("SC_PAGE_SIZE")

    def sample() -> None:
        while not done.wait(_RSS_SAMPLE_S):
            try:  # resident pages are the second field
                samples.append(int(statm.read_text().split()[1]) * page_bytes)
            except (OSError, IndexError, ValueError):
                return
            if time.monotonic() - started > timeout_s:
                process.kill()  # by PID: bounded in time whatever happens
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert process.stdout is not None and process.stderr is not None
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    elapsed_s = time.monotonic() - started
    stdout = process.stdout.read().decode()
    stderr = process.stderr.read().decode()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise BenchError(f"mlrun {command[0]} exited {process.returncode}: {stderr[-2000:]}")
    timeline = [round(samples[i * len(samples) // 20] / 2**20) for i in range(20)
                ] if len(samples) >= 20 else [round(v / 2**20) for v in samples]
    samples.sort()
    return {
        "rss_timeline_mb": timeline,
        "command": " ".join(command[:1]),
        "wall_s": round(elapsed_s, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "rss_samples_mb": {
            "count": len(samples),
            "median": round(samples[len(samples) // 2] / 2**20, 1) if samples else None,
            "max": round(samples[-1] / 2**20, 1) if samples else None,
        },
        "output": stdout.strip(),
    }


def _summaries(clickhouse: Any, database: str) -> list[dict[str, Any]]:
    _tests_on_path()
    from readback import ClickHouseReader

    return ClickHouseReader(clickhouse, database).rows(
        "SELECT name, minMerge(min_value) AS low, maxMerge(max_value) AS high,"
        " uniqExactMerge(step_count) AS steps FROM metrics_summary"
        f" WHERE run_id = '{_RUN_ID}' GROUP BY name ORDER BY name")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.archive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=10_000_000)
    parser.add_argument("--timeout-s", type=float, default=900.0,
                        help="each command is killed past this many seconds")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--command-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the two commands (e.g. MALLOC_ARENA_MAX=2)")
    args = parser.parse_args(argv)
    if not 1000 <= args.points <= 100_000_000:
        parser.error("--points must be 1000..100000000")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    work = Path(tempfile.mkdtemp(prefix="mlrun-bench-archive-"))
    work.chmod(0o755)
    try:
        with _backends(work) as (postgres, clickhouse):
            extra = dict(item.split("=", 1) for item in args.command_env)
            source = _environment(postgres, clickhouse, "archive_source", work / "source")
            target = {**_environment(postgres, clickhouse, "archive_target", work / "target"),
                      **extra}
            seeded = time.monotonic()
            _seed(source, args.points)
            print(f"seeded {args.points:,} points in {time.monotonic() - seeded:.1f} s",
                  flush=True)
            file = work / "run.mlrun.jsonl.gz"
            exported = _measure(["export", "--run", _RUN_ID, "-o", str(file), "--progress",
                                 "never"], source, args.timeout_s)
            exported["file_mb"] = round(file.stat().st_size / 2**20, 1)
            imported = _measure(["import", str(file), "--progress", "never"], target,
                                args.timeout_s)
            same = (_summaries(clickhouse, "archive_source")
                    == _summaries(clickhouse, "archive_target"))
            _tests_on_path()
            from readback import ClickHouseReader

            stored = ClickHouseReader(clickhouse, "archive_target").scalar(
                f"SELECT count() FROM metrics WHERE run_id = '{_RUN_ID}'")
    except BenchError as exc:
        print(f"bench.archive: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = args.points // _SERIES * _SERIES + _SYSTEM_POINTS
    for result in (exported, imported):
        result["points"] = total
        result["points_per_s"] = round(total / result["wall_s"])
        result["cpu_us_per_point"] = round(result["cpu_s"] * 1e6 / total, 2)
    report = {"points": total, "export": exported, "import": imported,
              "target_points": stored, "summaries_equal": same,
              "note": "shared 2-core box: rates vary between runs; CPU per point is steadier"}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    (args.out / f"archive-{stamp}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = same and int(stored) == args.points // _SERIES * _SERIES
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
