"""One gRPC connection over HTTP/2: purerpc 0.8.0's connection machinery, extended where it
leaks, blocks or cannot say what we need. `edges.grpc.listener` accepts sockets, wraps each in a
`GrpcSocket` and dispatches the `GrpcStream`s it yields.

Owns `GrpcSocket` (purerpc's socket with our connection in place of its own), `GrpcStream`
(one call: lazy response headers, `finish` with any trailing metadata, `end_call`), the
connection beneath them, and the status-message and trailer rules every answer follows
(`MAX_STATUS_MESSAGE_CHARS`, `error_code_trailer`).

Must not import trio or asyncio (anyio only), the use-cases, storage, or the HTTP edge; no
dispatch or service logic lives here.

What is extended, and why:
- Trailing metadata: purerpc refuses custom metadata named `grpc-*`, so it cannot send
  `grpc-status-details-bin`. `GrpcStream.finish` writes the trailer block itself through the same
  h2 connection (a Trailers-Only response when no message was sent yet).
- Limits: purerpc builds its connection with a fixed stream limit and a 1 GiB receive window;
  `GrpcSocket` replaces it with one using the listener's `max_concurrent_streams` and
  `window_bytes` before anything is sent.
- Window leaks: purerpc never acknowledges request bytes nobody reads (a call answered before
  reading, e.g. rejected; a request reset or ended inside a message), so a long-lived connection
  stalls for good once they add up to its window; and one message over `max_message_bytes` ends
  the whole connection. `_H2Connection`, `GrpcStream.end_call` and `_Inbox` acknowledge all of
  it, end a reset request (its handler stops waiting), and fail only the oversized call:
  INVALID_ARGUMENT with `mlrun-error-code: payload_too_large` (never RESOURCE_EXHAUSTED, which
  clients are told to wait on and resend: the same message can never fit).

- Cancellation: purerpc ignores a client's RST_STREAM once the request was read, so a handler
  kept working for nobody. `GrpcStream.handler_scope` is cancelled by such a reset, and
  `GrpcSocket.cancel_calls` cancels every running call when the client's connection ends.

Invariants: every request byte the connection accepted is acknowledged once it is read or known
never to be read; a stream is answered at most once (`locally_closed` says so).
"""

from __future__ import annotations

import base64
import contextlib
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import anyio
import anyio.abc
import h2.exceptions  # type: ignore[import-untyped]
import h2.stream  # type: ignore[import-untyped]
from anyio.streams.memory import MemoryObjectSendStream
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpc_socket import GRPCStreamState, SocketWrapper
from purerpc.grpclib.buffers import MessageReadBuffer
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import MessageReceived, RequestEnded
from purerpc.grpclib.exceptions import MessageTooLargeError
from purerpc.grpclib.status import Status, StatusCode

from mlrun.server.errors import GrpcCode
from mlrun.wire.error_codes import ErrorCode

# HTTP/2's initial connection window (RFC 9113 6.9.2); purerpc adds 1 GiB on top of it.
H2_DEFAULT_WINDOW_BYTES: Final = 65_535
# h2 stream states after the server sent END_STREAM: the call has its answer.
_ANSWERED_STATES: Final = (h2.stream.StreamState.HALF_CLOSED_LOCAL, h2.stream.StreamState.CLOSED)
# Status messages travel in a header: a message echoing client input (a 200 KB service name)
# would exceed grpcio's header list limit and turn the answer into RESOURCE_EXHAUSTED.
MAX_STATUS_MESSAGE_CHARS: Final = 512

Metadata = Sequence[tuple[str, str | bytes]]


def error_code_trailer(code: str) -> Metadata:
    """The `mlrun-error-code` trailer of a status the listener itself answers."""
    return (("mlrun-error-code", code),)


class _Inbox:
    """The sending side of a stream's event queue, minus a race. purerpc's reader parses a batch
    of events, then delivers each with `await send()`, and anyio's `send` checkpoints before it
    enqueues: a call could be answered and end during that checkpoint, after `end_call` emptied
    its queue, and its message would then sit there unacknowledged for good (a leak of the
    connection window). `send_nowait` cannot block (the queue is unbounded; the HTTP/2 windows
    bound it) and does not checkpoint, so a batch is delivered before any handler runs."""

    def __init__(self, send: MemoryObjectSendStream[Any]) -> None:
        self._send = send

    async def send(self, event: Any) -> None:
        self._send.send_nowait(event)


class GrpcStream(GRPCProtoStream):  # type: ignore[misc]  # purerpc has no type information
    """purerpc's server stream plus: lazy response headers, trailers with any metadata, and
    acknowledgement of request data the call never read."""

    _incoming_events: tuple[Any, Any]  # purerpc's (send, receive) pair of the event queue
    _grpc_connection: _H2Connection

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        send, receive = self._incoming_events
        self._incoming_events = (_Inbox(send), receive)
        # For telemetry: which method this call was (bounded label set) and how it ended;
        # a call that ends through purerpc's own response path ended OK.
        self.call_label = "unknown"
        self.status_code = GrpcCode.OK
        # Set when the client cancelled the call (RST_STREAM) or its connection went away: the
        # handler's scope is cancelled and nobody is left to answer.
        self.client_cancelled = False
        self._handler_scope: anyio.CancelScope | None = None

    def handler_scope(self) -> anyio.CancelScope:
        """The scope the call's handler runs in; cancelled when the client cancels the call."""
        self._handler_scope = anyio.CancelScope()
        if self.client_cancelled:
            self._handler_scope.cancel()
        return self._handler_scope

    def cancel_by_client(self) -> None:
        self.client_cancelled = True
        if self._handler_scope is not None:
            self._handler_scope.cancel()

    @property
    def locally_closed(self) -> bool:
        return self._state in (GRPCStreamState.HALF_CLOSED_LOCAL, GRPCStreamState.CLOSED)

    async def send_message(self, message: Any) -> None:
        # Headers go out with the first message, so an error before any message is a single
        # Trailers-Only response (purerpc sends headers eagerly, before reading the request).
        if not self._response_started:
            await self.start_response()
        await super().send_message(message)

    async def finish(self, code: GrpcCode, message: str, metadata: Metadata = ()) -> None:
        """End the call with a status and trailing metadata; reserved `grpc-*` keys allowed."""
        self.status_code = code
        headers: list[tuple[str, str]] = []
        if not self._response_started:
            headers += [(":status", "200"), ("content-type", "application/grpc+proto")]
        headers.append(("grpc-status", str(int(code))))
        if message:
            if len(message) > MAX_STATUS_MESSAGE_CHARS:
                message = message[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."
            headers.append(("grpc-message", urllib.parse.quote(message, safe="")))
        for key, value in metadata:
            if isinstance(value, bytes):  # -bin values: base64 without padding (gRPC spec)
                headers.append((key, base64.b64encode(value).rstrip(b"=").decode("ascii")))
            else:
                headers.append((key, value))
        try:
            self._grpc_connection.h2_connection.send_headers(
                self._stream_id, headers, end_stream=True
            )
        finally:  # also when h2 refuses (stream reset by the client): the call is over either way
            self._close_local()
        await self._socket.flush()

    async def end_call(self) -> None:
        """The handler is done: hand back the window of the messages it did not read. Bytes
        of a message still incomplete are released by `_H2Connection` when more arrive (the
        call is answered by now), when the request ends, or when the client resets it."""
        receive = self._incoming_events[1]
        while True:
            try:
                event = receive.receive_nowait()
            except anyio.WouldBlock:
                break
            if isinstance(event, MessageReceived):
                self._grpc_connection.acknowledge_received_data(
                    self._stream_id, event.flow_controlled_length
                )
        await self._socket.flush()


class _H2Connection(GRPCConnection):  # type: ignore[misc]
    """purerpc's connection with our stream limit, a bounded connection window, and no window
    leaks: request bytes that will never be read are acknowledged at once (see below)."""

    def __init__(
        self, config: GRPCConfiguration, *, max_concurrent_streams: int, window_bytes: int
    ) -> None:
        # Read by purerpc's settings setup inside super().__init__.
        self.MAX_CONCURRENT_STREAMS = max_concurrent_streams
        self._window_bytes = window_bytes
        # Told the stream id of every RST_STREAM from the client (GrpcSocket cancels its call).
        self.on_stream_reset: Callable[[int], None] | None = None
        super().__init__(config=config)

    def initiate_connection(self) -> None:
        self.h2_connection.initiate_connection()
        increment = self._window_bytes - H2_DEFAULT_WINDOW_BYTES
        if increment > 0:
            self.h2_connection.increment_flow_control_window(increment)

    def _answered(self, stream_id: int) -> bool:
        stream = self.h2_connection.streams.get(stream_id)
        return stream is None or stream.state_machine.state in _ANSWERED_STATES

    def release_unparsed(self, stream_id: int) -> None:
        """Acknowledge the bytes buffered for a message that will never be read."""
        buffer = self.message_read_buffers.get(stream_id)
        if buffer is None:
            return
        # Unparsed bytes, plus the 5-byte header of a message whose body is incomplete.
        pending = sum(length for _, length in buffer._buffer._deque)
        pending += buffer._flow_controlled_length or 0
        if pending:
            self.h2_connection.acknowledge_received_data(pending, stream_id)
        self.message_read_buffers[stream_id] = MessageReadBuffer(
            buffer._message_encoding, self.config.max_message_length
        )

    def _data_received(self, event: Any) -> list[Any]:
        # A client may keep uploading after its call was answered (a rejection before reading):
        # purerpc's own client finishes the message, grpcio resets the stream. purerpc would
        # buffer those bytes unacknowledged; once they fill the connection window every call
        # on the connection stalls. Drop them and hand their window back.
        if self._answered(event.stream_id):
            self.release_unparsed(event.stream_id)
            self.h2_connection.acknowledge_received_data(
                event.flow_controlled_length, event.stream_id
            )
            return []
        try:
            return cast(list[Any], super()._data_received(event))
        except MessageTooLargeError:
            # purerpc raises this out of its frame parser, which ends the whole connection and
            # every call on it. Answer only this call; the rest of its upload is dropped as
            # above, and its handler sees the request end without a message.
            self.release_unparsed(event.stream_id)
            del self.message_read_buffers[event.stream_id]
            limit = self.config.max_message_length
            status = Status(StatusCode.INVALID_ARGUMENT, f"request message over {limit} bytes")
            self.respond_status(event.stream_id, status,
                                custom_metadata=error_code_trailer(ErrorCode.PAYLOAD_TOO_LARGE))
            return [RequestEnded(event.stream_id)]

    def _stream_ended(self, event: Any) -> list[Any]:
        # A request that ends inside a message: purerpc drops the partial bytes unacknowledged.
        self.release_unparsed(event.stream_id)
        return cast(list[Any], super()._stream_ended(event))

    def _stream_reset(self, event: Any) -> list[Any]:
        # purerpc ignores RST_STREAM: the partial message stayed buffered (unacknowledged) and
        # the stream never ended. Release the bytes and end the request; a handler already
        # running (its request read) is cancelled: the client will not take its answer.
        if self.on_stream_reset is not None:
            self.on_stream_reset(event.stream_id)
        if event.stream_id not in self.message_read_buffers:  # the request had already ended
            return []
        self.release_unparsed(event.stream_id)
        del self.message_read_buffers[event.stream_id]
        return [RequestEnded(event.stream_id)]


class GrpcSocket(GRPCProtoSocket):  # type: ignore[misc]
    """purerpc's server socket on our connection: `listen()` yields a `GrpcStream` per call;
    `send_goaway` + `flush` end the connection politely."""

    StreamClass = GrpcStream

    def __init__(
        self,
        config: GRPCConfiguration,
        sock: anyio.abc.SocketStream,
        *,
        max_concurrent_streams: int,
        window_bytes: int,
    ) -> None:
        super().__init__(config, sock)
        # purerpc builds its connection inside __init__ with fixed limits: replace it (and the
        # socket wrapper bound to it) before anything is sent.
        self._grpc_connection = _H2Connection(
            config, max_concurrent_streams=max_concurrent_streams, window_bytes=window_bytes
        )
        self._socket = SocketWrapper(self._grpc_connection, sock)
        self._grpc_connection.on_stream_reset = self._stream_reset

    def _stream_reset(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.cancel_by_client()

    def cancel_calls(self) -> None:
        """The client went away (its connection ended): cancel the calls still running."""
        for stream in list(self._streams.values()):
            stream.cancel_by_client()

    def send_goaway(self) -> None:
        # Already closed (a protocol error, or the peer's GOAWAY): nothing to announce.
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._grpc_connection.h2_connection.close_connection()

    async def flush(self) -> None:
        await self._socket.flush()
