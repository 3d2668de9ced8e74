"""The outbox: one order across memory and spool, the memory bound, offline spilling of the
operation in flight, and what happens when both memory and spool are full."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlrun.sdk.ops import BatchOp, FinishOp, Op, encode_op
from mlrun.sdk.outbox import Outbox
from mlrun.sdk.spool import Spool, frame
from mlrun.sdk.statistics import Counters
from mlrun.wire.schemas import FinishRun, IngestBatch, MetricSeries

pytestmark = pytest.mark.timeout(30)


def batch(index: int, points: int = 10) -> BatchOp:
    series = MetricSeries(name="loss", steps=list(range(points)), values=[1.0] * points,
                          timestamps=[1] * points)
    return BatchOp(request=IngestBatch(run_id="r", batch_id=f"b{index}", seq=index,
                                       series=[series]), points=points)


def make(tmp_path: Path, *, max_memory_ops: int, max_bytes: int = 1 << 30,
         counters: Counters | None = None) -> Outbox:
    spool = Spool.open(tmp_path / "spool", max_bytes=max_bytes)
    return Outbox(spool, max_memory_ops=max_memory_ops, counters=counters or Counters())


def batch_id(op: Op) -> str:
    assert isinstance(op, BatchOp)
    return op.request.batch_id or ""


def take_all(outbox: Outbox) -> list[str]:
    ids = []
    while (op := outbox.take(timeout_s=0)) is not None:
        ids.append(batch_id(op))
        outbox.settle(op)
    return ids


def test_order_holds_across_memory_and_spool(tmp_path: Path) -> None:
    counters = Counters()
    outbox = make(tmp_path, max_memory_ops=2, counters=counters)
    for index in range(6):
        outbox.push(batch(index))
    assert counters.spilled_batches == 4  # the oldest are spilled: the spool is the prefix
    assert outbox.pending_counts() == (6, 4)
    assert take_all(outbox) == [f"b{i}" for i in range(6)]
    assert not list((tmp_path / "spool").glob("*.op"))  # settled files are deleted


def test_offline_spills_the_operation_in_flight_ahead_of_newer_ones(tmp_path: Path) -> None:
    outbox = make(tmp_path, max_memory_ops=10)
    for index in range(3):
        outbox.push(batch(index))
    in_flight = outbox.take(timeout_s=0)
    assert in_flight is not None and batch_id(in_flight) == "b0"
    outbox.push(batch(3))
    outbox.set_offline(True)
    outbox.push(batch(4))  # offline: straight to disk
    assert outbox.pending_counts() == (5, 5)
    assert outbox.wait_durable(4, timeout_s=0)
    outbox.settle(in_flight)
    assert outbox.pending_counts() == (4, 4)
    outbox.set_offline(False)
    assert take_all(outbox) == ["b1", "b2", "b3", "b4"]


def test_a_reopened_spool_replays_in_order(tmp_path: Path) -> None:
    first = Spool.open(tmp_path / "spool", max_bytes=1 << 30)
    outbox = Outbox(first, max_memory_ops=0, counters=Counters())
    for index in range(4):
        outbox.push(batch(index))
    outbox.push(FinishOp(run_id="r", request=FinishRun(status="finished")))
    first.close(remove_if_empty=False)  # the process ends
    spool = Spool.open(tmp_path / "spool", max_bytes=1 << 30)  # a later `mlrun sync`
    replay = Outbox(spool, max_memory_ops=0, counters=Counters(), recovered=spool.recover())
    taken: list[Op] = []
    while (op := replay.take(timeout_s=0)) is not None:
        taken.append(op)
        replay.settle(op)
    assert [batch_id(op) for op in taken[:4]] == ["b0", "b1", "b2", "b3"]
    assert isinstance(taken[4], FinishOp)


def test_memory_and_spool_full_drops_the_newest_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counters = Counters()
    file_bytes = len(frame(encode_op(batch(0))))
    outbox = make(tmp_path, max_memory_ops=1, max_bytes=file_bytes * 5 // 2, counters=counters)
    for index in range(6):
        outbox.push(batch(index, points=10))
    # Spool holds b0, b1; memory holds b2; b3..b5 were refused and dropped, never silently.
    assert counters.dropped_batches == 3 and counters.dropped_points == 30
    assert sum("cannot take more" in r.getMessage() for r in caplog.records) == 1
    assert take_all(outbox) == ["b0", "b1", "b2"]


def test_wait_settled_and_durable(tmp_path: Path) -> None:
    outbox = make(tmp_path, max_memory_ops=10)
    first = outbox.push(batch(0))
    second = outbox.push(batch(1))
    assert not outbox.wait_durable(first, timeout_s=0)
    assert outbox.spill(first)
    assert outbox.wait_durable(first, timeout_s=0)
    assert not outbox.wait_durable(second, timeout_s=0)
    assert not outbox.wait_settled(first, timeout_s=0)
    op = outbox.take(timeout_s=0)
    assert op is not None
    outbox.settle(op)
    assert outbox.wait_settled(first, timeout_s=0)
    assert not outbox.wait_settled(second, timeout_s=0)
