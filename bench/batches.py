"""The rows every workload sends: one batch shape, shared by the ingest writers and the baseline.

Owns: which points make up batch `seq` of a writer (metric names, steps, values, timestamp),
and their encodings: the HTTP JSON body in either wire form (`series`: columnar, one object per
metric name with parallel arrays; `rows`: one `{name, value, step, timestamp}` object per point,
the form hand-written clients and MLflow-style APIs send; the `http` and `http-rows`
transports), the gRPC `LogBatchRequest` (columnar `metric_columns`), and RowBinary rows of the
`metrics` table (through `mlrun.server.protocols.clickhouse.encode_metric_rows`, the server's
own encoder).

Invariants:
- Batch `seq` of a writer covers steps [seq * S, (seq + 1) * S) of every metric name (S =
  points per batch / names), so within one run every (name, step) is sent by exactly one batch:
  counting a run's distinct (name, step) back from ClickHouse counts acknowledged points.
- `batch_id` is unique per (run, seq) and stays the same on every retry of that batch.
- Baseline rows and ingest batches carry the same names, steps, values and timestamps: the
  baseline inserts what the server would have stored.

Must not import the server's I/O modules (protocols only) and does no I/O itself.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Literal

from mlrun.server.protocols.clickhouse import MetricRow, encode_metric_rows
from mlrun.wire.proto.mlrun.v1 import ingest_pb2
from mlrun.wire.schemas import IngestBatch, MetricPoint, MetricSeries, json_encoder

# How an HTTP batch carries its points: `IngestBatch.series` or `IngestBatch.metrics`.
WireForm = Literal["series", "rows"]
_MAX_METRIC_NAMES = 10
_VALUE_SEED = 20240611  # fixed, so every run of the bench sends the same values


@dataclass(frozen=True, slots=True)
class BatchShape:
    """How one batch looks: `len(metric_names)` series of `steps_per_batch` points each."""

    metric_names: tuple[str, ...]
    steps_per_batch: int
    # One column of values per metric name, reused by every batch (the values do not matter
    # to any measurement; generating fresh ones would only cost the load generator CPU).
    values: tuple[list[float], ...]

    @property
    def points_per_batch(self) -> int:
        return len(self.metric_names) * self.steps_per_batch

    @classmethod
    def for_points(
        cls, points_per_batch: int, max_metric_names: int = _MAX_METRIC_NAMES
    ) -> BatchShape:
        """The shape of a batch of `points_per_batch` points: as many metric names as divide it
        evenly, up to `max_metric_names` (a training step logs a handful of metrics at once)."""
        if points_per_batch < 1:
            raise ValueError("a batch needs at least one point")
        names = max(n for n in range(1, max_metric_names + 1) if points_per_batch % n == 0)
        steps = points_per_batch // names
        rng = random.Random(_VALUE_SEED)
        return cls(
            metric_names=tuple(f"bench/metric_{index:02d}" for index in range(names)),
            steps_per_batch=steps,
            values=tuple([rng.random() for _ in range(steps)] for _ in range(names)),
        )


@dataclass(frozen=True, slots=True)
class Batch:
    """Batch `seq` of the writer of `run_id`."""

    shape: BatchShape
    run_id: str
    seq: int
    timestamp_ms: int

    @property
    def batch_id(self) -> str:
        return f"{self.run_id}/{self.seq}"

    @property
    def points(self) -> int:
        return self.shape.points_per_batch

    def steps(self) -> list[int]:
        first = self.seq * self.shape.steps_per_batch
        return list(range(first, first + self.shape.steps_per_batch))


def make_batch(shape: BatchShape, run_id: str, seq: int) -> Batch:
    """Batch `seq` of a writer, stamped now (a training job stamps points when it logs them)."""
    return Batch(shape=shape, run_id=run_id, seq=seq, timestamp_ms=time.time_ns() // 1_000_000)


def http_body(batch: Batch, form: WireForm = "series") -> bytes:
    """`POST /api/v1/ingest/batch` JSON with the points in the columnar `series` form, or in
    the `rows` form (`metrics`: one object per point, metric by metric)."""
    if form == "rows":
        return http_rows_body(batch)
    steps = batch.steps()
    timestamps = [batch.timestamp_ms] * len(steps)
    series = [
        MetricSeries(name=name, steps=steps, values=values, timestamps=timestamps)
        for name, values in zip(batch.shape.metric_names, batch.shape.values, strict=True)
    ]
    return json_encoder.encode(
        IngestBatch(run_id=batch.run_id, batch_id=batch.batch_id, seq=batch.seq, series=series)
    )


def http_rows_body(batch: Batch) -> bytes:
    """The same points as `http_body(batch)`, one `{name, value, step, timestamp}` each."""
    steps = batch.steps()
    timestamp_ms = batch.timestamp_ms
    points = [
        MetricPoint(name=name, value=value, step=step, timestamp=timestamp_ms)
        for name, values in zip(batch.shape.metric_names, batch.shape.values, strict=True)
        for step, value in zip(steps, values, strict=True)
    ]
    return json_encoder.encode(
        IngestBatch(run_id=batch.run_id, batch_id=batch.batch_id, seq=batch.seq, metrics=points)
    )


def grpc_request(batch: Batch) -> ingest_pb2.LogBatchRequest:
    """`IngestService.LogBatch` with the points in the columnar `metric_columns` form."""
    steps = batch.steps()
    timestamps = [batch.timestamp_ms] * len(steps)
    columns = [
        ingest_pb2.MetricColumn(name=name, steps=steps, values=values, timestamps_ms=timestamps)
        for name, values in zip(batch.shape.metric_names, batch.shape.values, strict=True)
    ]
    return ingest_pb2.LogBatchRequest(
        run_id=batch.run_id, batch_id=batch.batch_id, seq=batch.seq, metric_columns=columns
    )


def metric_rows(batch: Batch, *, version: int) -> bytes:
    """RowBinary of the batch's rows in `metrics` column order; row versions count up from
    `version` (the server stamps its ingest order the same way)."""
    steps = batch.steps()
    run_id, timestamp_ms = batch.run_id, batch.timestamp_ms
    rows: list[MetricRow] = []
    for name, values in zip(batch.shape.metric_names, batch.shape.values, strict=True):
        rows.extend(
            (run_id, name, step, value, timestamp_ms, version + offset)
            for offset, (step, value) in enumerate(zip(steps, values, strict=True))
        )
    return encode_metric_rows(rows)
