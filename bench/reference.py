"""The two direct-insert references every ingest figure is printed against.

Owns the writers of the references and the plain table they need:
- `plain-mergetree`: large RowBinary INSERTs into a plain MergeTree with exactly the columns,
  partitioning and ordering of `metrics`, and no materialized view: what ClickHouse itself
  does with these rows on this machine (the physical reference);
- `schema`: the same INSERTs into the real `metrics` table, whose materialized views (the
  per-run summaries and the block rollups) run on every inserted block: what our schema costs.

Unlike the `baseline` workload (the same 1000-point batches as the ingest writers, one INSERT
each), a reference INSERT carries `ROWS_PER_INSERT` rows: the rate ClickHouse reaches when
nothing in front of it splits the stream. Each INSERT is a run of its own (10 metric names x
10,000 steps), so the rows are distinct and can be counted back. The RowBinary of a writer's
first INSERT is encoded once; every later INSERT is the same bytes with another run id of the
same length (one C-level `bytes.replace`), so the load generator costs next to nothing.

The plain table is created per bench session and dropped afterwards. Must not import anyio or
the server's storage layer.
"""

from __future__ import annotations

import time
from dataclasses import replace

from bench.batches import Batch, BatchShape, metric_rows
from bench.metrics_store import METRICS_TABLE, MetricsConnection, StoreError
from bench.writers import Acked, Failed, Outcome
from mlrun.server.protocols.clickhouse import encode_string, quote_identifier

ROWS_PER_INSERT = 100_000
WRITERS = 2  # the machine's cores: ClickHouse runs one INSERT on one thread
# A bound on count next to the time bound: more rows per second than ClickHouse can take here.
MAX_ROWS_PER_S = 2_000_000
_SEQ_DIGITS = 5


def plain_table(session: str) -> str:
    return f"bench_reference_plain_{session}"


def create_plain_table_sql(table: str) -> str:
    """`metrics`' columns, partitioning and ordering (sql/clickhouse/0001_metrics.sql) in a
    plain MergeTree: no replacing, no views."""
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(table)} ("
        " run_id String, name LowCardinality(String), step Int64, value Float64,"
        " timestamp_ms Int64, version UInt64)"
        " ENGINE = MergeTree"
        " PARTITION BY toYYYYMM(toDateTime(intDiv(timestamp_ms, 1000), 'UTC'))"
        " ORDER BY (run_id, name, step)"
    )


def drop_table_sql(table: str) -> str:
    return f"DROP TABLE IF EXISTS {quote_identifier(table)}"


def reference_shape() -> BatchShape:
    return BatchShape.for_points(ROWS_PER_INSERT)


def insert_run_id(writer_run_id: str, seq: int) -> str:
    """The run of INSERT `seq` of a writer: same length for every seq (see `encode`)."""
    return f"{writer_run_id}-{seq:0{_SEQ_DIGITS}d}"


class ReferenceSender:
    """One writer: INSERT `seq` of batch `run_id` goes to run `insert_run_id(run_id, seq)`."""

    def __init__(self, connection: MetricsConnection, table: str = METRICS_TABLE) -> None:
        self._connection = connection
        self._table = table
        self._template: bytes | None = None
        self._template_run_id = b""
        self.run_ids: list[str] = []  # every run an INSERT was encoded for (the count-back)

    def encode(self, batch: Batch) -> bytes:
        if batch.seq >= 10**_SEQ_DIGITS:
            raise ValueError("too many reference INSERTs for the run id scheme")
        run_id = insert_run_id(batch.run_id, batch.seq)
        self.run_ids.append(run_id)
        if self._template is None:
            # Versions as the server stamps them: wall-clock nanoseconds.
            self._template = metric_rows(replace(batch, run_id=run_id), version=time.time_ns())
            self._template_run_id = encode_string(run_id)
            return self._template
        return self._template.replace(self._template_run_id, encode_string(run_id))

    def send(self, payload: bytes) -> Outcome:
        started = time.perf_counter()
        try:
            self._connection.insert_metrics(payload, self._table)
        except StoreError as exc:
            return Failed(exc.kind, retryable=exc.retryable, detail=exc.detail)
        return Acked(latency_s=time.perf_counter() - started)

    def close(self) -> None:
        self._connection.close()
