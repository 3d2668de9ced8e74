"""System metrics: the /proc parsers on fixed text, a real sample of this machine, and an
opt-in run that records them as system_metrics (offline: read back from its spool)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import mlrun
from mlrun.sdk.ops import BatchOp, decode_op
from mlrun.sdk.settings import Settings
from mlrun.sdk.spool import unframe
from mlrun.sdk.system_monitor import (
    SystemMonitor,
    parse_cpu_times,
    parse_diskstats,
    parse_meminfo,
    parse_net_dev,
)

pytestmark = pytest.mark.timeout(30)

PROC_STAT = "cpu  100 5 50 800 20 0 5 0 7 0\ncpu0 50 2 25 400 10 0 2 0 0 0\n"
MEMINFO = "MemTotal:       1000 kB\nMemFree:         200 kB\nMemAvailable:    400 kB\n"
STATUS = "Name:\tpython\nVmRSS:\t    2048 kB\nThreads:\t4\n"
NET_DEV = """Inter-|   Receive |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets ...
    lo: 999 1 0 0 0 0 0 0 999 1 0 0 0 0 0 0
  eth0: 1000 10 0 0 0 0 0 0 500 5 0 0 0 0 0 0
  eth1: 24 1 0 0 0 0 0 0 12 1 0 0 0 0 0 0
"""
DISKSTATS = """   7       0 loop0 10 0 80 0 0 0 16 0 0 0 0
 253       0 vda 100 0 2000 0 50 0 1000 0 0 0 0
 253       1 vda1 90 0 1800 0 40 0 900 0 0 0 0
"""


def test_parsers_on_fixed_text() -> None:
    # busy = total - idle - iowait; guest (7) is already inside user and not added again
    assert parse_cpu_times(PROC_STAT) == (160, 980)
    assert parse_meminfo(MEMINFO) == {"MemTotal": 1_024_000, "MemFree": 204_800,
                                      "MemAvailable": 409_600}
    assert parse_meminfo(STATUS) == {"VmRSS": 2_097_152, "Threads": 4}
    assert parse_net_dev(NET_DEV) == (1024, 512)  # loopback excluded
    assert parse_diskstats(DISKSTATS, {"vda"}) == (2000 * 512, 1000 * 512)  # no partitions
    with pytest.raises(ValueError):
        parse_cpu_times("intr 1 2 3\n")


def test_a_real_sample_has_gauges_then_rates(tmp_path: Path) -> None:
    samples: list[dict[str, float]] = []
    monitor = SystemMonitor(60.0, samples.append, disk_path=tmp_path)
    first = monitor.sample()
    assert 0 < first["memory.percent"] < 100
    assert first["memory.process_rss_bytes"] > 1 << 20
    assert 0 <= first["disk.used_percent"] <= 100
    assert "cpu.percent" not in first  # a rate needs two samples
    # CPU work between the samples: 50 ms of it, whatever the machine's speed, so that the
    # process's CPU counters (kept in 10 ms clock ticks) move (a fixed loop could fit in a tick).
    started = time.process_time()
    while time.process_time() - started < 0.05:
        sum(i * i for i in range(10_000))
    time.sleep(0.05)
    second = monitor.sample()
    assert 0 <= second["cpu.percent"] <= 100
    assert second["cpu.process_percent"] > 0
    assert second["network.rx_bytes_per_s"] >= 0 and second["disk.write_bytes_per_s"] >= 0


def test_an_opted_in_run_logs_system_metrics(tmp_path: Path) -> None:
    settings = Settings.load(environ={}, offline=True, spool_dir=tmp_path,
                             system_metrics_interval_s=0.05)
    run = mlrun.init("p", settings=settings)
    deadline = time.monotonic() + 10
    while run.statistics().logged_points < 10 and time.monotonic() < deadline:
        run.flush(1)
        time.sleep(0.05)
    run.finish()
    ops = [decode_op(unframe(path.read_bytes()))
           for path in sorted(Path(run.statistics().spool_dir).glob("*-batch.op"))]
    points = [p for op in ops if isinstance(op, BatchOp) for p in op.request.system_metrics]
    names = {p.name for p in points}
    assert {"memory.percent", "cpu.percent", "memory.process_rss_bytes"} <= names
    steps = sorted({p.step for p in points if p.name == "memory.percent"})
    assert steps == list(range(len(steps))) and len(steps) >= 2
    assert all(op.request.series == [] for op in ops if isinstance(op, BatchOp))
