"""The purerpc listener, spoken to by the official grpcio client (sync, in worker threads, every
call with a deadline): health, UNIMPLEMENTED servicers, error rendering with trailing metadata,
malformed protobuf, flow-control hygiene, deadlines, graceful drain, on trio and on asyncio.

`Probe` is a fault-injection service: it ends calls the ways real servicers will (abort with a
retry delay, error-tree exceptions, crashes, slow calls) before those servicers exist.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import grpc
import purerpc
import pytest
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    message_factory,
)

from mlrun.server.edges.grpc.connection import MAX_STATUS_MESSAGE_CHARS
from mlrun.server.edges.grpc.health import HealthServicer
from mlrun.server.edges.grpc.listener import GrpcAbort, serve_grpc
from mlrun.server.errors import GrpcCode, Overloaded
from mlrun.wire.proto.grpc.health.v1 import health_grpc, health_pb2
from mlrun.wire.proto.mlrun.v1 import ingest_pb2, query_pb2

from unimplemented_servicers import IngestServicer, QueryServicer

CALL_TIMEOUT_S = 5.0
TEST_TIMEOUT_S = 60
HOST = "127.0.0.1"
SECRET = "password=hunter2"

CHECK = "/grpc.health.v1.Health/Check"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)

# Connection window = streams x (message limit + 5) + 65535 = 589,833 bytes: a few MB of
# unacknowledged uploads would exhaust it many times over.
SMALL_WINDOW: dict[str, Any] = {"max_message_bytes": 256 * 1024, "max_concurrent_streams": 2}


# --- grpcio side (blocking; always run through anyio.to_thread) -------------------------------


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    trailing: dict[str, Any]
    response: bytes | None


def call(
    channel: grpc.Channel, path: str, payload: bytes, timeout_s: float = CALL_TIMEOUT_S
) -> Outcome:
    """One unary call with identity serializers: raw bytes out, raw bytes back."""
    try:
        response, rpc = channel.unary_unary(path).with_call(payload, timeout=timeout_s)
    except grpc.RpcError as error:
        return Outcome(
            error.code(), error.details() or "", dict(error.trailing_metadata() or ()), None
        )
    return Outcome(grpc.StatusCode.OK, "", dict(rpc.trailing_metadata() or ()), response)


def check_request(service: str = "") -> bytes:
    return bytes(health_pb2.HealthCheckRequest(service=service).SerializeToString())


def health_status(outcome: Outcome) -> int:
    assert outcome.code == grpc.StatusCode.OK, outcome
    assert outcome.response is not None
    return int(health_pb2.HealthCheckResponse.FromString(outcome.response).status)


class Client:
    """A grpcio channel to the server under test, calls run in worker threads."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"{HOST}:{port}")

    async def call(
        self, path: str, payload: bytes = b"", timeout_s: float = CALL_TIMEOUT_S
    ) -> Outcome:
        return await anyio.to_thread.run_sync(call, self.channel, path, payload, timeout_s)

    async def check(self, service: str = "") -> int:
        return health_status(await self.call(CHECK, check_request(service)))

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.channel.close)


# --- server side -------------------------------------------------------------------------------


class Probe:
    """Fault injection: service `mlrun.test.Probe` (health messages as payloads)."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.release = anyio.Event()
        self.cancelled = anyio.Event()

    async def abort(self, message: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        raise GrpcAbort(
            GrpcCode.RESOURCE_EXHAUSTED,
            "slow down: ingest pipeline full",
            trailing_metadata=[("x-probe", "yes"), ("x-blob-bin", b"\x00\xffblob")],
            retry_after_ms=1500,
        )

    async def overloaded(
        self, message: health_pb2.HealthCheckRequest
    ) -> health_pb2.HealthCheckResponse:
        raise Overloaded("pipeline is full", retry_after_s=2)

    async def crash(self, message: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        raise RuntimeError(f"driver said: {SECRET}")

    async def verbose(
        self, message: health_pb2.HealthCheckRequest
    ) -> health_pb2.HealthCheckResponse:
        raise GrpcAbort(GrpcCode.INVALID_ARGUMENT, f"bad value {message.service!r}")

    async def slow(self, message: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        self.entered.set()
        try:
            await self.release.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise
        return health_pb2.HealthCheckResponse(status=SERVING)

    @property
    def service(self) -> purerpc.Service:
        service = purerpc.Service("mlrun.test.Probe")
        signature = purerpc.RPCSignature(
            purerpc.Cardinality.UNARY_UNARY,
            health_pb2.HealthCheckRequest,
            health_pb2.HealthCheckResponse,
        )
        for name in ("Abort", "Overloaded", "Crash", "Slow", "Verbose"):
            service.add_method(name, getattr(self, name.lower()), signature)
        return service


class Readiness:
    def __init__(self) -> None:
        self.ready = True
        self.error: Exception | None = None

    async def __call__(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.ready


def all_services(probe: Probe, readiness: Callable[[], Awaitable[bool]]) -> list[purerpc.Service]:
    return [
        HealthServicer(readiness, readiness_timeout_s=0.5).service,
        IngestServicer().service,
        QueryServicer().service,
        probe.service,
    ]


def server(
    services: list[purerpc.Service], **options: Any
) -> Callable[..., Coroutine[Any, Any, None]]:
    return functools.partial(serve_grpc, host=HOST, port=0, services=services, **options)


def accepts_connections(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=CALL_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def google_rpc_types() -> tuple[Any, Any]:
    """google.rpc.Status and google.rpc.RetryInfo, built from their published definitions
    (googleapis google/rpc/status.proto and error_details.proto) in a private pool."""
    pool = descriptor_pool.DescriptorPool()
    for dependency in (any_pb2, duration_pb2):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(dependency.DESCRIPTOR.serialized_pb))
    field = descriptor_pb2.FieldDescriptorProto
    status_file = descriptor_pb2.FileDescriptorProto(
        name="google/rpc/status.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    status = status_file.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL)
    status.field.add(name="message", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    status.field.add(
        name="details",
        number=3,
        type=field.TYPE_MESSAGE,
        type_name=".google.protobuf.Any",
        label=field.LABEL_REPEATED,
    )
    details_file = descriptor_pb2.FileDescriptorProto(
        name="google/rpc/error_details.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/duration.proto"],
    )
    retry_info = details_file.message_type.add(name="RetryInfo")
    retry_info.field.add(
        name="retry_delay",
        number=1,
        type=field.TYPE_MESSAGE,
        type_name=".google.protobuf.Duration",
        label=field.LABEL_OPTIONAL,
    )
    pool.Add(status_file)
    pool.Add(details_file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.RetryInfo")),
    )


# --- tests -------------------------------------------------------------------------------------


async def test_health_check_follows_injected_readiness() -> None:
    readiness = Readiness()
    probe = Probe()
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server(all_services(probe, readiness)))
            client = Client(port)
            names = ["", "mlrun.v1.IngestService", "mlrun.v1.QueryService",
                     "mlrun.v1.LifecycleService"]
            assert [await client.check(name) for name in names] == [SERVING] * 4

            readiness.ready = False
            assert [await client.check(name) for name in names] == [NOT_SERVING] * 4

            readiness.ready, readiness.error = True, ConnectionRefusedError("clickhouse down")
            assert await client.check() == NOT_SERVING

            readiness.error = None
            assert await client.check() == SERVING

            unknown = await client.call(CHECK, check_request("mlrun.v1.NoSuchService"))
            assert unknown.code == grpc.StatusCode.NOT_FOUND

            await client.aclose()
            tg.cancel_scope.cancel()


async def test_health_watch_streams_each_change_and_ends_at_close() -> None:
    readiness = Readiness()
    health = HealthServicer(readiness, readiness_timeout_s=0.5, watch_interval_s=0.1)
    received: list[int] = []
    changed = anyio.Event()
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server([health.service], grace_period_s=300))
            client = Client(port)
            stream = client.channel.unary_stream("/grpc.health.v1.Health/Watch")
            updates = stream(check_request("mlrun.v1.QueryService"), timeout=30)
            unknown = stream(check_request("mlrun.v1.NoSuchService"), timeout=30)
            portal = anyio.from_thread.BlockingPortal()

            def read_updates() -> grpc.StatusCode:
                for response in updates:
                    received.append(health_pb2.HealthCheckResponse.FromString(response).status)
                    portal_call(changed.set)
                return grpc.StatusCode.OK

            async with portal:
                portal_call = portal.call

                async def next_status() -> int:
                    nonlocal changed
                    with anyio.fail_after(5):
                        await changed.wait()
                    changed = anyio.Event()
                    return received[-1]

                async with anyio.create_task_group() as reading:
                    ended: list[grpc.StatusCode] = []

                    async def read() -> None:
                        ended.append(await anyio.to_thread.run_sync(read_updates))

                    reading.start_soon(read)
                    assert await next_status() == SERVING  # the current status, at once
                    readiness.ready = False
                    assert await next_status() == NOT_SERVING
                    readiness.ready = True
                    assert await next_status() == SERVING
                    first = health_pb2.HealthCheckResponse.FromString(
                        await anyio.to_thread.run_sync(next, unknown))
                    assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                    health.close()  # shutdown: NOT_SERVING, then the stream ends OK
                    assert await next_status() == NOT_SERVING
            assert ended == [grpc.StatusCode.OK]
            assert received == [SERVING, NOT_SERVING, SERVING, NOT_SERVING]  # changes only
            await client.aclose()
            tg.cancel_scope.cancel()  # returns at once: no watch holds the drain


async def test_hanging_readiness_reads_as_not_serving() -> None:
    never = anyio.Event()

    async def hangs() -> bool:
        await never.wait()
        return True

    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server([HealthServicer(hangs, readiness_timeout_s=0.2).service]))
            client = Client(port)
            assert await client.check() == NOT_SERVING
            await client.aclose()
            tg.cancel_scope.cancel()


async def test_every_ingest_and_query_method_answers_unimplemented() -> None:
    methods = [
        (service.full_name, method.name, method.input_type)
        for module in (ingest_pb2, query_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    assert len(methods) == 14
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server([IngestServicer().service, QueryServicer().service]))
            client = Client(port)
            for service_name, method_name, input_type in methods:
                request = message_factory.GetMessageClass(input_type)()
                outcome = await client.call(
                    f"/{service_name}/{method_name}", request.SerializeToString()
                )
                assert outcome.code == grpc.StatusCode.UNIMPLEMENTED, (method_name, outcome)
                assert f"/{service_name}/{method_name} is not implemented yet" == outcome.details
                assert outcome.trailing.get("mlrun-error-code") == "unimplemented"
            await client.aclose()
            tg.cancel_scope.cancel()


async def test_unknown_service_and_method_answer_unimplemented() -> None:
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server([IngestServicer().service]))
            client = Client(port)
            unknown_service = await client.call("/mlrun.v9.Nothing/Anything", b"")
            assert unknown_service.code == grpc.StatusCode.UNIMPLEMENTED
            assert "mlrun.v9.Nothing" in unknown_service.details
            unknown_method = await client.call("/mlrun.v1.IngestService/DropAllRuns", b"")
            assert unknown_method.code == grpc.StatusCode.UNIMPLEMENTED
            assert "DropAllRuns" in unknown_method.details
            await client.aclose()
            tg.cancel_scope.cancel()


async def test_abort_delivers_code_message_and_trailing_metadata_to_grpcio() -> None:
    status_type, retry_info_type = google_rpc_types()
    probe = Probe()
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server([probe.service]))
            client = Client(port)
            outcome = await client.call("/mlrun.test.Probe/Abort", check_request())
            overloaded = await client.call("/mlrun.test.Probe/Overloaded", check_request())
            await client.aclose()
            tg.cancel_scope.cancel()

    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert outcome.details == "slow down: ingest pipeline full"
    assert outcome.trailing["x-probe"] == "yes"
    assert outcome.trailing["x-blob-bin"] == b"\x00\xffblob"
    assert outcome.trailing["retry-after-ms"] == "1500"
    status = status_type.FromString(outcome.trailing["grpc-status-details-bin"])
    assert status.code == GrpcCode.RESOURCE_EXHAUSTED
    assert status.message == "slow down: ingest pipeline full"
    [detail] = status.details
    assert detail.type_url == "type.googleapis.com/google.rpc.RetryInfo"
    retry_info = retry_info_type.FromString(detail.value)
    assert (retry_info.retry_delay.seconds, retry_info.retry_delay.nanos) == (1, 500_000_000)

    # The error tree renders the same way, with its stable machine code.
    assert overloaded.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert overloaded.details == "pipeline is full"
    assert overloaded.trailing["mlrun-error-code"] == "overloaded"
    assert overloaded.trailing["retry-after-ms"] == "2000"
    retry = retry_info_type.FromString(
        status_type.FromString(overloaded.trailing["grpc-status-details-bin"]).details[0].value
    )
    assert retry.retry_delay.seconds == 2


async def test_long_status_message_is_truncated_not_turned_into_an_error() -> None:
    """A status message echoing a 100 KB input would not fit grpcio's header limit (grpcio
    would report RESOURCE_EXHAUSTED instead): it is cut to MAX_STATUS_MESSAGE_CHARS."""
    probe = Probe()
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server([probe.service]))
            client = Client(port)
            outcome = await client.call("/mlrun.test.Probe/Verbose", check_request("v" * 100_000))
            await client.aclose()
            tg.cancel_scope.cancel()
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert outcome.details.startswith("bad value 'vvv")
    assert outcome.details.endswith("...")
    assert len(outcome.details) == MAX_STATUS_MESSAGE_CHARS


async def test_unexpected_exception_is_internal_and_reveals_nothing() -> None:
    probe = Probe()
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server([probe.service, HealthServicer(Readiness()).service]))
            client = Client(port)
            crashed = await client.call("/mlrun.test.Probe/Crash", check_request())
            assert await client.check() == SERVING  # and the server keeps serving
            await client.aclose()
            tg.cancel_scope.cancel()
    assert crashed.code == grpc.StatusCode.INTERNAL
    assert crashed.details == "internal error"
    assert SECRET not in repr(crashed)


async def test_malformed_protobuf_is_invalid_argument_and_server_keeps_serving() -> None:
    garbage = b"\xff\xff\xff\xff\x0f"  # field 0x1fffffff with wire type 7: no valid message
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            services = [HealthServicer(Readiness()).service, IngestServicer().service]
            port = await tg.start(server(services))
            client = Client(port)
            bad_check = await client.call(CHECK, garbage)
            bad_batch = await client.call("/mlrun.v1.IngestService/LogBatch", garbage)
            truncated = ingest_pb2.LogBatchRequest(run_id="r" * 40).SerializeToString()[:-5]
            bad_truncated = await client.call("/mlrun.v1.IngestService/LogBatch", truncated)
            assert await client.check() == SERVING
            await client.aclose()
            tg.cancel_scope.cancel()
    assert bad_check.code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_check.details == "request is not a valid grpc.health.v1.HealthCheckRequest message"
    assert bad_batch.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "mlrun.v1.LogBatchRequest" in bad_batch.details
    assert bad_truncated.code == grpc.StatusCode.INVALID_ARGUMENT
    # Like every other error, these carry the machine code.
    assert {o.trailing.get("mlrun-error-code") for o in (bad_check, bad_batch, bad_truncated)} \
        == {"invalid_argument"}


@pytest.mark.parametrize(
    ("payload_bytes", "calls"),
    [(4 * 1024, 300), (200 * 1000, 40)],
    ids=["small-uploads", "large-uploads"],
)
async def test_rejected_uploads_do_not_leak_the_connection_window_grpcio(
    payload_bytes: int, calls: int
) -> None:
    """Request bytes of calls answered before reading them must hand their flow-control window
    back (purerpc never does): once they fill the connection window, every later call on the
    connection stalls. The window is ~576 KiB here; MBs are sent.
    Small uploads arrive whole before the answer; grpcio resets large ones mid-upload."""
    payload = b"\x00" * payload_bytes
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            services = [HealthServicer(Readiness()).service, IngestServicer().service]
            port = await tg.start(server(services, **SMALL_WINDOW))
            client = Client(port)

            def rejections() -> set[grpc.StatusCode]:
                path = "/mlrun.v9.Nothing/Upload"
                return {call(client.channel, path, payload).code for _ in range(calls)}

            assert await anyio.to_thread.run_sync(rejections) == {grpc.StatusCode.UNIMPLEMENTED}
            assert await client.check("mlrun.v1.IngestService") == SERVING
            await client.aclose()
            tg.cancel_scope.cancel()


async def test_concurrent_large_requests_do_not_starve_each_other() -> None:
    """Messages are acknowledged only once complete and read: if the connection window were
    smaller than the streams' incomplete messages together (purerpc's per-stream 2x limit, say),
    concurrent uploads would each hold part of it and wait for each other forever."""
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            options = {"max_message_bytes": 256 * 1024, "max_concurrent_streams": 16}
            port = await tg.start(server([HealthServicer(Readiness()).service], **options))
            client = Client(port)

            def concurrent_calls() -> list[grpc.StatusCode]:
                def one(i: int) -> grpc.StatusCode:
                    return call(client.channel, CHECK, check_request(f"{i}" + "x" * 250_000)).code

                with ThreadPoolExecutor(16) as pool:
                    return list(pool.map(one, range(64)))

            codes = await anyio.to_thread.run_sync(concurrent_calls)
            assert codes == [grpc.StatusCode.NOT_FOUND] * 64  # every call answered, none stalled
            await client.aclose()
            tg.cancel_scope.cancel()


async def test_rejected_uploads_do_not_leak_the_connection_window_purerpc() -> None:
    """purerpc's own client keeps uploading after the answer arrived: those bytes are dropped
    and acknowledged as they come, so the connection keeps serving."""
    signature = purerpc.RPCSignature(
        purerpc.Cardinality.UNARY_UNARY, ingest_pb2.LogBatchRequest, ingest_pb2.LogBatchResponse
    )
    big_batch = ingest_pb2.LogBatchRequest(run_id="r" * 200_000)
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            services = [HealthServicer(Readiness()).service, IngestServicer().service]
            port = await tg.start(server(services, **SMALL_WINDOW))
            async with purerpc.insecure_channel(HOST, port) as channel:
                upload = purerpc.Client("mlrun.v9.Nothing", channel).get_method_stub(
                    "Upload", signature
                )
                for _ in range(40):
                    with (
                        pytest.raises(purerpc.UnimplementedError),
                        anyio.fail_after(CALL_TIMEOUT_S),
                    ):
                        await upload(big_batch)
                health = health_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
                with anyio.fail_after(CALL_TIMEOUT_S):
                    answer = await health.Check(health_pb2.HealthCheckRequest())
                assert answer.status == SERVING
            tg.cancel_scope.cancel()


class RawH2:
    """A bare HTTP/2 client (the `h2` library over a blocking socket; run it in a worker thread)
    to produce interleavings no gRPC client produces on cue: partial uploads that stop, resets."""

    def __init__(self, port: int) -> None:
        import h2.config  # type: ignore[import-untyped]
        import h2.connection  # type: ignore[import-untyped]

        self.sock = socket.create_connection((HOST, port), timeout=CALL_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.ended: dict[int, dict[str, str]] = {}  # stream id -> trailers (or Trailers-Only)
        self.pings_acked = 0
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def pump(self) -> None:
        """Read once (bounded by the socket timeout) and record finished streams."""
        import h2.events  # type: ignore[import-untyped]

        data = self.sock.recv(65536)
        assert data, "server closed the connection"
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                headers = {k.decode(): v.decode() for k, v in event.headers}
                if "grpc-status" in headers:
                    self.ended[event.stream_id] = headers
            elif isinstance(event, h2.events.PingAcknowledged):
                self.pings_acked += 1
        self.flush()

    def start(self, stream_id: int, path: str) -> None:
        self.h2.send_headers(
            stream_id,
            [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", HOST),
             ("te", "trailers"), ("content-type", "application/grpc")],
        )  # fmt: skip

    def upload(self, stream_id: int, body: bytes, *, end: bool) -> None:
        """Send `body` (any part of a message) in frames as large as the flow-control window
        allows, like any HTTP/2 client; `end` half-closes the request after it."""
        while True:
            room = min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
            if room == 0 and body:
                self.pump()  # wait for the server to hand window back
                continue
            chunk, body = body[:room], body[room:]
            self.h2.send_data(stream_id, chunk, end_stream=end and not body)
            self.flush()
            if not body:
                return

    def wait_ended(self, stream_id: int) -> dict[str, str]:
        while stream_id not in self.ended:
            self.pump()
        return self.ended[stream_id]

    def close(self) -> None:
        self.sock.close()


def partial_message(declared_bytes: int, sent_bytes: int) -> bytes:
    """A gRPC frame header announcing `declared_bytes`, followed by only `sent_bytes` of it."""
    return b"\x00" + declared_bytes.to_bytes(4, "big") + b"\x00" * sent_bytes


@pytest.mark.parametrize(
    ("message_bytes", "sent_bytes", "calls", "ending"),
    [
        (200_000, 170_000, 20, "rest-after-answer"),
        (200_000, 200_000, 20, "end-after-answer"),
        (4000, 4000, 600, "end-at-once"),
        (200_000, 170_000, 20, "end-after-answer"),
        (4000, 3000, 600, "end-at-once"),
    ],
    ids=["partial", "whole", "small-whole", "truncated-late", "truncated-early"],
)
async def test_uploads_answered_before_being_read_give_their_window_back(
    message_bytes: int, sent_bytes: int, calls: int, ending: str
) -> None:
    """Calls to an unknown method, answered before their message is read: whatever the server
    buffered for them (part of a message, a whole parsed one, a message cut short by the end of
    the request) must be released, or a few such calls exhaust the connection window (the
    uploads below add up to 4-7x the window). Headers and the first bytes go out in one write,
    so the server buffers them before the handler even starts. "rest-after-answer" completes
    the upload after the answer, as purerpc's own client does."""
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            services = [HealthServicer(Readiness()).service, IngestServicer().service]
            port = await tg.start(server(services, **SMALL_WINDOW))

            def scenario() -> tuple[list[str], str]:
                raw = RawH2(port)
                try:
                    statuses = []
                    first = partial_message(message_bytes, sent_bytes)
                    rest = b"\x00" * (message_bytes - sent_bytes)
                    for stream_id in range(1, 2 * calls, 2):
                        raw.start(stream_id, "/mlrun.v9.Nothing/Upload")
                        raw.upload(stream_id, first, end=ending == "end-at-once")
                        statuses.append(raw.wait_ended(stream_id)["grpc-status"])
                        if ending != "end-at-once":
                            later = rest if ending == "rest-after-answer" else b""
                            raw.upload(stream_id, later, end=True)
                    # Needs nearly half the window at once (h2 hands window back in halves):
                    # it stalls for good if the uploads above kept any of it.
                    big = check_request("x" * 250_000)
                    framed = b"\x00" + len(big).to_bytes(4, "big") + big
                    raw.start(2 * calls + 1, CHECK)
                    raw.upload(2 * calls + 1, framed, end=True)
                    return statuses, raw.wait_ended(2 * calls + 1)["grpc-status"]
                finally:
                    raw.close()

            statuses, check_status = await anyio.to_thread.run_sync(scenario)
            assert statuses == [str(int(GrpcCode.UNIMPLEMENTED))] * calls
            assert check_status == str(int(GrpcCode.NOT_FOUND))  # unknown service "xxx..."
            tg.cancel_scope.cancel()


async def test_reset_of_a_half_uploaded_request_ends_its_handler() -> None:
    """A client that resets mid-upload: purerpc ignores RST_STREAM, so the handler would wait
    for the rest of the message forever and hold shutdown for the whole grace period."""
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as serving:
            port = await serving.start(server([IngestServicer().service], grace_period_s=300))

            def scenario() -> None:
                raw = RawH2(port)
                try:
                    raw.start(1, "/mlrun.v1.IngestService/LogBatch")
                    raw.upload(1, partial_message(1000, 10), end=False)
                    raw.h2.reset_stream(1, error_code=8)  # CANCEL
                    raw.h2.ping(b"syncsync")  # answered only after the reset was processed
                    raw.flush()
                    while not raw.pings_acked:
                        raw.pump()
                finally:
                    raw.close()

            await anyio.to_thread.run_sync(scenario)
            serving.cancel_scope.cancel()  # returns promptly only if no handler is stuck


async def test_oversized_request_fails_alone_not_its_connection() -> None:
    """purerpc ends the whole connection (every call on it) when one message is over the limit;
    here only that call fails, and a call in flight on the same connection completes. It fails
    INVALID_ARGUMENT `payload_too_large`, not RESOURCE_EXHAUSTED: that one tells clients to
    wait and resend, and the same message can never fit."""
    probe = Probe()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            services = [probe.service, HealthServicer(Readiness()).service]
            port = await tg.start(server(services, max_message_bytes=64 * 1024))
            client = Client(port)

            async def slow_call() -> None:
                outcomes["slow"] = await client.call("/mlrun.test.Probe/Slow", check_request())

            async with anyio.create_task_group() as calls:
                calls.start_soon(slow_call)
                await probe.entered.wait()
                outcomes["big"] = await client.call(CHECK, check_request("x" * 100_000))
                probe.release.set()
            assert await client.check() == SERVING
            await client.aclose()
            tg.cancel_scope.cancel()
    assert outcomes["big"].code == grpc.StatusCode.INVALID_ARGUMENT
    assert outcomes["big"].details == "request message over 65536 bytes"
    assert outcomes["big"].trailing["mlrun-error-code"] == "payload_too_large"
    assert outcomes["slow"].code == grpc.StatusCode.OK


async def test_client_deadline_cancels_the_handler() -> None:
    probe = Probe()
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server([probe.service]))
            client = Client(port)
            outcome = await client.call("/mlrun.test.Probe/Slow", check_request(), timeout_s=0.5)
            assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
            await probe.cancelled.wait()  # the server honoured grpc-timeout, not only the client
            await client.aclose()
            tg.cancel_scope.cancel()


async def test_a_call_cancelled_by_its_client_stops_its_handler() -> None:
    """grpcio's `future.cancel()` sends RST_STREAM after the request was read: the handler is
    cancelled (not left running for nobody), and the connection keeps serving."""
    probe = Probe()
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            services = [probe.service, HealthServicer(Readiness()).service]
            port = await tg.start(server(services, grace_period_s=300))
            client = Client(port)
            future = client.channel.unary_unary("/mlrun.test.Probe/Slow").future(
                check_request(), timeout=30)
            await probe.entered.wait()
            assert await anyio.to_thread.run_sync(future.cancel)
            with anyio.fail_after(5):
                await probe.cancelled.wait()
            assert await client.check() == SERVING  # same channel, same connection
            await client.aclose()
            tg.cancel_scope.cancel()  # returns promptly: no handler left waiting


async def test_a_closed_client_connection_stops_its_handlers() -> None:
    probe = Probe()
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server([probe.service], grace_period_s=300))

            def start() -> RawH2:
                raw = RawH2(port)
                body = check_request()
                raw.start(1, "/mlrun.test.Probe/Slow")
                raw.upload(1, b"\x00" + len(body).to_bytes(4, "big") + body, end=True)
                return raw

            raw = await anyio.to_thread.run_sync(start)
            await probe.entered.wait()
            raw.close()  # no RST_STREAM, no GOAWAY: the connection just ends
            with anyio.fail_after(5):
                await probe.cancelled.wait()
            tg.cancel_scope.cancel()


async def drain_scenario() -> None:
    """Cancel the server while a call is in flight: the listener closes at once, new calls on the
    open connection get UNAVAILABLE, the in-flight call completes, then the server returns."""
    probe = Probe()
    readiness = Readiness()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(TEST_TIMEOUT_S - 10):
        async with anyio.create_task_group() as clients:
            async with anyio.create_task_group() as serving:
                port = await serving.start(
                    server(all_services(probe, readiness), grace_period_s=300)
                )
                client = Client(port)

                async def slow_call() -> None:
                    outcomes["slow"] = await client.call(
                        "/mlrun.test.Probe/Slow", check_request(), timeout_s=30
                    )

                async def while_draining() -> None:
                    outcomes["same connection"] = await client.call(CHECK, check_request())
                    late = Client(port)
                    outcomes["new connection"] = await late.call(CHECK, check_request())
                    await late.aclose()
                    probe.release.set()

                clients.start_soon(slow_call)
                await probe.entered.wait()
                clients.start_soon(while_draining)
                serving.cancel_scope.cancel()
            # serve_grpc has returned: the in-flight call was drained, not cut off.
            assert not await anyio.to_thread.run_sync(accepts_connections, HOST, port)
        await client.aclose()

    assert outcomes["slow"].code == grpc.StatusCode.OK
    assert health_status(outcomes["slow"]) == SERVING
    assert not probe.cancelled.is_set()
    assert outcomes["same connection"].code == grpc.StatusCode.UNAVAILABLE
    assert outcomes["same connection"].details == "server is shutting down"
    assert outcomes["new connection"].code == grpc.StatusCode.UNAVAILABLE


async def test_cancel_drains_in_flight_calls() -> None:
    await drain_scenario()


def test_cancel_drains_in_flight_calls_on_asyncio() -> None:
    anyio.run(drain_scenario, backend="asyncio")


async def test_grace_period_expiry_cancels_calls_with_unavailable() -> None:
    probe = Probe()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        # `serving` is the inner group: it exits (drained) before `clients` waits for the call.
        async with anyio.create_task_group() as clients, anyio.create_task_group() as serving:
            port = await serving.start(server([probe.service], grace_period_s=0.2))
            client = Client(port)

            async def slow_call() -> None:
                outcomes["slow"] = await client.call(
                    "/mlrun.test.Probe/Slow", check_request(), timeout_s=30
                )

            clients.start_soon(slow_call)
            await probe.entered.wait()
            serving.cancel_scope.cancel()  # never released: only the grace period ends it
        await client.aclose()
    assert probe.cancelled.is_set()
    assert outcomes["slow"].code == grpc.StatusCode.UNAVAILABLE
    assert outcomes["slow"].details == "server is shutting down"


async def test_cancel_stops_listener_with_idle_connections_open() -> None:
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as serving:
            port = await serving.start(server([HealthServicer(Readiness()).service]))
            client = Client(port)
            assert await client.check() == SERVING  # leaves an idle HTTP/2 connection open
            assert await anyio.to_thread.run_sync(accepts_connections, HOST, port)
            serving.cancel_scope.cancel()
        assert not await anyio.to_thread.run_sync(accepts_connections, HOST, port)
        after = await client.call(CHECK, check_request())
        assert after.code == grpc.StatusCode.UNAVAILABLE
        await client.aclose()


async def test_binds_only_the_given_host() -> None:
    with anyio.fail_after(TEST_TIMEOUT_S - 5):
        async with anyio.create_task_group() as serving:
            port = await serving.start(server([HealthServicer(Readiness()).service]))
            assert port > 0
            assert await anyio.to_thread.run_sync(accepts_connections, HOST, port)
            # Also loopback, but another address: a wildcard bind (purerpc's own) would accept it.
            assert not await anyio.to_thread.run_sync(accepts_connections, "127.0.0.2", port)
            serving.cancel_scope.cancel()


async def health_errors_and_unimplemented_scenario() -> None:
    readiness = Readiness()
    with anyio.fail_after(TEST_TIMEOUT_S - 10):
        async with anyio.create_task_group() as serving:
            port = await serving.start(server(all_services(Probe(), readiness)))
            client = Client(port)
            assert await client.check("mlrun.v1.QueryService") == SERVING
            readiness.ready = False
            assert await client.check() == NOT_SERVING
            outcome = await client.call("/mlrun.test.Probe/Abort", check_request())
            assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert outcome.trailing["retry-after-ms"] == "1500"
            unimplemented = await client.call("/mlrun.v1.QueryService/GetRun", b"")
            assert unimplemented.code == grpc.StatusCode.UNIMPLEMENTED
            await client.aclose()
            serving.cancel_scope.cancel()


def test_health_errors_and_unimplemented_on_asyncio() -> None:
    anyio.run(health_errors_and_unimplemented_scenario, backend="asyncio")


def test_grpc_abort_rejects_metadata_grpcio_could_not_carry() -> None:
    with pytest.raises(ValueError, match="invalid trailing metadata key"):
        GrpcAbort(GrpcCode.INTERNAL, "x", trailing_metadata=[("grpc-status", "0")])
    with pytest.raises(ValueError, match="invalid trailing metadata key"):
        GrpcAbort(GrpcCode.INTERNAL, "x", trailing_metadata=[("Upper-Case", "v")])
    with pytest.raises(ValueError, match="-bin"):
        GrpcAbort(GrpcCode.INTERNAL, "x", trailing_metadata=[("x-raw", b"\x00")])
    with pytest.raises(ValueError, match="-bin"):
        GrpcAbort(GrpcCode.INTERNAL, "x", trailing_metadata=[("x-raw-bin", "text")])
    with pytest.raises(ValueError, match="printable ASCII"):
        GrpcAbort(GrpcCode.INTERNAL, "x", trailing_metadata=[("x-text", "line\r\nbreak")])
    with pytest.raises(ValueError, match="not OK"):
        GrpcAbort(GrpcCode.OK, "fine")
