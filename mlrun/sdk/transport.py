"""The one small interface both transports implement, and the factory that picks one.

A transport sends one operation per call and turns every answer — success, error status,
timeout, refused connection — into an `Outcome` (see `mlrun.sdk.retry`); it never raises for
network trouble and never retries by itself. Retrying, waiting, spooling and ordering belong to
the sender, so HTTP and gRPC get the same behaviour from the same code.

Transports are used from one thread at a time (the sender's, or `mlrun sync`'s).
httpx and grpc are imported only when a transport is opened, so `import mlrun` stays cheap.
Must not import `mlrun.server`.
"""

from __future__ import annotations

from typing import Protocol

from mlrun.sdk.errors import SettingsError
from mlrun.sdk.ops import Op
from mlrun.sdk.retry import Outcome
from mlrun.sdk.settings import Settings


class Transport(Protocol):
    def deliver(self, op: Op) -> Outcome:
        """Send `op` once, within the request timeout."""
        ...

    def heartbeat(self, run_id: str) -> Outcome:
        ...

    def probe(self) -> bool:
        """Cheap check that the server answers (health endpoint), within a short timeout."""
        ...

    def close(self) -> None:
        ...


def open_transport(settings: Settings) -> Transport:
    if settings.transport == "grpc":
        try:
            from mlrun.sdk.transport_grpc import GrpcTransport
        except ModuleNotFoundError as exc:
            if exc.name != "grpc":
                raise
            raise SettingsError(
                "MLRUN_TRANSPORT=grpc needs grpcio: pip install 'mlrun-tracking[grpc]'"
            ) from None
        return GrpcTransport(settings)
    from mlrun.sdk.transport_http import HttpTransport

    return HttpTransport(settings)
