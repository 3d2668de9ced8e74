"""The batch builder (pure) and the batching thread: coalescing, the count / bytes / age
triggers, local validation, and batch identity."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from mlrun.sdk.batcher import (
    FLUSH,
    METRICS,
    PARAMS,
    SYSTEM,
    TAGS,
    BatchBuilder,
    Batcher,
    FlushRequest,
)
from mlrun.sdk.ops import BatchOp, decode_op
from mlrun.sdk.outbox import Outbox
from mlrun.sdk.spool import Spool, unframe
from mlrun.sdk.statistics import Counters

pytestmark = pytest.mark.timeout(30)


def builder(counters: Counters | None = None, **limits: float) -> BatchBuilder:
    return BatchBuilder("run-1", max_points=int(limits.get("max_points", 1000)),
                        max_bytes=int(limits.get("max_bytes", 1 << 20)),
                        max_age_s=limits.get("max_age_s", 10.0), counters=counters or Counters())


def test_repeated_metric_and_step_is_coalesced_to_the_last_value() -> None:
    counters = Counters()
    b = builder(counters)
    b.add(METRICS, 0, 1.0, {"loss": 1.0, "acc": 0.5})
    b.add(METRICS, 1, 2.0, {"loss": 0.9})
    b.add(METRICS, 0, 3.0, {"loss": 0.7})  # step 0 again: last value wins, timestamp too
    op = b.cut(batch_id="b1", seq=0)
    assert op is not None
    series = {s.name: s for s in op.request.series}
    assert series["loss"].steps == [0, 1]
    assert series["loss"].values == [0.7, 0.9]
    assert series["loss"].timestamps == [3000, 2000]
    assert series["acc"].steps == [0] and series["acc"].values == [0.5]
    assert op.points == 3
    assert counters.logged_points == 4 and counters.coalesced_points == 1
    assert b.empty


def test_count_trigger_counts_points_before_coalescing() -> None:
    b = builder(max_points=3)
    b.add(METRICS, 0, 1.0, {"a": 1, "b": 2})
    assert not b.full()
    b.add(METRICS, 0, 1.0, {"a": 3})
    assert b.full() and b.due(time.monotonic())


def test_bytes_trigger_fires_on_large_params_before_the_count() -> None:
    b = builder(max_points=1000, max_bytes=2000)
    b.add(PARAMS, 0, 1.0, {"notes": "x" * 1500})
    assert not b.full()
    b.add(TAGS, 0, 1.0, {"long": "y" * 600})
    assert b.full()
    op = b.cut(batch_id="b", seq=0)
    assert op is not None and op.points == 0
    assert [p.name for p in op.request.params] == ["notes"]
    assert [t.key for t in op.request.tags] == ["long"]


def test_age_trigger_uses_the_first_entry_time() -> None:
    b = builder(max_age_s=0.5)
    assert not b.due(time.monotonic() + 100)  # empty: never due
    b.add(METRICS, 0, 1.0, {"a": 1})
    started = b.deadline - 0.5
    assert not b.due(started + 0.4)
    assert b.due(started + 0.5)


def test_invalid_values_are_dropped_counted_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counters = Counters()
    b = builder(counters)
    b.add(METRICS, 0, 1.0, {"loss": math.nan, "ok": 1.0, "x" * 300: 1.0, "bad": "abc"})
    b.add(METRICS, 1, 1.0, {"loss": math.inf, "ok": 2.0})
    b.add(METRICS, -1, 1.0, {"ok": 3.0})
    b.add(METRICS, 2.5, 1.0, {"ok": 4.0})
    b.add(METRICS, [3], 1.0, {"ok": 5.0, "new": 1.0})  # an unhashable step
    op = b.cut(batch_id="b", seq=0)
    assert op is not None
    assert [(s.name, s.steps) for s in op.request.series] == [("ok", [0, 1])]
    assert counters.invalid_points == 8
    nan_warnings = [r for r in caplog.records if "'loss'" in r.getMessage()]
    assert len(nan_warnings) == 1  # NaN and inf share a reason: warned once


def test_a_batch_of_only_invalid_points_is_not_formed() -> None:
    counters = Counters()
    b = builder(counters)
    b.add(METRICS, 0, 1.0, {"loss": math.nan})
    assert b.cut(batch_id="b", seq=0) is None
    assert counters.batches_formed == 0 and counters.invalid_points == 1


def test_param_values_become_wire_scalars() -> None:
    b = builder()
    b.add(PARAMS, 0, 1.0, {"lr": 0.1, "epochs": 3, "adam": True, "layers": [64, 32],
                           "none": None, "huge": 2**70, "nan": math.nan})
    op = b.cut(batch_id="b", seq=0)
    assert op is not None
    assert {p.name: p.value for p in op.request.params} == {
        "lr": 0.1, "epochs": 3, "adam": True, "layers": "[64,32]", "none": "null",
        "huge": str(2**70), "nan": "nan"}


def test_system_metrics_use_the_point_form() -> None:
    b = builder()
    b.add(SYSTEM, 0, 1.5, {"cpu.percent": 12.5})
    b.add(SYSTEM, 1, 2.5, {"cpu.percent": 14.0})
    op = b.cut(batch_id="b", seq=0)
    assert op is not None and op.request.series == []
    assert [(p.name, p.step, p.value, p.timestamp) for p in op.request.system_metrics] == [
        ("cpu.percent", 0, 12.5, 1500), ("cpu.percent", 1, 14.0, 2500)]
    assert op.points == 2


def make_outbox(tmp_path: Path, counters: Counters, max_memory_ops: int = 100) -> Outbox:
    spool = Spool.open(tmp_path / "spool", max_bytes=1 << 30)
    return Outbox(spool, max_memory_ops=max_memory_ops, counters=counters)


def drain_ops(outbox: Outbox) -> list[BatchOp]:
    ops = []
    while (op := outbox.take(timeout_s=0)) is not None:
        assert isinstance(op, BatchOp)
        ops.append(op)
        outbox.settle(op)
    return ops


def test_batcher_thread_cuts_by_count_and_flush_with_fresh_identities(tmp_path: Path) -> None:
    counters = Counters()
    outbox = make_outbox(tmp_path, counters)
    batcher = Batcher("run-1", outbox=outbox, counters=counters, max_points=1000,
                      max_bytes=1 << 30, max_age_s=60.0)
    batcher.start()
    for step in range(2500):
        batcher.entries.append((METRICS, step, 1.0, {"loss": float(step)}))
        batcher.nudge(len(batcher.entries))
    flush = FlushRequest()
    batcher.entries.append((FLUSH, 0, 0.0, flush))
    batcher.wake()
    assert flush.done.wait(10)
    ops = drain_ops(outbox)
    assert [op.points for op in ops] == [1000, 1000, 500]
    assert [op.request.seq for op in ops] == [0, 1, 2]
    assert len({op.request.batch_id for op in ops}) == 3
    assert flush.pos == ops[-1].pos
    steps = [s for op in ops for series in op.request.series for s in series.steps]
    assert steps == list(range(2500))
    batcher.stop()
    assert batcher.join(5)


def test_batcher_thread_cuts_by_age_without_being_nudged(tmp_path: Path) -> None:
    counters = Counters()
    outbox = make_outbox(tmp_path, counters)
    batcher = Batcher("run-1", outbox=outbox, counters=counters, max_points=10_000,
                      max_bytes=1 << 30, max_age_s=0.05)
    batcher.start()
    batcher.entries.append((METRICS, 0, 1.0, {"loss": 1.0}))
    batcher.nudge(1)
    op = outbox.take(timeout_s=10)
    assert isinstance(op, BatchOp) and op.points == 1
    batcher.stop()
    assert batcher.join(5)


def test_spilled_batches_keep_their_identity_on_disk(tmp_path: Path) -> None:
    counters = Counters()
    outbox = make_outbox(tmp_path, counters, max_memory_ops=1)
    b = builder(counters)
    formed = []
    for index in range(3):
        b.add(METRICS, index, 1.0, {"loss": 1.0})
        op = b.cut(batch_id=f"id-{index}", seq=index)
        assert op is not None
        formed.append(op)
        outbox.push(op)
    files = sorted((tmp_path / "spool").glob("*.op"))
    assert len(files) == 2 and counters.spilled_batches == 2
    on_disk = [decode_op(unframe(f.read_bytes())) for f in files]
    assert [op.request.batch_id for op in on_disk if isinstance(op, BatchOp)] == ["id-0", "id-1"]
    taken = drain_ops(outbox)
    assert [op.request.batch_id for op in taken] == ["id-0", "id-1", "id-2"]
