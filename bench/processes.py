"""CPU seconds and peak RSS of the processes a workload loads: from /proc, by PID.

Owns: reading utime+stime of a process (all its threads; for PostgreSQL, the postmaster plus
its live children, since every connection is a backend process), its peak RSS (`VmHWM`),
resetting that peak before a workload (`/proc/<pid>/clear_refs` <- "5", Linux >= 4.0, needs
root or the same user; when refused, the peak is since the process started and the report says
so), and the machine-wide busy share from /proc/stat (two cores shared by everything: this
shows whether the machine, rather than one process, was the limit).

`UsageProbe` takes a snapshot before a workload and turns the one after into a `Usage`.
Invariants: only reads /proc (and writes clear_refs of the PIDs it is given); a process that
vanished reads as None, never as an error. Must not import anyio.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_cpu_seconds(path: Path) -> float | None:
    try:
        stat = path.read_text()
    except OSError:
        return None
    # Fields after the command name, which may contain spaces and parentheses.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of `pid`, all threads included; None if it is gone."""
    return _stat_cpu_seconds(_PROC / str(pid) / "stat")


def main_thread_cpu_seconds(pid: int) -> float | None:
    """utime + stime of the thread whose id is `pid` (the main thread: for the server, the
    event loop); None if it is gone."""
    return _stat_cpu_seconds(_PROC / str(pid) / "task" / str(pid) / "stat")


def _children(pid: int) -> list[int]:
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU of `pid` and its live children (PostgreSQL: postmaster and backends). CPU of
    children that exited in between is lost; the server's pooled connections live on."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(cpu_seconds(child) or 0.0 for child in _children(pid))


def peak_rss_bytes(pid: int) -> int | None:
    try:
        status = (_PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak_rss(pid: int) -> bool:
    """Make VmHWM restart from the current RSS; False when the kernel refuses."""
    try:
        (_PROC / str(pid) / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    first = (_PROC / "stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first[:8]]  # user nice system idle iowait irq softirq steal
    total = sum(values)
    return total - values[3] - values[4], total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_s: float
    peak_rss_bytes: int | None
    peak_rss_since_start: bool  # the peak could not be reset: it is the process's lifetime peak


@dataclass(frozen=True, slots=True)
class Watched:
    pid: int
    tree: bool = False  # count live children too (PostgreSQL)
    rss: bool = True  # report peak RSS (meaningless for a postmaster tree)


class UsageProbe:
    """Snapshot before a workload; `finish()` after it gives each process's usage in between,
    the bench process's own CPU, and the machine's busy share."""

    def __init__(self, watched: Mapping[str, Watched]) -> None:
        self._watched = dict(watched)
        self._reset = {
            name: reset_peak_rss(w.pid) for name, w in self._watched.items() if w.rss
        }
        self._cpu = {name: self._cpu_of(w) for name, w in self._watched.items()}
        self._own = own_cpu_seconds()
        self._machine = machine_ticks()

    @staticmethod
    def _cpu_of(watched: Watched) -> float | None:
        return tree_cpu_seconds(watched.pid) if watched.tree else cpu_seconds(watched.pid)

    def finish(self) -> tuple[dict[str, Usage | None], float, float]:
        """(usage per watched name, bench CPU seconds, machine busy share 0..1)."""
        busy_after, total_after = machine_ticks()
        own = own_cpu_seconds() - self._own
        usage: dict[str, Usage | None] = {}
        for name, watched in self._watched.items():
            before, after = self._cpu[name], self._cpu_of(watched)
            if before is None or after is None:
                usage[name] = None
                continue
            usage[name] = Usage(
                cpu_s=round(max(after - before, 0.0), 3),
                peak_rss_bytes=peak_rss_bytes(watched.pid) if watched.rss else None,
                peak_rss_since_start=watched.rss and not self._reset.get(name, False),
            )
        busy_before, total_before = self._machine
        ticks = total_after - total_before
        busy_share = (busy_after - busy_before) / ticks if ticks > 0 else 0.0
        return usage, own, busy_share
