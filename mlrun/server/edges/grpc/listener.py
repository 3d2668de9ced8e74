"""The gRPC listener: purerpc's HTTP/2 and gRPC protocol machinery on a socket this module binds,
with bounded memory, per-call deadlines, errors rendered with trailing metadata, and a graceful
drain on cancellation.

Owns: `serve_grpc` (bind, accept, dispatch, drain) and `GrpcAbort` (how a servicer ends a call
with a status code, a message and custom trailing metadata). One connection's HTTP/2 and gRPC
machinery (streams, trailers, flow-control windows) is `edges.grpc.connection`.
Must not import trio or asyncio (anyio only), the use-cases, storage, or the HTTP edge.
Invariants: every call gets exactly one status; a client sees only the status message a servicer
chose (never exception text); cancellation always propagates; resources per connection and
connections are bounded (below); `serve_grpc` returns within `grace_period_s + close_timeout_s`
of being cancelled.

What is reused from purerpc 0.8.0 and what is replaced, and why:
- Reused: its h2-based connection state machine, framing and message parsing (`GRPCProtoSocket`,
  `GRPCProtoStream`), its `Service`/`RPCSignature` registry (generated `*_grpc.py` servicers), and
  its per-cardinality call wrappers (`call_server_unary_unary`, ...).
- Replaced: `Server.serve_async` (binds all interfaces with SO_REUSEPORT, no drain) and the
  dispatch of `ConnectionHandler`, whose bare `except:` swallows cancellation and sends
  `repr(sys.exc_info())` to the client, and which cannot send trailing metadata. Dispatch here
  renders every outcome itself: `GrpcAbort`, `MlrunError` (the error tree), a protobuf
  `DecodeError` (INVALID_ARGUMENT), an expired `grpc-timeout` (DEADLINE_EXCEEDED), anything else
  (INTERNAL "internal error", traceback logged, never sent).
- Extended: its connection and stream (`edges.grpc.connection`), which send trailers with any
  metadata, run with the limits below, and leak no window.
- Memory: purerpc opens each connection's HTTP/2 receive window by 1 GiB and acknowledges a
  message (hands its window back) only when a handler reads it; its per-stream queues hold only
  what the windows let in. Here the connection window is the least that cannot deadlock,
  `max_concurrent_streams * (max_message_bytes + 5) + 65535` (every stream may hold one
  incomplete message, which nobody can read yet), so unread request bytes stay under
  `max_connections * max_concurrent_streams * max_message_bytes`. That is a bound, not a budget:
  handlers read their message at once; lower `max_message_bytes` to tighten it.
- Window leaks and oversized messages: handled per call by `edges.grpc.connection` (a message
  over `max_message_bytes` fails only its call, INVALID_ARGUMENT `payload_too_large`).
- Every error status carries `mlrun-error-code` (malformed protobuf, deadlines and internal
  errors included), so a client can always branch on the machine code.

Shutdown (cancel the task running `serve_grpc`): the listening socket closes at once; calls in
flight keep running for up to `grace_period_s` while new calls on open connections are answered
UNAVAILABLE ("server is shutting down", retryable); then each connection sends GOAWAY and closes.
Calls still running when the grace period ends are cancelled and answered UNAVAILABLE. Closing
is bounded by `close_timeout_s` more (a peer that does not read cannot hold shutdown).
A GOAWAY is sent only at the very end because h2 3.x refuses to send anything on a connection
after its GOAWAY, which would cut off the calls being drained.

A call the client cancels (RST_STREAM, e.g. grpcio's `future.cancel()`, or its connection
closing) has its handler cancelled at once; it is counted with status CANCELLED and answered
nothing (nobody is listening).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import anyio
import anyio.abc
import h2.exceptions  # type: ignore[import-untyped]
import purerpc
from google.protobuf.message import DecodeError
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import RequestReceived
from purerpc.grpclib.exceptions import MessageTooLargeError, ProtocolError, RpcFailedError
from purerpc.rpc import Cardinality
from purerpc.wrappers import (
    call_server_stream_stream,
    call_server_stream_unary,
    call_server_unary_stream,
    call_server_unary_unary,
)

from mlrun.server.edges.grpc.connection import (
    H2_DEFAULT_WINDOW_BYTES,
    GrpcSocket,
    GrpcStream,
    Metadata,
    error_code_trailer,
)
from mlrun.server.errors import GrpcCode, MlrunError, Overloaded
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.rpc_status import encode_retry_status

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024  # gRPC's own default receive limit
DEFAULT_MAX_CONCURRENT_STREAMS: Final = 32  # per connection; grpcio queues calls beyond it
DEFAULT_MAX_CONNECTIONS: Final = 256
DEFAULT_GRACE_PERIOD_S: Final = 5.0
DEFAULT_CLOSE_TIMEOUT_S: Final = 1.0

_GRPC_MESSAGE_HEADER_BYTES: Final = 5  # compressed flag and length before every message
_STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
_METADATA_KEY = re.compile(r"^[0-9a-z_.-]+$")
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*$")

# Told (method path or "unknown", status code name) when a call ends: for telemetry.
CallObserver = Callable[[str, str], None]


class GrpcAbort(Exception):
    """Raised by a servicer to end its call with `code`, `message` and trailing metadata.

    `retry_after_ms` (for RESOURCE_EXHAUSTED / UNAVAILABLE) adds what grpcio clients can read:
    trailing metadata `retry-after-ms` (decimal) and `grpc-status-details-bin`, a google.rpc.Status
    carrying a google.rpc.RetryInfo. Custom keys are lowercase and must not start with `grpc-`;
    binary values need a `-bin` key, text values must be printable ASCII.
    """

    def __init__(
        self,
        code: GrpcCode,
        message: str,
        *,
        trailing_metadata: Metadata = (),
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        if code == GrpcCode.OK:
            raise ValueError("GrpcAbort needs an error code, not OK")
        metadata = [_checked_metadata(key, value) for key, value in trailing_metadata]
        if retry_after_ms is not None:
            retry_after_ms = max(0, retry_after_ms)
            metadata.append(("retry-after-ms", str(retry_after_ms)))
            details = encode_retry_status(int(code), message, retry_after_ms)
            metadata.append((_STATUS_DETAILS_KEY, details))
        self.code = code
        self.message = message
        self.trailing_metadata: tuple[tuple[str, str | bytes], ...] = tuple(metadata)
        self.retry_after_ms = retry_after_ms

    @classmethod
    def from_error(cls, error: MlrunError) -> GrpcAbort:
        """Render the error tree's class the way the HTTP edge does: code, message, machine code
        (`mlrun-error-code`), the field at fault (`mlrun-error-field`), and a retry delay."""
        metadata: list[tuple[str, str | bytes]] = [("mlrun-error-code", error.code)]
        if error.field:
            metadata.append(("mlrun-error-field", error.field))
        retry_after_ms = error.retry_after_s * 1000 if isinstance(error, Overloaded) else None
        return cls(
            error.grpc_code,
            error.message,
            trailing_metadata=metadata,
            retry_after_ms=retry_after_ms,
        )


def _checked_metadata(key: str, value: str | bytes) -> tuple[str, str | bytes]:
    if not _METADATA_KEY.match(key) or key.startswith("grpc-"):
        raise ValueError(f"invalid trailing metadata key {key!r}")
    if key.endswith("-bin") != isinstance(value, bytes):
        raise ValueError(f"metadata {key!r}: bytes values need a '-bin' key and only they may")
    if isinstance(value, str) and not _PRINTABLE_ASCII.match(value):
        raise ValueError(f"metadata {key!r}: text values must be printable ASCII")
    return key, value


# --- the server -------------------------------------------------------------------------------

_CALLERS: Final[Mapping[Any, Callable[..., Awaitable[None]]]] = {
    Cardinality.UNARY_UNARY: call_server_unary_unary,
    Cardinality.UNARY_STREAM: call_server_unary_stream,
    Cardinality.STREAM_UNARY: call_server_stream_unary,
    Cardinality.STREAM_STREAM: call_server_stream_stream,
}


@dataclass(eq=False)
class _Connection:
    hard_scope: anyio.CancelScope
    work_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    closing: bool = False

    def close(self) -> None:
        """Stop reading and end leftover calls; the connection task then sends GOAWAY."""
        self.closing = True
        self.work_scope.cancel()


class _GrpcServer:
    def __init__(
        self,
        services: Sequence[purerpc.Service],
        *,
        max_message_bytes: int,
        max_concurrent_streams: int,
        grace_period_s: float,
        close_timeout_s: float,
        on_call_finished: CallObserver | None = None,
    ) -> None:
        self._on_call_finished = on_call_finished
        self._services: dict[str, purerpc.Service] = {}
        for service in services:
            if service.name in self._services:
                raise ValueError(f"service {service.name} registered twice")
            self._services[service.name] = service
        self._config = GRPCConfiguration(client_side=False, max_message_length=max_message_bytes)
        self._max_concurrent_streams = max_concurrent_streams
        # A message is acknowledged only once complete and read, so the connection window must
        # outlast every stream holding an incomplete message at once, or they wait on each
        # other forever (measured: 16 concurrent 250 KB calls stall a 512 KiB window).
        self._window_bytes = (
            max_concurrent_streams * (max_message_bytes + _GRPC_MESSAGE_HEADER_BYTES)
            + H2_DEFAULT_WINDOW_BYTES
        )
        self._grace_period_s = grace_period_s
        self._close_timeout_s = close_timeout_s
        self._connections: set[_Connection] = set()
        self._calls_in_flight = 0
        self._draining = False
        self._calls_done = anyio.Event()
        self._connections_done = anyio.Event()

    async def serve_connection(
        self, sock: anyio.abc.SocketStream, connection_slots: anyio.Semaphore
    ) -> None:
        # Shielded: the caller's cancellation starts `drain`, which ends connections itself.
        with anyio.CancelScope(shield=True) as hard_scope:
            connection = _Connection(hard_scope)
            self._connections.add(connection)
            try:
                async with (
                    sock,
                    GrpcSocket(
                        self._config,
                        sock,
                        max_concurrent_streams=self._max_concurrent_streams,
                        window_bytes=self._window_bytes,
                    ) as grpc_socket,
                ):
                    with connection.work_scope:
                        async with anyio.create_task_group() as calls:
                            async for stream in grpc_socket.listen():
                                calls.start_soon(self._serve_call, stream)
                            # The client closed the connection: nobody waits for these answers.
                            grpc_socket.cancel_calls()
                    if connection.closing:
                        grpc_socket.send_goaway()
                        await grpc_socket.flush()
            except Exception as exc:  # one peer's failure ends only its own connection
                log.debug("grpc connection ended: %r", exc)
            finally:
                self._connections.discard(connection)
                connection_slots.release()
                if self._draining and not self._connections:
                    self._connections_done.set()

    async def _serve_call(self, stream: GrpcStream) -> None:
        self._calls_in_flight += 1
        try:
            await self._dispatch(stream)
        except Exception:  # a bug here must not take the connection's other calls down
            log.exception("grpc dispatch failed")
            await self._finish(stream, GrpcCode.INTERNAL, "internal error")
        except anyio.get_cancelled_exc_class():
            # Only `drain` cancels calls: tell the client to retry elsewhere, then unwind.
            with anyio.CancelScope(shield=True):
                await self._finish(stream, GrpcCode.UNAVAILABLE, "server is shutting down")
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await stream.end_call()
            self._calls_in_flight -= 1
            if self._draining and self._calls_in_flight == 0:
                self._calls_done.set()
            if self._on_call_finished is not None:
                self._on_call_finished(stream.call_label, stream.status_code.name)

    async def _dispatch(self, stream: GrpcStream) -> None:
        event = await stream.receive_event()
        if not isinstance(event, RequestReceived):  # purerpc always delivers headers first
            await self._finish(stream, GrpcCode.INTERNAL, "expected request headers")
            return
        if self._draining:
            await self._finish(stream, GrpcCode.UNAVAILABLE, "server is shutting down")
            return
        service = self._services.get(event.service_name)
        method = service.methods.get(event.method_name) if service is not None else None
        if method is None:
            await self._finish(
                stream,
                GrpcCode.UNIMPLEMENTED,
                f"unknown method /{event.service_name}/{event.method_name}",
            )
            return
        stream.call_label = f"/{event.service_name}/{event.method_name}"
        request_type = method.signature.request_type
        stream.expect_message_type(request_type)
        deadline_s = event.timeout.total_seconds() if event.timeout is not None else None
        try:
            with anyio.move_on_after(deadline_s) as deadline, stream.handler_scope():
                await _CALLERS[method.signature.cardinality](
                    functools.partial(method.method_fn, request=event), stream
                )
        except GrpcAbort as abort:
            await self._finish(stream, abort.code, abort.message, abort.trailing_metadata)
        except MlrunError as error:
            rendered = GrpcAbort.from_error(error)
            await self._finish(stream, rendered.code, rendered.message, rendered.trailing_metadata)
        except DecodeError:
            await self._finish(
                stream,
                GrpcCode.INVALID_ARGUMENT,
                f"request is not a valid {request_type.DESCRIPTOR.full_name} message",
                error_code_trailer(ErrorCode.INVALID_ARGUMENT),
            )
        except MessageTooLargeError:  # our answer is over the client's limit: our bug
            log.error("grpc call /%s/%s: response too large", event.service_name,
                      event.method_name)
            await self._finish(stream, GrpcCode.INTERNAL, "response too large",
                               error_code_trailer(ErrorCode.INTERNAL))
        except ProtocolError:
            await self._finish(
                stream, GrpcCode.INVALID_ARGUMENT, "malformed request stream for this method",
                error_code_trailer(ErrorCode.INVALID_ARGUMENT),
            )
        except h2.exceptions.H2Error as exc:  # the client reset the stream or the connection
            log.debug("grpc call /%s/%s dropped: %r", event.service_name, event.method_name, exc)
        except RpcFailedError as failed:  # purerpc's own status exceptions, kept working
            await self._finish(
                stream, GrpcCode(failed.status.int_value), failed.status.status_message or "",
                error_code_trailer(ErrorCode.INTERNAL),
            )
        except Exception:
            log.exception("grpc call /%s/%s failed", event.service_name, event.method_name)
            await self._finish(stream, GrpcCode.INTERNAL, "internal error",
                               error_code_trailer(ErrorCode.INTERNAL))
        else:
            if stream.client_cancelled:  # RST_STREAM or connection gone: no one to answer
                stream.status_code = GrpcCode.CANCELLED
                log.debug("grpc call %s cancelled by the client", stream.call_label)
                return
            if deadline.cancelled_caught:
                await self._finish(stream, GrpcCode.DEADLINE_EXCEEDED, "deadline exceeded",
                                   error_code_trailer(ErrorCode.DEADLINE_EXCEEDED))

    async def _finish(
        self, stream: GrpcStream, code: GrpcCode, message: str, metadata: Metadata = ()
    ) -> None:
        if stream.locally_closed:  # already answered (e.g. cancelled after its response)
            return
        try:
            await stream.finish(code, message, metadata)
        except h2.exceptions.H2Error as exc:  # the client reset the stream or the connection
            log.debug("grpc status %s not delivered: %r", code.name, exc)

    async def drain(self) -> None:
        """Graceful stop; the caller has already closed the listener and shields this call."""
        self._draining = True
        if self._calls_in_flight:
            with anyio.move_on_after(self._grace_period_s):
                await self._calls_done.wait()
        if self._connections:
            for connection in list(self._connections):
                connection.close()
            with anyio.move_on_after(self._close_timeout_s):
                await self._connections_done.wait()
        for connection in list(self._connections):
            connection.hard_scope.cancel()


async def serve_grpc(
    *,
    host: str,
    port: int,
    services: Sequence[purerpc.Service],
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S,
    close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    on_call_finished: CallObserver | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `services` on host:port until cancelled, then drain (see the module docstring).

    Binds only `host` (port 0 picks a free port) and reports the bound port through
    `task_status`. Cancellation returns within about `grace_period_s + close_timeout_s`.
    """
    server = _GrpcServer(
        services,
        max_message_bytes=max_message_bytes,
        max_concurrent_streams=max_concurrent_streams,
        grace_period_s=grace_period_s,
        close_timeout_s=close_timeout_s,
        on_call_finished=on_call_finished,
    )
    connection_slots = anyio.Semaphore(max_connections)
    # One socket per address `host` resolves to (e.g. "localhost": 127.0.0.1 and ::1), one port.
    listeners = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with anyio.create_task_group() as connections:
        try:
            async with listeners, anyio.create_task_group() as accepting:
                for listener in listeners.listeners:
                    accepting.start_soon(
                        _accept_connections,
                        cast(anyio.abc.SocketListener, listener),
                        connections,
                        connection_slots,
                        server,
                    )
                task_status.started(listeners.extra(anyio.abc.SocketAttribute.local_port))
        finally:
            with anyio.CancelScope(shield=True):
                await server.drain()


async def _accept_connections(
    listener: anyio.abc.SocketListener,
    connections: anyio.abc.TaskGroup,
    connection_slots: anyio.Semaphore,
    server: _GrpcServer,
) -> None:
    while True:
        # At the connection limit, wait here: the kernel's backlog holds the next ones.
        await connection_slots.acquire()
        try:
            sock = await listener.accept()
        except BaseException:
            connection_slots.release()
            raise
        connections.start_soon(server.serve_connection, sock, connection_slots)
