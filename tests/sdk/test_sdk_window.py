"""The sender's window over its lanes (`max_batches_in_flight` > 1): one batch in flight until
the server acknowledges one, then one more per acknowledged batch up to the lanes; an overloaded
or unavailable answer closes it to one again. Ordering safety stays the outbox's (disjoint
ranges); the window only bounds how many go at once."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fault_server import Fault, FaultServer, overloaded, wait_until

import mlrun
from mlrun.sdk.ops import BatchOp
from mlrun.sdk.outbox import Outbox
from mlrun.sdk.settings import Settings
from mlrun.sdk.spool import Spool
from mlrun.sdk.statistics import Counters
from mlrun.wire.schemas import IngestBatch, MetricSeries

pytestmark = pytest.mark.timeout(120)

_HANG_S = 0.3


@pytest.fixture
def fake() -> Any:
    server = FaultServer().start()
    yield server
    server.stop()


def _batch(index: int) -> BatchOp:
    steps = list(range(index * 10, index * 10 + 10))
    series = MetricSeries(name="loss", steps=steps, values=[1.0] * 10)
    return BatchOp(request=IngestBatch(run_id="r", batch_id=f"b{index}", seq=index,
                                       series=[series]), points=10)


def test_the_window_bounds_how_many_disjoint_batches_are_taken(tmp_path: Path) -> None:
    outbox = Outbox(Spool.open(tmp_path / "spool", max_bytes=1 << 30), max_memory_ops=64,
                    counters=Counters())
    for index in range(4):
        outbox.push(_batch(index))
    outbox.set_window(1)
    first = outbox.take(0, max_in_flight=4)
    assert first is not None and outbox.take(0, max_in_flight=4) is None
    outbox.set_window(3)
    assert [op.pos for op in (outbox.take(0, max_in_flight=4),
                              outbox.take(0, max_in_flight=4)) if op] == [1, 2]
    assert outbox.take(0, max_in_flight=4) is None  # three in flight: the window is full
    outbox.settle(first)
    outbox.set_window(1)  # closing does not stop those in flight, it holds back the next
    assert outbox.take(0, max_in_flight=4) is None


def _settings(url: str, tmp_path: Path) -> Settings:
    return Settings.load(environ={}, server_url=url, spool_dir=tmp_path, max_batch_points=100,
                         max_batches_in_flight=4, max_batch_age_s=0.05, finish_timeout_s=60.0)


def _overlapping(starts: list[float]) -> int:
    """How many attempts began less than a hang after the previous one (it was still held)."""
    return sum(1 for before, after in itertools.pairwise(starts)
               if after - before < _HANG_S * 0.8)


def test_one_batch_in_flight_until_one_is_acknowledged_then_the_window_opens(
    fake: FaultServer, tmp_path: Path
) -> None:
    fake.inject(*[Fault("hang", seconds=_HANG_S)] * 12)  # each batch held for a while
    run = mlrun.init("p", settings=_settings(fake.url, tmp_path))
    for step in range(1200):  # 12 batches of 100, formed at once
        run.log({"loss": step * 0.001}, step=step)
    run.finish()
    starts = [at for _, at in fake.attempts]
    assert len(starts) == 12
    # The second batch waited for the first's answer: the window starts at one.
    assert starts[1] - starts[0] >= _HANG_S * 0.8
    # Later ones went while others were held: the window opened.
    assert _overlapping(starts) >= 3
    stored = Counter(s for b in fake.accepted for series in b["series"] for s in series["steps"])
    assert stored == Counter(range(1200))


def test_an_overloaded_answer_closes_the_window_to_one(
    fake: FaultServer, tmp_path: Path
) -> None:
    run = mlrun.init("p", settings=_settings(fake.url, tmp_path))
    for step in range(600):  # 6 quick batches: the window opens to four
        run.log({"loss": step * 0.001}, step=step)
    wait_until(lambda: run.statistics().batches_delivered == 6, 30, "the first batches")
    fake.inject(overloaded(1), *[Fault("hang", seconds=_HANG_S)] * 6)
    before = len(fake.attempts)
    for step in range(600, 700):  # one batch: refused, its lane waits the server's delay
        run.log({"loss": step * 0.001}, step=step)
    wait_until(lambda: run.statistics().overloaded_responses == 1, 30, "the 429")
    for step in range(700, 1200):  # 5 more, formed at once while it waits
        run.log({"loss": step * 0.001}, step=step)
    run.finish()
    starts = [at for _, at in fake.attempts[before:]]
    # Refused once, the same batch came back after its delay; the window had closed to one:
    # nothing else went meanwhile, and the next batch waited for the retry's answer.
    assert len(starts) == 7 and run.statistics().overloaded_responses == 1
    assert starts[1] - starts[0] >= 1.0
    assert starts[2] - starts[1] >= _HANG_S * 0.8
    assert _overlapping(starts[2:]) >= 1  # and then it opened again
    stored = Counter(s for b in fake.accepted for series in b["series"] for s in series["steps"])
    assert stored == Counter(range(1200))
