"""More than one batch in flight per run (`max_batches_in_flight`): the outbox lets a batch go
alongside those in flight only when their order cannot matter to the server, and a run with
four lanes stores exactly what it logged (last write wins for re-logged steps, params once),
checked in ClickHouse behind a real `mlrun serve`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import mlrun
from mlrun.sdk.ops import BatchOp, FinishOp, InitOp, Op
from mlrun.sdk.outbox import Outbox, batch_key_ranges
from mlrun.sdk.settings import Settings
from mlrun.sdk.spool import Spool
from mlrun.sdk.statistics import Counters
from mlrun.wire.schemas import (
    FinishRun,
    IngestBatch,
    InitRun,
    MetricPoint,
    MetricSeries,
    Param,
)

from readback import ClickHouseReader
from server_process import TEST_API_KEY, ServerProcess

pytestmark = pytest.mark.timeout(300)


def batch(index: int, steps: range, name: str = "loss", **extra: object) -> BatchOp:
    series = MetricSeries(name=name, steps=list(steps), values=[float(index)] * len(steps))
    request = IngestBatch(run_id="r", batch_id=f"b{index}", seq=index, series=[series],
                          **extra)  # type: ignore[arg-type]
    return BatchOp(request=request, points=len(steps))


def outbox_of(tmp_path: Path, *ops: Op) -> Outbox:
    outbox = Outbox(Spool.open(tmp_path / "spool", max_bytes=1 << 30), max_memory_ops=64,
                    counters=Counters())
    for op in ops:
        outbox.push(op)
    return outbox


def label(op: Op | None) -> str | None:
    if op is None:
        return None
    if isinstance(op, BatchOp):
        return op.request.batch_id
    return "init" if isinstance(op, InitOp) else "finish"


def test_disjoint_batches_go_together_up_to_the_bound(tmp_path: Path) -> None:
    outbox = outbox_of(tmp_path, *(batch(i, range(i * 100, i * 100 + 100)) for i in range(4)))
    taken = [outbox.take(0, max_in_flight=3) for _ in range(3)]
    assert [label(op) for op in taken] == ["b0", "b1", "b2"]
    assert outbox.take(0, max_in_flight=3) is None  # the bound
    assert taken[1] is not None
    outbox.settle(taken[1])  # acknowledged out of order
    assert label(outbox.take(0, max_in_flight=3)) == "b3"
    assert outbox.pending_counts() == (3, 0)


def test_a_batch_relogging_steps_in_flight_waits_for_them(tmp_path: Path) -> None:
    outbox = outbox_of(tmp_path, batch(0, range(0, 100)), batch(1, range(100, 200)),
                       batch(2, range(150, 160)), batch(3, range(0, 10), name="acc"))
    first, second = outbox.take(0, max_in_flight=4), outbox.take(0, max_in_flight=4)
    assert (label(first), label(second)) == ("b0", "b1")
    # b2 re-logs steps of b1: it waits, and nothing after it overtakes it.
    assert outbox.take(0, max_in_flight=4) is None
    assert first is not None and second is not None
    outbox.settle(first)
    assert outbox.take(0, max_in_flight=4) is None
    outbox.settle(second)
    assert label(outbox.take(0, max_in_flight=4)) == "b2"
    assert label(outbox.take(0, max_in_flight=4)) == "b3"


def test_init_finish_and_params_go_alone(tmp_path: Path) -> None:
    init = InitOp(request=InitRun(project="p", run_id="r"))
    with_params = batch(2, range(200, 300), params=[Param(name="lr", value=0.1)])
    finish = FinishOp(run_id="r", request=FinishRun())
    outbox = outbox_of(tmp_path, init, batch(1, range(0, 100)), with_params,
                       batch(3, range(300, 400)), finish)
    order: list[str | None] = []
    while True:
        op = outbox.take(0, max_in_flight=8)
        if op is None:
            break
        order.append(label(op))
        alongside = outbox.take(0, max_in_flight=8)
        order.append(label(alongside))
        outbox.settle(op)
        if alongside is not None:
            outbox.settle(alongside)
    # Nothing went beside init, b2 (params), or finish; b3 did not start beside b2 either.
    assert order == ["init", None, "b1", None, "b2", None, "b3", None, "finish", None]
    assert batch_key_ranges(with_params) is None and batch_key_ranges(finish) is None


def test_offline_spills_every_operation_in_flight_and_goes_one_at_a_time(
    tmp_path: Path,
) -> None:
    outbox = outbox_of(tmp_path, *(batch(i, range(i * 10, i * 10 + 10)) for i in range(4)))
    a, b = outbox.take(0, max_in_flight=4), outbox.take(0, max_in_flight=4)
    outbox.set_offline(True)
    assert outbox.pending_counts() == (4, 4)  # everything durable, in flight included
    assert outbox.take(0, max_in_flight=4) is None  # offline: no more alongside
    assert a is not None and b is not None
    outbox.settle(b)
    outbox.settle(a)
    assert outbox.pending_counts() == (2, 2)
    assert label(outbox.take(0, max_in_flight=4)) == "b2"
    assert outbox.take(0, max_in_flight=4) is None


def test_row_points_and_system_metrics_count_as_keys() -> None:
    rows = BatchOp(request=IngestBatch(run_id="r", metrics=[
        MetricPoint(name="acc", value=1.0, step=7), MetricPoint(name="acc", value=1.0, step=3)],
        system_metrics=[MetricPoint(name="cpu", value=1.0, step=0, timestamp=50)]), points=3)
    assert batch_key_ranges(rows) == {("m", "acc"): (3, 7), ("s", "cpu"): (50, 50)}
    no_clock = BatchOp(request=IngestBatch(run_id="r", system_metrics=[
        MetricPoint(name="cpu", value=1.0, step=0)]), points=1)
    assert batch_key_ranges(no_clock) is None  # the server's clock orders it


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    process = ServerProcess(server_env, tmp_path / "server.log")
    servers.append(process)
    process.start()
    yield process
    process.stop()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_run_with_four_batches_in_flight_stores_what_it_logged(
    transport: str, server: ServerProcess, clickhouse_reader: ClickHouseReader, tmp_path: Path
) -> None:
    settings = Settings.load(
        environ={}, server_url=server.base_url, grpc_target=server.grpc_target,
        api_key=TEST_API_KEY, spool_dir=tmp_path, transport=transport,
        max_batches_in_flight=4, max_batch_points=2_000, finish_timeout_s=120.0)
    run = mlrun.init("in-flight", settings=settings)
    for step in range(60_000):
        run.log({"loss": float(step), "acc": -float(step)}, step=step)
        if step == 30_000:
            run.log_params({"lr": 0.1})
    for step in range(10_000, 12_000):  # re-logged: the later value must win
        run.log({"loss": 1e6 + step}, step=step)
    run.log_params({"lr": 0.2})  # write-once: the first value stays
    run.finish(timeout_s=120)
    stats = run.statistics()
    assert stats.pending_operations == 0 and stats.dead_lettered == 0
    where = f"run_id = '{run.run_id}'"
    assert clickhouse_reader.scalar(f"SELECT count() FROM metrics FINAL WHERE {where}") == 120_000
    relogged = clickhouse_reader.rows(
        "SELECT count() AS n, min(v - step) AS lo, max(v - step) AS hi FROM"
        " (SELECT step, argMax(value, version) AS v FROM metrics"
        f" WHERE {where} AND name = 'loss' AND step >= 10000 AND step < 12000 GROUP BY step)")
    assert relogged == [{"n": 2_000, "lo": 1e6, "hi": 1e6}]
    untouched = clickhouse_reader.scalar(
        "SELECT countIf(v != step) FROM (SELECT step, argMax(value, version) AS v FROM metrics"
        f" WHERE {where} AND name = 'loss' AND (step < 10000 OR step >= 12000) GROUP BY step)")
    assert untouched == 0
    detail = httpx.get(f"{server.base_url}/api/v1/runs/{run.run_id}", timeout=30,
                       headers={"Authorization": f"Bearer {TEST_API_KEY}"}).json()
    assert str(detail["params"]["lr"]) == "0.1"  # write-once: the first value stayed
