"""CPU seconds and peak RSS of the processes a workload loads: from /proc, by PID.

Owns: reading utime+stime of a process (all its threads; for PostgreSQL, the postmaster plus
its live children, since every connection is a backend process), its peak RSS (`VmHWM`),
resetting that peak before a workload (`/proc/<pid>/clear_refs` <- "5", Linux >= 4.0, needs
root or the same user; when refused, the peak is since the process started and the report says
so), the machine-wide busy share from /proc/stat (two cores shared by everything: this
shows whether the machine, rather than one process, was the limit), and, for a process whose
threads are named after their job (clickhouse-server), its CPU per kind of thread: ClickHouse's
query threads (the INSERTs and their materialized views) apart from its background pool (merges),
which run on after the INSERTs that caused them and grow with the number of small parts.

`UsageProbe` takes a snapshot before a workload and turns the one after into a `Usage`.
Invariants: only reads /proc (and writes clear_refs of the PIDs it is given); a process that
vanished reads as None, never as an error. Must not import anyio.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of `pid`: its name (`comm`) and its CPU seconds."""
    threads: dict[int, tuple[str, float]] = {}
    try:
        tasks = list((_PROC / str(pid) / "task").iterdir())
    except OSError:
        return threads
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # exited while we looked
        cpu = _stat_cpu_seconds(task / "stat")
        if cpu is not None:
            threads[int(task.name)] = (name, cpu)
    return threads


# clickhouse-server names its threads after their pool: 18.16 `BackgrProcPool` (merges and
# mutations), newer `BgSchPool`, `BgMBSchPool`, `MergeMutate`, `BgMoveProcPool`, ...
_CLICKHOUSE_BACKGROUND = ("BackgrProc", "BgSch", "BgMB", "BgMove", "BgDistSch", "MergeMutate",
                          "MergeTreeBG", "Fetch", "Move")


def clickhouse_thread_kind(name: str) -> str:
    """`background` for a clickhouse-server pool thread (merges), `queries` for the rest
    (HTTP handlers running the INSERTs and their views, and the main thread)."""
    return "background" if name.startswith(_CLICKHOUSE_BACKGROUND) else "queries"


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
    # CPU per kind of thread, when the process is watched with `thread_kinds` (threads that
    # ended in between are missing: this may add up to a little less than cpu_s).
    cpu_s_by_thread_kind: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Watched:
    pid: int
    tree: bool = False  # count live children too (PostgreSQL)
    rss: bool = True  # report peak RSS (meaningless for a postmaster tree)
    # Thread name -> kind: CPU is also reported per kind (clickhouse_thread_kind).
    thread_kinds: Callable[[str], str] | None = field(default=None, compare=False)


class UsageProbe:
    """Snapshot before a workload; `finish()` after it gives each process's usage in between,
    the bench process's own CPU, and the machine's busy share."""

    def __init__(self, watched: Mapping[str, Watched]) -> None:
        self._watched = dict(watched)
        self._reset = {
            name: reset_peak_rss(w.pid) for name, w in self._watched.items() if w.rss
        }
        self._cpu = {name: self._cpu_of(w) for name, w in self._watched.items()}
        self._threads = {name: thread_cpu_seconds(w.pid)
                         for name, w in self._watched.items() if w.thread_kinds is not None}
        self._own = own_cpu_seconds()
        self._machine = machine_ticks()

    def _by_kind(self, name: str, watched: Watched) -> dict[str, float] | None:
        kind_of = watched.thread_kinds
        if kind_of is None:
            return None
        before = self._threads.get(name, {})
        by_kind: dict[str, float] = {}
        for tid, (thread, cpu_s) in thread_cpu_seconds(watched.pid).items():
            kind = kind_of(thread)
            spent = max(cpu_s - before.get(tid, (thread, 0.0))[1], 0.0)
            by_kind[kind] = by_kind.get(kind, 0.0) + spent
        return {kind: round(cpu_s, 3) for kind, cpu_s in sorted(by_kind.items())}

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
                cpu_s_by_thread_kind=self._by_kind(name, watched),
            )
        busy_before, total_before = self._machine
        ticks = total_after - total_before
        busy_share = (busy_after - busy_before) / ticks if ticks > 0 else 0.0
        return usage, own, busy_share
