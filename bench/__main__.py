"""`python -m bench` (from the repository root): parse the options, get a target, run the
workloads, print the table, write the JSON report and the PNG plot next to it.

    python -m bench                         own server on real backends, every workload:
                                            ingest + baseline at K = 1, 8, 32, 128 (HTTP+gRPC),
                                            sdk, query, then overload on a second own server
                                            with MLRUN_PIPELINE_MAX_ROWS=8000; under 5 minutes
    python -m bench --quick                 the same, smaller, in about a minute
    python -m bench --workloads ingest,baseline,sdk    a subset
    python -m bench --workloads breakdown --breakdown-writers 8 --transports http,http-rows,grpc
                                            the server's CPU per point split into stages at one
                                            K (py-spy samples it), next to both references
    python -m bench --workloads sdk --sdk-in-flight 1,2,4 --sdk-metrics 20
                                            the SDK from one process, end to end, per
                                            transport and batches in flight
    python -m bench --embedded              own server on the embedded default
    python -m bench --url http://host:3001 --api-key KEY [--grpc-target host:50051]
                    [--server-pid PID] [--clickhouse-url http://host:8123 ...]

Exit status: 0 when every workload ran to its deadline and every count-back matched; 1 when a
count-back did not match, a writer stopped early (an error a retry cannot fix), or a set-up step
failed (one line on stderr); 2 for bad options. Progress goes to stderr, the table to stdout.

Must not import anyio (the bench has no event loop: see `bench.writers`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import msgspec

from bench.errors import BenchError
from bench.metrics_store import ClickHouseServerStore
from bench.peers import parse_peer
from bench.plot import write_plot
from bench.profiler import DEFAULT_RATE_HZ
from bench.query_workload import quick_settings
from bench.report import Report, Transport, render_table, write_json
from bench.sdk import SdkSettings
from bench.sdk_throughput import ThroughputSettings
from bench.suite import Suite, SuiteSettings
from bench.targets import Target, external_server, own_server_embedded, own_server_on_real_backends

_DEFAULT_DURATION_S = 5.0
_QUICK_DURATION_S = 2.0
_DEFAULT_GRACE_S = 15.0
_QUICK_GRACE_S = 5.0
_TRANSPORTS: tuple[Transport, ...] = ("http", "http-rows", "grpc", "mlflow")
_DEFAULT_TRANSPORTS: tuple[Transport, ...] = ("http", "grpc")
_MAX_WRITERS = 512
_MAX_IN_FLIGHT = 16
_MAX_DURATION_S = 3600.0
_WORKLOADS = ("ingest", "overload", "query", "sdk", "baseline", "reference", "breakdown",
              "queued", "mlflow", "peers", "floor")
# breakdown needs py-spy and a minute of its own; queued (bench.queued) a deployment of its
# own and about five minutes; mlflow the official client (bench/mlflow.py); peers other
# servers (bench/peers.py): asked for by name only.
# floor (bench/floor.py): one kept-alive connection's per-request latency; runs alone.
_DEFAULT_WORKLOADS = frozenset(_WORKLOADS) - {"breakdown", "queued", "mlflow", "peers", "floor"}
_DEFAULT_BREAKDOWN_WRITERS = 8
_DEFAULT_WRITERS = (1, 8, 32, 128)
_QUICK_WRITERS = (1, 8)
_OVERLOAD_WRITERS = (4, 32, 128)
_QUICK_OVERLOAD_WRITERS = (4, 64)
# The overload server's pipeline: a few 1000-point batches, so K writers exceed it quickly.
_OVERLOAD_PIPELINE_MAX_ROWS = "8000"
_SDK_LOG_CALLS = 200_000
_QUICK_SDK_LOG_CALLS = 20_000
_SDK_POINTS = 1_000_000  # per throughput variant
_QUICK_SDK_POINTS = 20_000
_SDK_METRICS_PER_CALL = 20
_SDK_PACED_POINTS_PER_S = 200_000  # the SDK's target from one process
_SDK_IN_FLIGHT = (1, 4)
_QUICK_SDK_IN_FLIGHT = (4,)


def _workloads(text: str) -> frozenset[str]:
    names = frozenset(part.strip() for part in text.split(",") if part.strip())
    if not names or names - set(_WORKLOADS):
        raise argparse.ArgumentTypeError(f"workloads are a comma list of {', '.join(_WORKLOADS)}")
    return names


def _writer_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of integers, got {text!r}") from None
    if not counts or any(not 1 <= count <= _MAX_WRITERS for count in counts):
        raise argparse.ArgumentTypeError(f"writer counts must be 1..{_MAX_WRITERS}")
    return counts


def _in_flight(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= _MAX_IN_FLIGHT:
        raise argparse.ArgumentTypeError(f"batches in flight must be 1..{_MAX_IN_FLIGHT}")
    return value


def _transports(text: str) -> tuple[Transport, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in _TRANSPORTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"transports are a comma list of {', '.join(_TRANSPORTS)}")
    return cast(tuple[Transport, ...], names)


def _peer(text: str) -> tuple[str, str]:
    try:
        return parse_peer(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= _MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"expected 0 < seconds <= {_MAX_DURATION_S:g}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("expected a positive integer")
    return value


def _env_assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="MLRun load generator: ingest over HTTP and gRPC against a direct ClickHouse"
        " insert baseline measured in the same run.",
    )
    where = parser.add_argument_group("target (default: start an own server on real backends)")
    where.add_argument("--url", help="an existing server's HTTP base URL")
    where.add_argument("--api-key", default=os.environ.get("MLRUN_API_KEY"),
                       help="API key for --url (default: $MLRUN_API_KEY)")
    where.add_argument("--grpc-target",
                       help="HOST:PORT of the server's gRPC listener (default: URL host, 50051)")
    where.add_argument("--server-pid", type=int,
                       help="PID of the --url server, to measure its CPU and peak RSS")
    where.add_argument("--clickhouse-url",
                       help="the --url server's ClickHouse HTTP interface (default: from"
                       " CLICKHOUSE_HOST/CLICKHOUSE_PORT), for the baseline and the count-back")
    where.add_argument("--clickhouse-user", default=os.environ.get("CLICKHOUSE_USER", "default"))
    where.add_argument("--clickhouse-password",
                       default=os.environ.get("CLICKHOUSE_PASSWORD", ""),
                       help="(default: $CLICKHOUSE_PASSWORD)")
    where.add_argument("--clickhouse-database",
                       default=os.environ.get("CLICKHOUSE_DATABASE") or "mlrun")
    where.add_argument("--embedded", action="store_true",
                       help="start an own server on the embedded default instead")
    where.add_argument("--server-env", type=_env_assignment, action="append", default=[],
                       metavar="NAME=VALUE", help="extra environment for an own server")

    load = parser.add_argument_group("load")
    load.add_argument("--workloads", type=_workloads, default=_DEFAULT_WORKLOADS,
                      help=f"comma list of {','.join(_WORKLOADS)} (default all but breakdown;"
                      " the references run whenever ingest, baseline or breakdown does)")
    load.add_argument("--peer", type=_peer, action="append", default=[],
                      help="NAME=URL of a server speaking MLflow's REST API (workload peers)")
    load.add_argument("--writers", type=_writer_counts,
                      help="comma list of writer counts K (default 1,8,32,128; --quick 1,8)")
    load.add_argument("--in-flight", type=_in_flight, default=1,
                      help="batches each ingest writer keeps in flight (default 1): over gRPC"
                      " that many calls on the writer's one HTTP/2 connection, over HTTP/1.1"
                      " that many connections")
    load.add_argument("--overload-writers", type=_writer_counts,
                      help="K steps of the overload workload (default 4,32,128; --quick 4,64)")
    load.add_argument("--transports", type=_transports, default=_DEFAULT_TRANSPORTS,
                      help="comma list of http (the columnar `series` wire form), http-rows (the"
                      " row form `metrics: [...]`), grpc (default http,grpc)")
    load.add_argument("--breakdown-writers", type=_writer_counts,
                      help=f"the one K of the breakdown workload (default"
                      f" {_DEFAULT_BREAKDOWN_WRITERS})")
    load.add_argument("--sample-rate", type=_positive_int, default=DEFAULT_RATE_HZ,
                      help=f"py-spy samples per second for the breakdown (default"
                      f" {DEFAULT_RATE_HZ})")
    load.add_argument("--batch-size", type=_positive_int, default=1000,
                      help="points per batch (default 1000)")
    load.add_argument("--duration", type=_positive_seconds,
                      help=f"seconds per workload (default {_DEFAULT_DURATION_S:g},"
                      f" --quick {_QUICK_DURATION_S:g})")
    load.add_argument("--quick", action="store_true",
                      help="a smoke run: short workloads, the whole run under a minute")
    load.add_argument("--sdk-points", type=_positive_int,
                      help=f"points per SDK throughput variant (default {_SDK_POINTS:_},"
                      f" --quick {_QUICK_SDK_POINTS:_})")
    load.add_argument("--sdk-metrics", type=_positive_int, default=_SDK_METRICS_PER_CALL,
                      help=f"metrics per log() call of the SDK throughput run (default"
                      f" {_SDK_METRICS_PER_CALL})")
    load.add_argument("--sdk-in-flight", type=_writer_counts,
                      help="comma list of max_batches_in_flight for the SDK throughput run"
                      " (default 1,4; --quick 4)")
    load.add_argument("--request-timeout", type=_positive_seconds, default=15.0,
                      help="client timeout of one request, seconds (default 15)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="directory for the JSON report (default bench-out/)")
    args = parser.parse_args(argv)
    if args.url and args.embedded:
        parser.error("--url and --embedded exclude each other")
    if args.url and not args.api_key:
        parser.error("--url needs --api-key (or MLRUN_API_KEY)")
    if not args.url and (args.server_pid or args.grpc_target or args.clickhouse_url):
        parser.error("--server-pid, --grpc-target and --clickhouse-url go with --url")
    if args.breakdown_writers is not None and len(args.breakdown_writers) != 1:
        parser.error("the breakdown runs at one load level: --breakdown-writers K")
    if "breakdown" in args.workloads and args.url and not args.server_pid:
        parser.error("the breakdown samples the server: --url needs --server-pid")
    if "queued" in args.workloads and (len(args.workloads) > 1 or args.url or args.embedded):
        parser.error("--workloads queued runs alone, on backends it starts itself")
    if "floor" in args.workloads and len(args.workloads) > 1:
        parser.error("--workloads floor runs alone")
    return args


def _clickhouse_of(args: argparse.Namespace) -> ClickHouseServerStore | None:
    if args.clickhouse_url:
        parts = urllib.parse.urlsplit(args.clickhouse_url)
        host, port = parts.hostname, parts.port or 8123
    else:
        host = os.environ.get("CLICKHOUSE_HOST") or None
        port = int(os.environ.get("CLICKHOUSE_PORT") or 8123)
    if host is None:
        return None
    return ClickHouseServerStore(host=host, port=port, user=args.clickhouse_user,
                                 password=args.clickhouse_password,
                                 database=args.clickhouse_database)


@contextlib.contextmanager
def _target(args: argparse.Namespace, log_dir: Path,
            overrides: dict[str, str] | None = None) -> Iterator[Target]:
    extra_env = {**(overrides or {}), **dict(args.server_env)}
    if args.url:
        grpc_target = args.grpc_target
        if grpc_target is None:
            grpc_target = f"{urllib.parse.urlsplit(args.url).hostname}:50051"
        yield external_server(url=args.url, api_key=args.api_key, grpc_target=grpc_target,
                              server_pid=args.server_pid, clickhouse=_clickhouse_of(args))
    elif args.embedded:
        with own_server_embedded(extra_env, keep_log_in=log_dir) as target:
            yield target
    else:
        with own_server_on_real_backends(extra_env, keep_log_in=log_dir) as target:
            yield target


def _progress(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace, settings: SuiteSettings, log_dir: Path) -> Report:
    """Everything but overload on one target; overload on a second server with a small pipeline
    (or on the same --url server), merged into one report."""
    report: Report | None = None
    if settings.workloads - {"overload"}:
        with _target(args, log_dir) as target:
            report = Suite(target, settings).run(_progress)
    if "overload" not in settings.workloads:
        assert report is not None
        return report
    overrides = {} if args.url else {"MLRUN_PIPELINE_MAX_ROWS": _OVERLOAD_PIPELINE_MAX_ROWS}
    _progress("overload: starting a server with a small pipeline" if overrides else
              "overload: on the given server")
    with _target(args, log_dir / "overload", overrides) as target:
        overloaded = Suite(target, settings).run_overload(_progress)
    env = {**overrides, **dict(args.server_env)}
    if report is None:
        return msgspec.structs.replace(overloaded, overload_server_env=env)
    return msgspec.structs.replace(
        report, overload=overloaded.overload, overload_server_env=env,
        problems=[*report.problems, *overloaded.problems],
        notes=[*report.notes, *(n for n in overloaded.notes if n not in report.notes)],
        exactly_once=None if report.exactly_once is None and overloaded.exactly_once is None
        else (report.exactly_once is not False and overloaded.exactly_once is not False),
        finished_at=overloaded.finished_at)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    stem = "bench-" + datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir: Path = args.out
    log_dir = out_dir / f"{stem}-logs"
    duration_s = args.duration or (_QUICK_DURATION_S if args.quick else _DEFAULT_DURATION_S)
    quick = args.quick
    if "queued" in args.workloads:
        from bench.queued import QueuedSettings, main_queued

        return main_queued(QueuedSettings(
            writers=args.writers or (8, 32), duration_s=args.duration or (3.0 if quick else 8.0),
            burst_s=8.0 if quick else 20.0, visible_s=5.0 if quick else 10.0,
            batch_points=args.batch_size, request_timeout_s=args.request_timeout),
            out_dir, stem, _progress)
    if "floor" in args.workloads:
        from bench.floor import FloorSettings, main_floor

        return main_floor(lambda: _target(args, log_dir),
                          FloorSettings(duration_s=args.duration or (5.0 if quick else 30.0)),
                          out_dir, stem, _progress)
    settings = SuiteSettings(
        writers=args.writers or (_QUICK_WRITERS if quick else _DEFAULT_WRITERS),
        in_flight=args.in_flight,
        transports=args.transports,
        duration_s=duration_s,
        batch_points=args.batch_size,
        request_timeout_s=args.request_timeout,
        grace_s=_QUICK_GRACE_S if args.quick else _DEFAULT_GRACE_S,
        quick=args.quick,
        workloads=args.workloads,
        overload_writers=args.overload_writers or (
            _QUICK_OVERLOAD_WRITERS if quick else _OVERLOAD_WRITERS),
        sdk=SdkSettings(log_calls=_QUICK_SDK_LOG_CALLS if quick else _SDK_LOG_CALLS,
                        max_wall_s=10.0 if quick else 30.0,
                        visible_samples=10 if quick else 50, visible_timeout_s=10.0,
                        finish_timeout_s=30.0,
                        throughput=ThroughputSettings(
                            points=args.sdk_points or (
                                _QUICK_SDK_POINTS if quick else _SDK_POINTS),
                            metrics_per_call=args.sdk_metrics,
                            transports=tuple(t for t in args.transports if t in ("http", "grpc")),
                            in_flight=args.sdk_in_flight or (
                                _QUICK_SDK_IN_FLIGHT if quick else _SDK_IN_FLIGHT),
                            max_wall_s=10.0 if quick else 60.0, finish_timeout_s=60.0,
                            paced_points_per_s=None if quick else _SDK_PACED_POINTS_PER_S)),
        query=quick_settings(quick),
        breakdown_writers=(args.breakdown_writers or (_DEFAULT_BREAKDOWN_WRITERS,))[0],
        sample_rate_hz=args.sample_rate,
        log_dir=log_dir,
        peers=tuple(args.peer),
    )
    try:
        _progress("starting the target" if not args.url else f"target {args.url}")
        report = _run(args, settings, log_dir)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 1
    plot = write_plot(report, out_dir, stem)
    if plot is not None:
        report = msgspec.structs.replace(report, plot=str(plot))
    path = write_json(report, out_dir, stem)
    print(render_table(report))
    print(f"\nreport: {path}" + (f"\nplot: {plot}" if plot else ""))
    return 1 if report.problems or report.exactly_once is False else 0


if __name__ == "__main__":
    sys.exit(main())
