"""The `mlflow` workload: MLflow log-batch through the server's MLflow edge, beside our ingest.

- transport `mlflow` (`MlflowBatchSender`): each writer sends every batch as MLflow's
  `POST /api/2.0/mlflow/runs/log-batch` (the same 1000 points as rows
  `{key, value, timestamp, step}`, MLflow's largest batch) to the same runs our `http` transport
  writes, so `--workloads ingest --transports http,mlflow` measures both in one run, counted
  back from ClickHouse the same way, with server CPU-µs per point and p50/p99 per transport;
- workload `mlflow` (`official_client_rates`): the official client's own rate on one run, with
  `MlflowClient.log_batch` (1000 metrics per call) and with `mlflow.log_metrics(...,
  synchronous=False)` (one step of 10 metrics per call, then `flush_async_logging`), bounded
  in time; reported as notes. Needs the `mlflow` or `mlflow-skinny` package (the dev extra).

    python -m bench --workloads ingest,mlflow --transports http,mlflow --writers 1,8,32

Must not import the server or anyio.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import time
from collections.abc import Iterator

import msgspec

from bench.batches import Batch
from bench.errors import BenchError
from bench.ingest import _connection, _retry_after_s
from bench.targets import Target
from bench.writers import Acked, Failed, Outcome, Throttled

LOG_BATCH_PATH = "/api/2.0/mlflow/runs/log-batch"
_RETRYABLE_HTTP = frozenset({502, 503, 504})
_CLIENT_BATCH_METRICS = 1000
_ASYNC_METRICS_PER_CALL = 10
# Bounds in count besides time: log_batch calls, and async calls (all queued, then flushed:
# the client's queue is unbounded, so the count is what bounds the flush).
_MAX_BATCH_CALLS = 5000
_ASYNC_CALLS = 1000


class _Metric(msgspec.Struct):
    key: str
    value: float
    timestamp: int
    step: int


class _LogBatch(msgspec.Struct):
    run_id: str
    metrics: list[_Metric]


_encoder = msgspec.json.Encoder()


def log_batch_body(batch: Batch) -> bytes:
    steps = batch.steps()
    return _encoder.encode(_LogBatch(run_id=batch.run_id, metrics=[
        _Metric(key=name, value=value, timestamp=batch.timestamp_ms, step=step)
        for name, values in zip(batch.shape.metric_names, batch.shape.values, strict=True)
        for step, value in zip(steps, values, strict=True)]))


class MlflowBatchSender:
    """One writer's kept-alive connection sending MLflow log-batch requests."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float) -> None:
        self._connection = _connection(base_url, timeout_s)
        self._headers = {"Content-Type": "application/json"}
        if api_key:  # a peer may run without authentication
            self._headers["Authorization"] = f"Bearer {api_key}"
        try:
            self._connection.connect()
        except OSError as exc:
            raise BenchError(f"cannot connect to {base_url}: {exc}") from exc

    def encode(self, batch: Batch) -> bytes:
        return log_batch_body(batch)

    def send(self, payload: bytes) -> Outcome:
        started = time.perf_counter()
        try:
            self._connection.request("POST", LOG_BATCH_PATH, body=payload, headers=self._headers)
            response = self._connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._connection.close()
            return Failed(type(exc).__name__, retryable=True, detail=str(exc))
        latency_s = time.perf_counter() - started
        if response.status == 200:
            return Acked(latency_s)
        if response.status == 429:
            return Throttled(_retry_after_s(response.getheader("Retry-After")))
        return Failed(f"{response.status} mlflow", retryable=response.status in _RETRYABLE_HTTP,
                      detail=body[:300].decode("utf-8", errors="replace"))

    def close(self) -> None:
        self._connection.close()


@contextlib.contextmanager
def _client_environment(target: Target) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update({"MLFLOW_TRACKING_URI": target.http_url,
                       "MLFLOW_TRACKING_TOKEN": target.api_key,
                       "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def official_client_rates(target: Target, *, duration_s: float, session: str) -> list[str]:
    """Points/s of the official client with log_batch and with synchronous=False (notes)."""
    try:
        import mlflow
        from mlflow.entities import Metric
    except ImportError:
        return ["mlflow: the official client rate needs `pip install mlflow-skinny`"]
    notes = []
    with _client_environment(target):
        mlflow.set_tracking_uri(target.http_url)
        client = mlflow.MlflowClient()
        experiment = f"bench-{session}-mlflow"
        experiment_id = client.create_experiment(experiment)
        run_id = client.create_run(experiment_id).info.run_id
        points, step = 0, 0
        started = time.perf_counter()
        deadline = started + duration_s
        for _ in range(_MAX_BATCH_CALLS):
            if time.perf_counter() >= deadline:
                break
            now_ms = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[
                Metric(f"m{index % 10}", float(index), now_ms, step + index // 10)
                for index in range(_CLIENT_BATCH_METRICS)])
            step += _CLIENT_BATCH_METRICS // 10
            points += _CLIENT_BATCH_METRICS
        elapsed = time.perf_counter() - started
        notes.append(f"mlflow client log_batch (1000 metrics/call, 1 thread): "
                     f"{points / elapsed:,.0f} points/s")
        client.set_terminated(run_id)
        mlflow.set_experiment(experiment)
        with mlflow.start_run():
            started = time.perf_counter()
            for step in range(_ASYNC_CALLS):
                mlflow.log_metrics({f"a{index}": float(step) for index in
                                    range(_ASYNC_METRICS_PER_CALL)}, step=step,
                                   synchronous=False)
            queued = time.perf_counter() - started
            mlflow.flush_async_logging()
            elapsed = time.perf_counter() - started
        notes.append(f"mlflow client log_metrics(synchronous=False, {_ASYNC_METRICS_PER_CALL}"
                     f" metrics/call, {_ASYNC_CALLS} calls): "
                     f"{_ASYNC_CALLS * _ASYNC_METRICS_PER_CALL / elapsed:,.0f} points/s until"
                     f" flushed ({_ASYNC_CALLS / queued:,.0f} calls/s queued)")
    return notes
