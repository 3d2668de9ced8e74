"""The ingest workload's writers: batches through the MLRun server, over HTTP and over gRPC.

Owns:
- `HttpIngestSender`: `POST /api/v1/ingest/batch` with the points in one wire form (columnar
  `series`, or `rows`: one object per point), over one keep-alive `http.client` connection per
  writer (see `bench.writers` for why not httpx);
- `GrpcIngestSender`: `mlrun.v1.IngestService/LogBatch` with `metric_columns`, over one grpcio
  channel per writer (each writer stands for one training process with its own connection);
- `RunsClient`: creating and finishing the runs a workload writes to (over HTTP; not measured).

How answers map onto the writer loop (the SDK's rules): 200 / OK -> acknowledged;
429 / RESOURCE_EXHAUSTED -> throttled, wait `Retry-After` / `retry-after-ms`; 503, 502, 504,
UNAVAILABLE, DEADLINE_EXCEEDED, a timeout or a broken connection -> retry the same batch id
(it may have been stored); everything else -> stop the writer and report the code.

Must not import the server (only `mlrun.wire`, the contract it shares with clients) or anyio.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import msgspec

from bench.batches import Batch, WireForm, grpc_request, http_body
from bench.errors import BenchError
from bench.writers import Acked, Failed, Outcome, Throttled
from mlrun.wire.proto.mlrun.v1 import ingest_pb2
from mlrun.wire.schemas import ErrorBody, IngestResult, decoder_for

_INGEST_PATH = "/api/v1/ingest/batch"
_LOG_BATCH_METHOD = "/mlrun.v1.IngestService/LogBatch"
_RETRYABLE_HTTP = frozenset({502, 503, 504})
_DEFAULT_RETRY_AFTER_S = 1.0
_CONNECT_TIMEOUT_S = 10.0


def _connection(base_url: str, timeout_s: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(base_url)
    if parts.hostname is None or parts.scheme not in ("http", "https"):
        raise BenchError(f"--url must look like http://host:port, got {base_url!r}")
    if parts.path not in ("", "/"):
        raise BenchError(f"--url must not have a path (the API lives at /api/v1): {base_url!r}")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname, parts.port, timeout=timeout_s)


def _error_code(body: bytes) -> str:
    """The stable machine code of an MLRun error body (never its free text, for the tally)."""
    try:
        code: str = decoder_for(ErrorBody).decode(body).error.code
    except msgspec.DecodeError:
        return "unparsed"
    return code


def _retry_after_s(value: str | None) -> float:
    try:
        return max(float(value), 0.0) if value is not None else _DEFAULT_RETRY_AFTER_S
    except ValueError:
        return _DEFAULT_RETRY_AFTER_S


class HttpIngestSender:
    def __init__(self, base_url: str, api_key: str, *, timeout_s: float,
                 form: WireForm = "series") -> None:
        self._form: WireForm = form
        self._connection = _connection(base_url, timeout_s)
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
        }
        try:
            # Connect before the start barrier, so no first request pays for the handshake.
            self._connection.connect()
        except OSError as exc:
            raise BenchError(f"cannot connect to {base_url}: {exc}") from exc

    def encode(self, batch: Batch) -> bytes:
        return http_body(batch, self._form)

    def send(self, payload: bytes) -> Outcome:
        started = time.perf_counter()
        try:
            self._connection.request("POST", _INGEST_PATH, body=payload, headers=self._headers)
            response = self._connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._connection.close()  # reopened by the next request
            return Failed(type(exc).__name__, retryable=True, detail=str(exc))
        latency_s = time.perf_counter() - started
        status = response.status
        if status == 200:
            try:
                result = decoder_for(IngestResult).decode(body)
            except msgspec.DecodeError as exc:
                return Failed("200 unreadable", retryable=False, detail=str(exc))
            return Acked(latency_s, duplicate=result.duplicate, server_accepted=result.accepted)
        if status == 429:
            return Throttled(_retry_after_s(response.getheader("Retry-After")))
        return Failed(
            f"{status} {_error_code(body)}",
            retryable=status in _RETRYABLE_HTTP,
            detail=body[:300].decode("utf-8", errors="replace"),
        )

    def close(self) -> None:
        self._connection.close()


def _metadata_value(metadata: Sequence[Any] | None, key: str) -> str | None:
    for item in metadata or ():
        if item.key == key:
            value = item.value
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


class SharedGrpcChannel:
    """One gRPC channel (one HTTP/2 connection) for `users` senders, each with its own call
    in flight: a writer with several batches in flight over one connection. Closed when the
    last user releases it (closing earlier would cancel the others' calls)."""

    def __init__(self, target: str, users: int) -> None:
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.enable_retries", 0),  # the writer loop owns retrying, as the SDK does
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        self._users = users
        self._lock = threading.Lock()
        try:
            grpc.channel_ready_future(self.channel).result(timeout=_CONNECT_TIMEOUT_S)
        except grpc.FutureTimeoutError as exc:
            self.channel.close()
            raise BenchError(f"cannot connect to gRPC {target}") from exc

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.channel.close()


class GrpcIngestSender:
    def __init__(self, target: str, api_key: str, *, timeout_s: float,
                 channel: SharedGrpcChannel | None = None) -> None:
        self._timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._shared = channel if channel is not None else SharedGrpcChannel(target, 1)
        # Payloads are serialized once in `encode` (a retry resends the same bytes).
        self._log_batch = self._shared.channel.unary_unary(
            _LOG_BATCH_METHOD,
            request_serializer=None,
            response_deserializer=ingest_pb2.LogBatchResponse.FromString,
        )

    def encode(self, batch: Batch) -> bytes:
        payload: bytes = grpc_request(batch).SerializeToString()
        return payload

    def send(self, payload: bytes) -> Outcome:
        started = time.perf_counter()
        try:
            response = self._log_batch(payload, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            trailing = exc.trailing_metadata()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                delay_ms = _metadata_value(trailing, "retry-after-ms")
                delay_s = _retry_after_s(delay_ms)
                return Throttled(delay_s / 1000 if delay_ms is not None else delay_s)
            machine_code = _metadata_value(trailing, "mlrun-error-code") or ""
            return Failed(
                f"{code.name} {machine_code}".strip(),
                retryable=code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED),
                detail=str(exc.details() or "")[:300],
            )
        return Acked(
            time.perf_counter() - started,
            duplicate=response.duplicate,
            server_accepted=response.accepted,
        )

    def close(self) -> None:
        self._shared.release()


class RunsClient:
    """Creates and finishes a workload's runs over HTTP, one short request each."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float) -> None:
        self._base_url = base_url
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
        }
        self._timeout_s = timeout_s

    def create(self, run_ids: Sequence[str], *, project: str) -> None:
        for run_id in run_ids:
            self._post("/api/v1/runs", {"project": project, "run_id": run_id, "name": run_id},
                       ok=(200, 201))

    def finish(self, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            self._post(f"/api/v1/runs/{run_id}/finish", {"status": "finished"}, ok=(200,))

    def _post(self, path: str, payload: Mapping[str, str], *, ok: tuple[int, ...]) -> None:
        connection = _connection(self._base_url, self._timeout_s)
        try:
            connection.request("POST", path, body=msgspec.json.encode(payload),
                               headers=self._headers)
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise BenchError(f"POST {path} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            connection.close()
        if response.status not in ok:
            raise BenchError(f"POST {path} answered {response.status} {_error_code(body)}")
