"""Where the server's CPU goes, per point: py-spy samples split the CPU that /proc measured.

Owns `StageProfiler`, wrapped around one workload window: it starts `py-spy record` on the
server's PID (a child process of the bench, stopped by its PID), reads the server's CPU and its
main thread's CPU from /proc before and after, tallies the samples into stages
(`bench.stages`) and returns a `Breakdown`.

Why this method (measured on the 2-core box, server on real backends, 8 HTTP writers):
- No server change and no tracing overhead inside it: py-spy reads the server's memory from
  outside (`--nonblocking`: the server is never paused). cProfile or yappi inside the server
  would multiply the cost of every Python call and see only one thread (cProfile).
- `--gil`: a sample counts only the thread holding the GIL. Without it, py-spy counts a thread
  that is runnable as busy, and on a loaded 2-core box the event loop waking up from epoll and
  the idle worker threads' wake-ups came out as ~1.7x the CPU /proc measured; with it the
  sampled seconds came to 0.8-1.1x of it (`coverage`).
- The CPU itself is exact: /proc gives the process's CPU and its main thread's (the trio event
  loop); the rest is the worker threads (PostgreSQL calls). Each group's CPU is shared out by
  that group's samples, so CPU spent without the GIL (libpq, the kernel) stays with the
  threads that spent it. `coverage` (sampled seconds / measured seconds) says how much of the
  CPU the samples saw.
- Cost: py-spy itself uses ~5 % of a core at 250 Hz (reported as `sampler_cpu_s`); it shares
  the two cores with the server, so a breakdown's rate is a little below a plain ingest run's.

Invariants: bounded in time (py-spy gets `--duration`, and is killed by its PID if it has not
ended `_GRACE_S` after that); samples go to a file under the run's log directory. Must not import
anyio or the server.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

from bench.errors import BenchError
from bench.processes import cpu_seconds, main_thread_cpu_seconds
from bench.report import Breakdown, StageCost
from bench.stages import MAIN_GROUP, STAGES, WORKER_GROUP, split_cpu, tally_raw

_GRACE_S = 30.0
_SAMPLE_LINE = re.compile(r"Samples: (?P<samples>\d+) Errors: (?P<errors>\d+)")
DEFAULT_RATE_HZ = 250


def find_py_spy() -> str:
    """py-spy next to this Python (a virtualenv's bin/) or on PATH, else a BenchError."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("py-spy")
    if found:
        return found
    raise BenchError("the breakdown workload samples the server with py-spy:"
                     " pip install py-spy (into the bench's virtualenv)")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class StageProfiler:
    """`start()` right before the writers, `finish(points)` right after them."""

    def __init__(self, pid: int, *, duration_s: float, rate_hz: int, out_path: Path,
                 py_spy: str) -> None:
        self._pid = pid
        self._duration_s = max(1, int(duration_s))  # py-spy takes whole seconds
        self._rate_hz = rate_hz
        self._out_path = out_path
        self._py_spy = py_spy
        self._process: subprocess.Popen[bytes] | None = None
        self._cpu_before: tuple[float | None, float | None] = (None, None)
        self._children_before = 0.0

    def start(self) -> None:
        self._out_path.parent.mkdir(parents=True, exist_ok=True)
        self._children_before = _children_cpu_seconds()
        self._process = subprocess.Popen(
            [self._py_spy, "record", "--pid", str(self._pid), "--duration",
             str(self._duration_s), "--rate", str(self._rate_hz), "--format", "raw",
             "--nonblocking", "--gil", "--threads", "--full-filenames",
             "--output", str(self._out_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._cpu_before = (cpu_seconds(self._pid), main_thread_cpu_seconds(self._pid))

    def stop(self) -> None:
        """Kill py-spy by its PID if it still runs (errors, Ctrl-C)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)

    def finish(self, points: int, elapsed_s: float) -> tuple[Breakdown | None, str | None]:
        """The breakdown of the CPU of the `elapsed_s` the writers ran, or None and the reason
        it could not be made."""
        process = self._process
        assert process is not None, "start() first"
        total_after = cpu_seconds(self._pid)
        main_after = main_thread_cpu_seconds(self._pid)
        try:
            output, _ = process.communicate(timeout=self._duration_s + _GRACE_S)
        except subprocess.TimeoutExpired:
            self.stop()
            return None, "py-spy did not finish in time; killed"
        sampler_cpu_s = _children_cpu_seconds() - self._children_before
        text = output.decode("utf-8", errors="replace")
        if process.returncode != 0 or not self._out_path.exists():
            last = text.strip().splitlines()[-1] if text.strip() else f"exit {process.returncode}"
            return None, f"py-spy failed: {last[:200]}"
        total_before, main_before = self._cpu_before
        if None in (total_before, total_after, main_before, main_after) or points <= 0:
            return None, "the server's CPU could not be read from /proc"
        assert total_before is not None and total_after is not None
        assert main_before is not None and main_after is not None
        server_cpu_s = max(total_after - total_before, 0.0)
        main_cpu_s = min(max(main_after - main_before, 0.0), server_cpu_s)
        with self._out_path.open(encoding="utf-8", errors="replace") as lines:
            tally = tally_raw(lines)
        samples = tally.total()
        counted = _SAMPLE_LINE.search(text)
        split = split_cpu(tally, {MAIN_GROUP: main_cpu_s,
                                  WORKER_GROUP: server_cpu_s - main_cpu_s})
        names = [*STAGES, *sorted(name for name in split if name not in STAGES)]
        stages = [
            StageCost(stage=name, cpu_us_per_point=round(split[name] * 1e6 / points, 3),
                      share=round(split[name] / server_cpu_s, 4) if server_cpu_s > 0 else 0.0)
            for name in names if name in split
        ]
        sampled_s = samples / self._rate_hz
        # py-spy saw whole seconds of the window only; compare like with like.
        window_cpu_s = server_cpu_s * min(1.0, self._duration_s / elapsed_s) if elapsed_s else 0.0
        return Breakdown(
            sampler=f"py-spy record --gil --nonblocking --rate {self._rate_hz}",
            sampled_window_s=float(self._duration_s),
            samples=samples,
            main_thread_samples=tally.total(MAIN_GROUP),
            sample_errors=int(counted["errors"]) if counted else None,
            server_cpu_s=round(server_cpu_s, 3),
            main_thread_cpu_s=round(main_cpu_s, 3),
            worker_threads_cpu_s=round(server_cpu_s - main_cpu_s, 3),
            server_cpu_us_per_point=round(server_cpu_s * 1e6 / points, 3),
            coverage=round(sampled_s / window_cpu_s, 3) if window_cpu_s > 0 else None,
            stages=stages,
            framework_leaf_share=round(tally.framework_leaf / samples, 4) if samples else None,
            unclaimed_leaves=dict(tally.other_leaves.most_common(5)),
            sampler_cpu_s=round(sampler_cpu_s, 3),
            samples_file=str(self._out_path),
        ), None
