"""The `sdk` workload's throughput part: how many points one training process pushes through the
SDK to the server, end to end, and what each process on the box spends per point meanwhile.

Pattern (stated in every result): a loop of `run.log({name: value for ~20 names}, step=step)`
(`metrics_per_call` metrics in one call per step, names like `layer07/grad_norm`), as fast as
the loop goes ("flat out"), for `points` points per variant; then `run.finish()`, which returns
once every batch is acknowledged. Variants: each transport (HTTP columnar `series`, gRPC
`metric_columns`) times each `max_batches_in_flight`, one fresh run each, in that order; then,
per transport, the same loop paced at `paced_points_per_s` (a training loop that produces that
rate: flat out, log() outruns any server and the outbox spills to disk past its 16 batches in
memory, which costs the SDK an encode and a decode per spilled point).

Per variant:
- points/s end to end: points / (first `log()` → `finish()` returned with everything
  acknowledged), and the points counted back from ClickHouse (distinct (run, name, step));
- the `log()` call: wall time per call (p50/p99/max, `perf_counter_ns` around the call: GIL
  waits included) and the calling thread's CPU per call (`time.thread_time`);
- CPU µs per point of the SDK process (this process, minus the sampler below) split into the
  caller's thread, the batcher thread, the sender lanes and the rest (grpc's core threads,
  thread tails the sampler missed), and of the server, ClickHouse and PostgreSQL (from /proc);
- each process's CPU share (% of one core over the end-to-end wall time) and the machine's busy
  share: on a 2-core box the SDK process, the server and ClickHouse share the cores, so these
  say which one was the limit.

And, per transport, the SDK alone ("http, no server"): the same flat-out loop with the run's
transport swapped for one that encodes each batch exactly as the real one does (msgspec JSON
for HTTP, the protobuf message for gRPC) and acknowledges it at once: the SDK's own ceiling and
CPU per point when the server keeps up, apart from what the server and ClickHouse take from the
same two cores.

Thread split: the SDK's threads end with `finish()`, so a sampler thread reads their /proc CPU
every `_SAMPLE_S` (the last reading counts; what a thread spent after it is in "rest"); the
sampler's own CPU (`time.thread_time` inside it) is taken out of the process's.

Loops are bounded in count and time (`max_wall_s` ends the calls early; the count says so).
Must not import anyio (the SDK runs its own threads).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

import mlrun
import mlrun.sdk.run
from bench.errors import BenchError
from bench.metrics_store import StoreError, count_points
from bench.processes import UsageProbe, own_cpu_seconds, thread_cpu_seconds
from bench.report import CpuPerPoint, OverheadUs, SdkThroughput
from bench.targets import Target
from mlrun.sdk.ops import BatchOp, Op
from mlrun.sdk.retry import Delivered, Outcome
from mlrun.sdk.settings import Settings
from mlrun.sdk.transport import Transport

_PROJECT = "bench-sdk-throughput"
_SAMPLE_S = 0.02


@dataclass(frozen=True, slots=True)
class ThroughputSettings:
    points: int  # per variant
    metrics_per_call: int
    transports: tuple[str, ...]  # "http" | "grpc"
    in_flight: tuple[int, ...]  # max_batches_in_flight values
    max_wall_s: float  # per variant, for the log() loop
    finish_timeout_s: float
    # Also, per transport, a loop paced at this many points/s (at the largest in_flight): does
    # the SDK keep up with a training loop that produces this rate (nothing spilled, finish()
    # right after the last call)? None: not run.
    paced_points_per_s: int | None = None


class _NoServer:
    """A transport that encodes every batch as `transport` does and acknowledges it at once."""

    def __init__(self, transport: str) -> None:
        if transport == "grpc":
            from mlrun.sdk.transport_grpc import log_batch_request

            self._encode: Callable[[BatchOp], bytes] = (
                lambda op: log_batch_request(op.request).SerializeToString())
        else:
            encoder = msgspec.json.Encoder()  # loopback: no gzip (see transport_http)
            self._encode = lambda op: encoder.encode(op.request)

    def deliver(self, op: Op) -> Outcome:
        if isinstance(op, BatchOp):
            self._encode(op)
        return Delivered(accepted=op.points if isinstance(op, BatchOp) else 0)

    def heartbeat(self, run_id: str) -> Outcome:
        return Delivered()

    def probe(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _ThreadSampler:
    """The last /proc CPU reading of each of this process's threads, by thread name."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._stop = threading.Event()
        # (thread id, name): a thread id is reused by threads started later (grpc's come and go)
        self._last: dict[tuple[int, str], float] = {}
        self._before = self._read()
        self.own_cpu_s = 0.0
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        started = time.thread_time()
        while True:
            for key, cpu_s in self._read().items():
                self._last[key] = max(0.0, cpu_s - self._before.get(key, 0.0))
            self.own_cpu_s = time.thread_time() - started
            if self._stop.wait(_SAMPLE_S):
                break
        self.own_cpu_s = time.thread_time() - started

    def _read(self) -> dict[tuple[int, str], float]:
        names = {t.native_id: t.name for t in threading.enumerate()}
        return {(tid, names.get(tid, comm)): cpu_s
                for tid, (comm, cpu_s) in thread_cpu_seconds(self._pid).items()}

    def stop(self) -> dict[str, float]:
        """CPU seconds by thread kind: batcher, sender (every lane)."""
        self._stop.set()
        self._thread.join(5.0)
        kinds: dict[str, float] = {"batcher": 0.0, "sender": 0.0}
        for (_, name), cpu_s in self._last.items():
            for kind in kinds:
                if name.startswith(f"mlrun-{kind}-"):
                    kinds[kind] += cpu_s
        return kinds


def _percentile_us(sorted_ns: list[int], fraction: float) -> float | None:
    if not sorted_ns:
        return None
    rank = max(1, int(-(-fraction * len(sorted_ns) // 1)))
    return round(sorted_ns[rank - 1] / 1000, 2)


def _per_point_us(cpu_s: float | None, points: int) -> float | None:
    return None if cpu_s is None or points == 0 else round(cpu_s / points * 1e6, 3)


def _share_pct(cpu_s: float | None, wall_s: float) -> float | None:
    return None if cpu_s is None or wall_s <= 0 else round(100 * cpu_s / wall_s, 1)


def run_sdk_throughput(
    target: Target, settings: ThroughputSettings, spool_dir: str,
    progress: Callable[[str], None],
) -> list[SdkThroughput]:
    results = []
    for transport in settings.transports:
        if transport == "grpc" and target.grpc_target is None:
            continue
        variants: list[tuple[int, int | None]] = [(k, None) for k in settings.in_flight]
        if settings.paced_points_per_s:
            variants.append((max(settings.in_flight), settings.paced_points_per_s))
        for in_flight, rate in variants:
            progress(f"sdk: {settings.points} points, {settings.metrics_per_call} metrics per"
                     f" log(), {transport}, {in_flight} in flight,"
                     f" {'flat out' if rate is None else f'paced at {rate} points/s'}")
            results.append(_one(target, settings, spool_dir, transport, in_flight, rate))
        progress(f"sdk: {settings.points} points, {transport}, the SDK alone (no server)")
        real_open = mlrun.sdk.run.open_transport

        def no_server(options: Settings, transport: str = transport) -> Transport:
            return _NoServer(transport)

        mlrun.sdk.run.open_transport = no_server
        try:
            results.append(_one(target, settings, spool_dir, transport, 1, None,
                                no_server=True))
        finally:
            mlrun.sdk.run.open_transport = real_open
    return results


def _one(target: Target, settings: ThroughputSettings, spool_dir: str, transport: str,
         in_flight: int, rate: int | None, *, no_server: bool = False) -> SdkThroughput:
    options = mlrun.Settings.load(
        server_url=target.http_url, api_key=target.api_key, transport=transport,
        grpc_target=target.grpc_target, spool_dir=spool_dir, max_batches_in_flight=in_flight,
        finish_timeout_s=settings.finish_timeout_s)
    names = [f"layer{i:02d}/grad_norm" for i in range(settings.metrics_per_call)]
    calls = max(1, settings.points // len(names))
    run = mlrun.init(_PROJECT, settings=options)
    log = run.log
    clock = time.perf_counter_ns
    durations_ns: list[int] = []
    record = durations_ns.append
    probe = UsageProbe(target.watched)
    own_before = own_cpu_seconds()
    sampler = _ThreadSampler()
    sampler.start()
    caller_before = time.thread_time()
    started_ns = clock()
    deadline_ns = started_ns + int(settings.max_wall_s * 1e9)
    made = 0
    # Paced: call i is due at started + i * interval; sleep when more than 1 ms ahead.
    interval_ns = 0 if rate is None else int(1e9 * len(names) / rate)
    for step in range(calls):
        value = 1.0 / (step + 1)
        metrics = {name: value for name in names}  # the training loop's own work: not timed
        if interval_ns:
            ahead_ns = started_ns + step * interval_ns - clock()
            if ahead_ns > 1_000_000:
                time.sleep(ahead_ns / 1e9)
        before = clock()
        log(metrics, step=step)
        after = clock()
        record(after - before)
        made += 1
        if after > deadline_ns:
            break
    caller_cpu_s = time.thread_time() - caller_before
    log_wall_s = (clock() - started_ns) / 1e9
    run.finish(timeout_s=settings.finish_timeout_s)
    wall_s = (clock() - started_ns) / 1e9
    by_kind = sampler.stop()
    own_cpu_s = own_cpu_seconds() - own_before - sampler.own_cpu_s
    usage, _, busy_share = probe.finish()
    statistics = run.statistics()
    points = made * len(names)
    stored: int | None = None
    if target.store is not None and not no_server:
        connection = target.store.connect()
        try:
            stored = count_points(connection, [run.run_id]).distinct_points
        except StoreError as exc:
            raise BenchError(f"sdk: counting back failed: {exc}") from exc
        finally:
            connection.close()
    ordered = sorted(durations_ns)

    def cpu_of(name: str) -> float | None:
        used = usage.get(name)
        return None if used is None else used.cpu_s

    rest_s = max(0.0, own_cpu_s - caller_cpu_s - by_kind["batcher"] - by_kind["sender"])
    sdk = CpuPerPoint(
        total=_per_point_us(own_cpu_s, points), caller=_per_point_us(caller_cpu_s, points),
        batcher=_per_point_us(by_kind["batcher"], points),
        sender=_per_point_us(by_kind["sender"], points), rest=_per_point_us(rest_s, points))
    if no_server:
        usage = {}
    return SdkThroughput(
        transport=f"{transport}, no server" if no_server else transport,
        in_flight=in_flight,
        offered_points_per_s=rate,
        pattern=f"{len(names)} metrics per log(dict, step=) call, one call per step",
        log_calls=made,
        points=points,
        log_wall_s=round(log_wall_s, 3),
        end_to_end_s=round(wall_s, 3),
        points_per_s=round(points / wall_s) if wall_s > 0 else 0,
        acknowledged_points=statistics.points_delivered,
        stored_points=stored,
        log_call_us=OverheadUs(p50=_percentile_us(ordered, 0.50),
                               p99=_percentile_us(ordered, 0.99),
                               max=round(ordered[-1] / 1000, 1) if ordered else None),
        log_call_cpu_us=round(caller_cpu_s / made * 1e6, 2) if made else None,
        sdk_cpu_us_per_point=sdk,
        server_cpu_us_per_point=_per_point_us(cpu_of("server"), points),
        clickhouse_cpu_us_per_point=_per_point_us(cpu_of("clickhouse"), points),
        postgres_cpu_us_per_point=_per_point_us(cpu_of("postgres"), points),
        cpu_share_pct={"sdk": _share_pct(own_cpu_s, wall_s),
                       "server": _share_pct(cpu_of("server"), wall_s),
                       "clickhouse": _share_pct(cpu_of("clickhouse"), wall_s),
                       "postgres": _share_pct(cpu_of("postgres"), wall_s),
                       "machine_busy": round(100 * busy_share, 1)},
        batches=statistics.batches_delivered,
        spilled_batches=statistics.spilled_batches,
        retries=statistics.retries,
        load_average=round(os.getloadavg()[0], 1),
    )

