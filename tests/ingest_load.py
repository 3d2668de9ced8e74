"""Load helpers shared by the write-path fault tests: retrying writer threads that record every
answer, and the exactly-once check that counts stored points back inside ClickHouse.

Clients here are plain retrying loops in threads (honouring Retry-After, capped at 2 s to keep
the suite short); every loop is bounded by a batch count and a time budget.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from readback import ClickHouseReader
from server_process import TEST_API_KEY

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}", "content-type": "application/json"}
# Every request must be answered within this bound (the server's own deadlines sum to < 10 s).
ANSWER_BOUND_S = 10.0


def batch_body(run_id: str, worker: int, index: int, batches: int, points: int) -> bytes:
    """Batch `index` of writer `worker`: `points` consecutive steps of `loss` = step / 7."""
    first = (worker * batches + index) * points
    return json.dumps({
        "run_id": run_id, "batch_id": f"w{worker}-b{index}",
        "series": [{"name": "loss", "steps": list(range(first, first + points)),
                    "values": [step / 7 for step in range(first, first + points)]}],
    }).encode()


def server_rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@dataclass
class LoadStats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    acked_points: int = 0
    acked_steps: set[int] = field(default_factory=set)
    acked_batches: set[tuple[int, int]] = field(default_factory=set)  # (worker, index)
    statuses: dict[int, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    max_latency_s: float = 0.0
    retry_after_values: set[str] = field(default_factory=set)
    connection_errors: int = 0
    failures: list[str] = field(default_factory=list)

    def record(self, response: httpx.Response, latency_s: float) -> None:
        with self.lock:
            self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
            self.max_latency_s = max(self.max_latency_s, latency_s)
            if response.status_code != 200:
                code = response.json()["error"]["code"]
                self.codes[code] = self.codes.get(code, 0) + 1
            if response.status_code == 429:
                self.retry_after_values.add(response.headers.get("retry-after", "missing"))


def run_writer(url: Callable[[], str], run_id: str, worker: int, batches: int, points: int,
               stats: LoadStats, give_up_at: float) -> None:
    """Send `batches` batches, each retried with its own batch_id until acknowledged."""
    with httpx.Client(headers=AUTH, timeout=ANSWER_BOUND_S + 5) as http:
        for index in range(batches):
            if stats.stop.is_set():
                return
            first = (worker * batches + index) * points
            body = batch_body(run_id, worker, index, batches, points)
            while True:
                if time.monotonic() > give_up_at:
                    with stats.lock:
                        stats.failures.append(f"w{worker}-b{index} never acknowledged")
                    return
                started = time.monotonic()
                try:
                    response = http.post(f"{url()}/api/v1/ingest/batch", content=body)
                except httpx.TransportError:
                    with stats.lock:
                        stats.connection_errors += 1
                    time.sleep(0.2)
                    continue
                stats.record(response, time.monotonic() - started)
                if response.status_code == 200:
                    answer = response.json()
                    with stats.lock:
                        # A duplicate was stored by an earlier attempt whose answer was lost
                        # (e.g. to the SIGKILL): its points are acknowledged now.
                        stats.acked_points += points if answer["duplicate"] else answer["accepted"]
                        stats.acked_steps.update(range(first, first + points))
                        stats.acked_batches.add((worker, index))
                    break
                if response.status_code == 429:
                    time.sleep(min(float(response.headers["retry-after"]), 2.0))
                elif response.status_code == 503:
                    time.sleep(0.3)
                else:
                    with stats.lock:
                        stats.failures.append(f"unexpected {response.status_code}: {response.text}")
                    return


def start_writers(url: Callable[[], str], run_id: str, writers: int, batches: int, points: int,
                  stats: LoadStats, budget_s: float) -> list[threading.Thread]:
    give_up_at = time.monotonic() + budget_s
    threads = [threading.Thread(target=run_writer,
                                args=(url, run_id, w, batches, points, stats, give_up_at))
               for w in range(writers)]
    for thread in threads:
        thread.start()
    return threads


def assert_exactly_once(reader: ClickHouseReader, run_id: str, acked_steps: set[int]) -> None:
    """Every acknowledged step is stored, once, with its value; nothing else is.

    Checked inside ClickHouse (shipping millions of rows to the test would dominate its run
    time): the distinct steps' count, sum and sum of squares match the acknowledged set's, no
    step falls outside it, every last-written value is right, and FINAL and the summary agree.
    """
    where = f"run_id = '{run_id}'"
    (stats,) = reader.rows(
        # UInt64 sums wrap around (modulo 2^64), as the Python side below does on purpose.
        "SELECT count() AS n, sum(step) AS s, sum(toUInt64(step) * toUInt64(step)) AS s2, "
        "min(step) AS lo, "
        "max(step) AS hi, countIf(abs(v - step / 7) > 1e-9) AS wrong FROM "
        f"(SELECT step, argMax(value, version) AS v FROM metrics WHERE {where} GROUP BY step)")
    assert stats == {
        "n": len(acked_steps), "s": sum(acked_steps),
        "s2": sum(x * x for x in acked_steps) % 2**64,
        "lo": min(acked_steps), "hi": max(acked_steps), "wrong": 0}
    assert reader.scalar(f"SELECT count() FROM metrics FINAL WHERE {where}") == len(acked_steps)
    summary = reader.rows(
        f"SELECT name, maxMerge(last_step) AS last FROM metrics_summary WHERE {where}"
        " GROUP BY name")
    assert summary == [{"name": summary[0]["name"], "last": max(acked_steps)}]
    assert reader.block_step_counts(where) == {summary[0]["name"]: len(acked_steps)}


