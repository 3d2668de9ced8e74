"""The baseline workload's writer: the same batches, inserted straight into the same ClickHouse.

Owns `DirectInsertSender`: one writer's connection to the server's `metrics` table, sending each
batch as one RowBinary insert of exactly the rows the server would have written for it (same
shape, same batch size; the suite runs as many writers as the ingest workload it is compared
with). The measured rate is the ceiling the server's ingest is printed against (issue 3: the
server should sustain at least half of it).

A ClickHouse error that says "try later" (TOO_MANY_PARTS, timeouts, a broken connection) is a
retryable failure, so the writer loop backs off and sends the same rows again; any other error
stops the writer and is reported.

Must not import the server's storage layer or anyio.
"""

from __future__ import annotations

import time

from bench.batches import Batch, metric_rows
from bench.metrics_store import MetricsConnection, StoreError
from bench.writers import Acked, Failed, Outcome


class DirectInsertSender:
    def __init__(self, connection: MetricsConnection) -> None:
        self._connection = connection

    def encode(self, batch: Batch) -> bytes:
        # Versions as the server stamps them: wall-clock nanoseconds, so a later write wins.
        return metric_rows(batch, version=time.time_ns())

    def send(self, payload: bytes) -> Outcome:
        started = time.perf_counter()
        try:
            self._connection.insert_metrics(payload)
        except StoreError as exc:
            return Failed(exc.kind, retryable=exc.retryable, detail=exc.detail)
        return Acked(latency_s=time.perf_counter() - started)

    def close(self) -> None:
        self._connection.close()
