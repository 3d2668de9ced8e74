"""System metrics (opt-in): CPU, memory, disk and network from /proc, GPU through NVML when the
`pynvml` module (nvidia-ml-py) is importable, sampled every `interval_s` in a daemon thread and
logged to the run as `system_metrics` (step = sample number).

Names: cpu.percent, cpu.process_percent, memory.percent, memory.used_bytes,
memory.process_rss_bytes, disk.used_percent, disk.read_bytes_per_s, disk.write_bytes_per_s,
network.rx_bytes_per_s, network.tx_bytes_per_s, gpu.<i>.utilization_percent,
gpu.<i>.memory_used_bytes, gpu.<i>.memory_percent. Rates need two samples, so the first sample
has gauges only. A source that cannot be read (not Linux, a container without /proc/diskstats)
is simply absent from the sample.

No psutil: /proc is parsed by the pure `parse_*` functions below (unit-tested on fixed text).
Must not import httpx, grpc or `mlrun.server`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("mlrun.sdk")

_SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors whatever the device's sector size
_VIRTUAL_DISK_PREFIXES = ("loop", "ram", "zram", "dm-", "md", "sr", "nbd")


def parse_cpu_times(proc_stat: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat's first line."""
    fields = proc_stat.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError("no aggregate cpu line")
    values = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already
    # inside user/nice, so only the first eight fields are summed.
    total = sum(values[:8])
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return total - idle, total


def parse_meminfo(meminfo: str) -> dict[str, int]:
    """Numeric fields of /proc/meminfo (or /proc/self/status), sizes in bytes."""
    out: dict[str, int] = {}
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def parse_net_dev(net_dev: str) -> tuple[int, int]:
    """(received, transmitted) bytes over every interface except loopback."""
    rx = tx = 0
    for line in net_dev.splitlines()[2:]:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if name.strip() == "lo" or len(fields) < 9:
            continue
        rx += int(fields[0])
        tx += int(fields[8])
    return rx, tx


def parse_diskstats(diskstats: str, disks: set[str]) -> tuple[int, int]:
    """(read, written) bytes over the whole disks named in `disks` (partitions are skipped so
    nothing is counted twice)."""
    read = written = 0
    for line in diskstats.splitlines():
        fields = line.split()
        if len(fields) >= 10 and fields[2] in disks:
            read += int(fields[5]) * _SECTOR_BYTES
            written += int(fields[9]) * _SECTOR_BYTES
    return read, written


def physical_disks(sys_block: Path) -> set[str]:
    try:
        names = {p.name for p in sys_block.iterdir()}
    except OSError:
        return set()
    return {n for n in names if not n.startswith(_VIRTUAL_DISK_PREFIXES)}


@dataclass(frozen=True, slots=True)
class _Counters:
    at_s: float
    cpu: tuple[int, int] | None
    process_cpu_s: float
    disk: tuple[int, int] | None
    net: tuple[int, int] | None


class _Nvml:
    """GPU utilisation and memory through NVML; disabled for good after its first failure."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._nvml = pynvml
        except ImportError:
            return
        except Exception as exc:  # NVML raises its own NVMLError tree; no GPU is not a failure
            logger.info("mlrun: NVML unavailable, no GPU metrics (%s)", exc)

    def sample(self) -> dict[str, float]:
        if self._nvml is None:
            return {}
        out: dict[str, float] = {}
        try:
            for index, handle in enumerate(self._handles):
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                out[f"gpu.{index}.utilization_percent"] = float(rates.gpu)
                out[f"gpu.{index}.memory_used_bytes"] = float(memory.used)
                out[f"gpu.{index}.memory_percent"] = 100.0 * memory.used / max(1, memory.total)
        except Exception as exc:
            logger.warning("mlrun: NVML failed (%s); GPU metrics are off for this run", exc)
            self._nvml = None
            return {}
        return out


class SystemMonitor:
    def __init__(
        self,
        interval_s: float,
        emit: Callable[[dict[str, float]], None],
        *,
        disk_path: Path = Path("/"),
        proc: Path = Path("/proc"),
        sys_block: Path = Path("/sys/block"),
    ) -> None:
        self.interval_s = interval_s
        self._emit = emit
        self._disk_path = disk_path
        self._proc = proc
        self._disks = physical_disks(sys_block)
        self._gpu = _Nvml()
        self._previous: _Counters | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlrun-system-monitor",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(max(0.0, timeout_s))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._emit(self.sample())
            except Exception:
                logger.exception("mlrun: system metrics sampling failed; it stops")
                return
            self._stop.wait(self.interval_s)

    def sample(self) -> dict[str, float]:
        now = _Counters(
            at_s=time.monotonic(),
            cpu=self._read(lambda: parse_cpu_times(self._text("stat"))),
            process_cpu_s=sum(os.times()[:2]),
            disk=self._read(lambda: parse_diskstats(self._text("diskstats"), self._disks)),
            net=self._read(lambda: parse_net_dev(self._text("net/dev"))),
        )
        out = self._gauges()
        previous, self._previous = self._previous, now
        if previous is not None:
            out.update(_rates(previous, now))
        out.update(self._gpu.sample())
        return out

    def _gauges(self) -> dict[str, float]:
        out: dict[str, float] = {}
        memory = self._read(lambda: parse_meminfo(self._text("meminfo")))
        if memory and memory.get("MemTotal"):
            total = memory["MemTotal"]
            used = total - memory.get("MemAvailable", memory.get("MemFree", 0))
            out["memory.used_bytes"] = float(used)
            out["memory.percent"] = 100.0 * used / total
        status = self._read(lambda: parse_meminfo(self._text("self/status")))
        if status and "VmRSS" in status:
            out["memory.process_rss_bytes"] = float(status["VmRSS"])
        try:
            disk = os.statvfs(self._disk_path)
            size = disk.f_blocks * disk.f_frsize
            if size:
                out["disk.used_percent"] = 100.0 * (size - disk.f_bavail * disk.f_frsize) / size
        except OSError:
            pass
        return out

    def _text(self, name: str) -> str:
        return (self._proc / name).read_text()

    @staticmethod
    def _read(read: Callable[[], Any]) -> Any:
        try:
            return read()
        except (OSError, ValueError, IndexError):
            return None


def _rates(before: _Counters, after: _Counters) -> dict[str, float]:
    elapsed_s = after.at_s - before.at_s
    if elapsed_s <= 0:
        return {}
    out: dict[str, float] = {}
    if before.cpu and after.cpu and after.cpu[1] > before.cpu[1]:
        busy = after.cpu[0] - before.cpu[0]
        out["cpu.percent"] = 100.0 * busy / (after.cpu[1] - before.cpu[1])
    # Percent of one core, like `top`: a process using two cores shows 200.
    out["cpu.process_percent"] = 100.0 * (after.process_cpu_s - before.process_cpu_s) / elapsed_s
    if before.disk and after.disk:
        out["disk.read_bytes_per_s"] = (after.disk[0] - before.disk[0]) / elapsed_s
        out["disk.write_bytes_per_s"] = (after.disk[1] - before.disk[1]) / elapsed_s
    if before.net and after.net:
        out["network.rx_bytes_per_s"] = (after.net[0] - before.net[0]) / elapsed_s
        out["network.tx_bytes_per_s"] = (after.net[1] - before.net[1]) / elapsed_s
    return out
