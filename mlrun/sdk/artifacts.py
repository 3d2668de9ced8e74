"""Artifact uploads of a run: `ArtifactUploader` (one worker thread per run) and the
`ArtifactUpload` handle `Run.log_artifact` returns.

Journey of one file (server side: `POST /api/v1/runs/{run_id}/artifacts` and friends):

    hash      read the file in `CHUNK_BYTES` chunks: size and SHA-256 (declared to the server,
              which checks both at finalize — a file changed mid-upload is refused there)
    grant     POST .../artifacts {name, type, size_bytes, sha256, mime_type}: one presigned PUT
              URL, or part URLs when the server chose multipart (its threshold, by size)
    upload    stream the file (single PUT) or each part's byte range (PUT per part, keeping
              the ETag answers) straight to the store, never through the API; presigned URLs
              get no API key
    finalize  POST .../{artifact_id}/finalize (with the parts for multipart)
    on failure after the grant: POST .../abort (best effort) so the store drops the parts

Invariants: memory per upload is one chunk; the training thread never waits unless it asks
(`wait`); every failure ends in state "failed" with an `ArtifactUploadFailed` (server error
code when there is one) that is logged at ERROR and raised by `wait()` — never silent. Every
request has the client's deadline (`request_timeout_s`, per network operation); transient
failures (connection errors, timeouts, 429, 5xx) are retried a bounded number of times.

Must not import `mlrun.server` (the answer shapes are mirrored here as msgspec Structs).
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import msgspec

from mlrun import __version__
from mlrun.sdk.errors import SdkError
from mlrun.sdk.settings import Settings

logger = logging.getLogger("mlrun.sdk")

CHUNK_BYTES = 1024 * 1024
MAX_ATTEMPTS = 4
_FIRST_BACKOFF_S = 0.5
_ABORT_TIMEOUT_S = 5.0

UploadState = Literal["queued", "hashing", "uploading", "finalizing", "done", "failed"]


class ArtifactUploadFailed(SdkError):
    """An artifact upload ended without a finalized artifact. `code` is the server's error
    code when the server refused something, else a local one (file_unreadable, unavailable,
    cancelled, store_refused, offline)."""

    def __init__(self, name: str, code: str, message: str) -> None:
        super().__init__(f"artifact {name!r} failed ({code}): {message}")
        self.code = code
        self.message = message


# --- the server's answers (mirrors of mlrun.server.edges.http.artifact_api) -----------------


class _Part(msgspec.Struct, frozen=True):
    part_number: int
    url: str


class _Multipart(msgspec.Struct, frozen=True):
    upload_id: str
    part_size_bytes: int
    parts: list[_Part]


class _Grant(msgspec.Struct, frozen=True):
    artifact_id: str
    upload_url: str | None
    required_headers: dict[str, str]
    multipart: _Multipart | None = None


class _ErrorDetail(msgspec.Struct, frozen=True):
    code: str = ""
    message: str = ""


class _ErrorBody(msgspec.Struct, frozen=True):
    error: _ErrorDetail


_grant_decoder = msgspec.json.Decoder(_Grant)
_error_decoder = msgspec.json.Decoder(_ErrorBody)


# --- the handle ----------------------------------------------------------------------------------


class ArtifactUpload:
    """Progress of one `log_artifact`. Fields are written by the uploader thread only; a
    reader may see a value a moment old."""

    def __init__(self, path: Path, name: str, type_: str, total: int) -> None:
        self.path = path
        self.name = name
        self.type = type_
        self.total = total  # bytes, as stat'ed at log_artifact; re-measured while hashing
        self.bytes_sent = 0
        self.state: UploadState = "queued"
        self.artifact_id: str | None = None
        self.sha256: str | None = None
        self.parts = 0  # PUTs the bytes went in: 1 for a single PUT, more for multipart
        self.error: ArtifactUploadFailed | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """True once finalized; False if still running at `timeout_s`; raises
        `ArtifactUploadFailed` if it failed."""
        if not self._done.wait(timeout_s):
            return False
        if self.error is not None:
            raise self.error
        return True

    def _end(self, error: ArtifactUploadFailed | None) -> None:
        self.error = error
        self.state = "failed" if error is not None else "done"
        self._done.set()

    def __repr__(self) -> str:
        return (f"<ArtifactUpload {self.name!r} {self.state} "
                f"{self.bytes_sent}/{self.total} bytes>")


# --- the uploader --------------------------------------------------------------------------------


class _Retryable(Exception):
    """A transient failure of one attempt (connection error, timeout, 429, 5xx)."""


class ArtifactUploader:
    """Uploads a run's artifacts one after another on a daemon thread (started on first
    use). `close(timeout_s)` waits for what is queued, then cancels the rest."""

    def __init__(self, run_id: str, settings: Settings) -> None:
        self._run_id = run_id
        self._settings = settings
        self._queue: queue.SimpleQueue[ArtifactUpload | None] = queue.SimpleQueue()
        self._pending: list[ArtifactUpload] = []
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        timeout = httpx.Timeout(settings.request_timeout_s,
                                connect=min(5.0, settings.request_timeout_s))
        headers = {"user-agent": f"mlrun-sdk/{__version__}"}
        api_headers = dict(headers)
        if settings.api_key:
            api_headers["authorization"] = f"Bearer {settings.api_key}"
        self._api = httpx.Client(base_url=settings.server_url, headers=api_headers,
                                 timeout=timeout)
        # Presigned URLs carry their own credential; the API key must never reach the store.
        self._store = httpx.Client(headers=headers, timeout=timeout)

    def submit(self, path: Path, name: str, type_: str) -> ArtifactUpload:
        handle = ArtifactUpload(path, name, type_, path.stat().st_size)
        with self._lock:
            if self._cancel.is_set():
                raise RuntimeError("the uploader is closed")  # Run.log_artifact checks first
            self._pending = [h for h in self._pending if not h.done] + [handle]
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="mlrun-artifacts",
                                                daemon=True)
                self._thread.start()
        self._queue.put(handle)
        return handle

    def close(self, timeout_s: float) -> list[ArtifactUpload]:
        """Wait up to `timeout_s` for queued uploads, then cancel the rest (each ends
        'failed', code 'cancelled'). Returns the uploads that did not finish in time."""
        with self._lock:
            pending = [h for h in self._pending if not h.done]
            thread = self._thread
        deadline = time.monotonic() + max(0.0, timeout_s)
        for handle in pending:
            handle._done.wait(max(0.0, deadline - time.monotonic()))
        late = [h for h in pending if not h.done]
        self._cancel.set()
        self._queue.put(None)
        if thread is not None:
            # A cancelled upload stops at its next chunk (bounded by one request timeout).
            thread.join(self._settings.request_timeout_s + _ABORT_TIMEOUT_S)
        if thread is None or not thread.is_alive():
            self._api.close()
            self._store.close()
        return late

    # --- the worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            handle = self._queue.get()
            if handle is None:
                return
            error = self._upload(handle) if not self._cancel.is_set() else ArtifactUploadFailed(
                handle.name, "cancelled", "the run finished before the upload started")
            if error is not None:
                logger.error("mlrun: run %s: artifact %r from %s was not uploaded (%s): %s",
                             self._run_id, handle.name, handle.path, error.code, error.message)
            handle._end(error)

    def _upload(self, handle: ArtifactUpload) -> ArtifactUploadFailed | None:
        grant: _Grant | None = None
        try:
            handle.state = "hashing"
            handle.total, handle.sha256 = self._hash(handle)
            handle.state = "uploading"
            grant = self._create(handle)
            handle.artifact_id = grant.artifact_id
            parts = self._send(handle, grant)
            handle.state = "finalizing"
            body = {"parts": parts} if parts is not None else None
            self._call(handle, "POST", f"artifacts/{grant.artifact_id}/finalize", body)
            return None
        except ArtifactUploadFailed as exc:
            if grant is not None:
                self._abort(grant.artifact_id)
            return exc
        except OSError as exc:
            if grant is not None:
                self._abort(grant.artifact_id)
            return ArtifactUploadFailed(handle.name, "file_unreadable",
                                        f"{type(exc).__name__}: {exc}")

    def _hash(self, handle: ArtifactUpload) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        with handle.path.open("rb") as file:
            while chunk := file.read(CHUNK_BYTES):
                self._check_cancel(handle)
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    def _create(self, handle: ArtifactUpload) -> _Grant:
        mime, _ = mimetypes.guess_type(handle.path.name)
        payload: dict[str, Any] = {"name": handle.name, "type": handle.type,
                                   "size_bytes": handle.total, "sha256": handle.sha256}
        if mime and "/" in mime:
            payload["mime_type"] = mime
        body = self._call(handle, "POST", "artifacts", payload)
        try:
            return _grant_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise ArtifactUploadFailed(handle.name, "bad_answer",
                                       f"the server's upload grant: {exc}") from exc

    def _send(self, handle: ArtifactUpload, grant: _Grant) -> list[dict[str, Any]] | None:
        """Upload the bytes; the parts to finalize with (None for a single PUT)."""
        if grant.multipart is None:
            if grant.upload_url is None:
                raise ArtifactUploadFailed(handle.name, "bad_answer", "no upload URL")
            self._put(handle, grant.upload_url, grant.required_headers, 0, handle.total)
            handle.parts = 1
            return None
        part_size = grant.multipart.part_size_bytes
        completed: list[dict[str, Any]] = []
        for part in grant.multipart.parts:
            offset = (part.part_number - 1) * part_size
            length = min(part_size, handle.total - offset)
            etag = self._put(handle, part.url, grant.required_headers, offset, length)
            if not etag:
                raise ArtifactUploadFailed(handle.name, "store_refused",
                                           f"part {part.part_number}: no ETag in the answer")
            completed.append({"part_number": part.part_number, "etag": etag})
            handle.parts = len(completed)
        return completed

    def _put(self, handle: ArtifactUpload, url: str, headers: dict[str, str], offset: int,
             length: int) -> str:
        """PUT bytes [offset, offset + length) of the file to a presigned URL, streamed; the
        answer's ETag. A retried attempt re-reads the range (progress is rolled back)."""
        sent_before = handle.bytes_sent

        def attempt() -> httpx.Response:
            handle.bytes_sent = sent_before
            content = self._read_range(handle, offset, length)
            # An explicit length makes httpx send Content-Length instead of chunked encoding
            # (S3 presigned PUTs require the length).
            return self._store.put(url, content=content,
                                   headers={**headers, "content-length": str(length)})

        response = self._retrying(handle, attempt)
        if response.status_code // 100 != 2:
            code, message = _error_fields(response)
            raise ArtifactUploadFailed(handle.name, code or "store_refused",
                                       f"HTTP {response.status_code} from the store: {message}")
        return str(response.headers.get("etag") or "")

    def _read_range(self, handle: ArtifactUpload, offset: int, length: int) -> Iterator[bytes]:
        with handle.path.open("rb") as file:
            file.seek(offset)
            left = length
            while left > 0:
                self._check_cancel(handle)
                chunk = file.read(min(CHUNK_BYTES, left))
                if not chunk:
                    raise ArtifactUploadFailed(handle.name, "file_unreadable",
                                               "the file shrank during the upload")
                left -= len(chunk)
                handle.bytes_sent += len(chunk)
                yield chunk

    def _call(self, handle: ArtifactUpload, method: str, tail: str,
              payload: dict[str, Any] | None) -> bytes:
        path = f"/api/v1/runs/{self._run_id}/{tail}"
        response = self._retrying(
            handle, lambda: self._api.request(method, path, json=payload))
        if response.status_code // 100 != 2:
            code, message = _error_fields(response)
            raise ArtifactUploadFailed(handle.name, code or f"http_{response.status_code}",
                                       f"HTTP {response.status_code}: {message}")
        return response.content

    def _retrying(self, handle: ArtifactUpload,
                  attempt: Callable[[], httpx.Response]) -> httpx.Response:
        backoff_s = _FIRST_BACKOFF_S
        for number in range(1, MAX_ATTEMPTS + 1):
            self._check_cancel(handle)
            try:
                response = attempt()
                if response.status_code != 429 and response.status_code < 500:
                    return response
                reason = f"HTTP {response.status_code}: {_error_fields(response)[1]}"
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if number == MAX_ATTEMPTS:
                raise ArtifactUploadFailed(handle.name, "unavailable",
                                           f"{MAX_ATTEMPTS} attempts failed; last: {reason}")
            logger.warning("mlrun: artifact %r: attempt %d failed (%s); retrying", handle.name,
                           number, reason)
            # Waiting on the cancel event: a finishing run does not sit out the backoff.
            self._cancel.wait(backoff_s)
            backoff_s = min(backoff_s * 2, self._settings.backoff_max_s)
        raise AssertionError("unreachable")

    def _check_cancel(self, handle: ArtifactUpload) -> None:
        if self._cancel.is_set():
            raise ArtifactUploadFailed(handle.name, "cancelled",
                                       "the run finished before the upload completed")

    def _abort(self, artifact_id: str) -> None:
        try:
            self._api.post(f"/api/v1/runs/{self._run_id}/artifacts/{artifact_id}/abort",
                           timeout=_ABORT_TIMEOUT_S)
        except httpx.HTTPError as exc:  # the server expires pending uploads on its own
            logger.info("mlrun: aborting artifact %s failed: %s", artifact_id, exc)


def _error_fields(response: httpx.Response) -> tuple[str, str]:
    try:
        error = _error_decoder.decode(response.content).error
    except msgspec.DecodeError:
        return "", response.content[:200].decode("utf-8", "replace")
    return error.code, error.message
