"""Readiness: do PostgreSQL, ClickHouse and the artifact store all answer right now?

Owns: probing every backend concurrently, each under its own deadline, and the report that
`GET /ready` and gRPC `Health/Check` both render. Nothing is latched: every check after the
cache window probes again, so readiness recovers by itself when a backend comes back.
Concurrent callers within `cache_s` share one probe round (single flight), so a burst of
health checks cannot stampede a struggling backend.

Must not import the HTTP or gRPC edges or any storage driver: backends are anything with a
`backend_name` and an `async ping(*, timeout_s)`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import anyio
import msgspec

from mlrun.server.errors import MlrunError
from mlrun.wire.error_codes import ErrorCode

logger = logging.getLogger("mlrun.readiness")


class Pingable(Protocol):
    @property
    def backend_name(self) -> str: ...

    async def ping(self, *, timeout_s: float) -> None: ...


class BackendStatus(msgspec.Struct, frozen=True):
    ok: bool
    code: str | None = None
    message: str | None = None


class ReadinessReport(msgspec.Struct, frozen=True):
    ready: bool
    backends: dict[str, BackendStatus]


class Readiness:
    def __init__(
        self, backends: Sequence[Pingable], *, timeout_s: float = 2.0, cache_s: float = 0.5
    ) -> None:
        self._backends = tuple(backends)
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._lock = anyio.Lock()
        self._last: ReadinessReport | None = None
        self._last_at = float("-inf")

    async def check(self) -> ReadinessReport:
        async with self._lock:
            if self._last is not None and anyio.current_time() - self._last_at < self._cache_s:
                return self._last
            report = await self._probe_all()
            if self._last is None or report.ready != self._last.ready:
                failing = [n for n, s in report.backends.items() if not s.ok]
                logger.info("readiness changed: ready=%s failing=%s", report.ready, failing)
            self._last, self._last_at = report, anyio.current_time()
            return report

    async def _probe_all(self) -> ReadinessReport:
        results: dict[str, BackendStatus] = {}

        async def probe(backend: Pingable) -> None:
            results[backend.backend_name] = await self._probe_one(backend)

        async with anyio.create_task_group() as tg:
            for backend in self._backends:
                tg.start_soon(probe, backend)
        return ReadinessReport(
            ready=all(status.ok for status in results.values()),
            backends=dict(sorted(results.items())),
        )

    async def _probe_one(self, backend: Pingable) -> BackendStatus:
        # The outer scope is a backstop in case a client's own timeout misbehaves.
        with anyio.move_on_after(self._timeout_s + 0.5) as scope:
            try:
                await backend.ping(timeout_s=self._timeout_s)
            except MlrunError as exc:
                return BackendStatus(ok=False, code=exc.code, message=exc.message)
            except Exception:
                logger.exception("unexpected error probing %s", backend.backend_name)
                return BackendStatus(ok=False, code=ErrorCode.INTERNAL, message="probe failed")
            return BackendStatus(ok=True)
        assert scope.cancelled_caught
        return BackendStatus(ok=False, code=ErrorCode.BACKEND_TIMEOUT, message="no answer in time")
