"""ClickHouse in-process: `open_embedded_clickhouse` -> `EmbeddedClickHouse`, the embedded
default's transport of the `storage.clickhouse.client.ClickHouse` protocol (chdb sessions on one
data directory, driven from worker threads).

chdb is imported lazily, in a worker thread, by `open_embedded_clickhouse` (~0.3 s and ~290 MB),
so a server using the HTTP transport never loads it.

Must not import trio or asyncio (anyio only), httpx, the HTTP/gRPC edges, or other storages.

Invariants: those of the `ClickHouse` protocol (deadlines on both sides, failures only as the
error tree's backend errors), plus: chdb serves one data directory per process, so a second
directory is refused with ConfigError; a session runs one statement at a time, and a statement
whose caller has already given up is never started.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import anyio.to_thread

from mlrun.server.errors import BackendError, BackendTimeout, BackendUnavailable, ConfigError
from mlrun.server.protocols.clickhouse import (
    RowBinaryType,
    decode_json_each_row,
    decode_row_binary,
    insert_prefix,
    parse_error,
    quote_identifier,
    with_format,
)
from mlrun.server.storage.clickhouse.client import BACKEND, CLOSE_TIMEOUT_S, translate_error

_T = TypeVar("_T")

# chdb runs one embedded server per process, bound to the first data directory opened; opening
# a different one raises a terse BAD_ARGUMENTS. We track the open directory to say so clearly.
_embedded_guard = threading.Lock()
_embedded_path: Path | None = None
_embedded_users = 0


def _claim_embedded_path(path: Path) -> None:
    global _embedded_path, _embedded_users
    with _embedded_guard:
        if _embedded_path is not None and _embedded_path != path:
            raise ConfigError(
                "embedded ClickHouse (chdb) serves one data directory per process:"
                f" {_embedded_path} is open, so {path} cannot be; use one data directory"
            )
        _embedded_path = path
        _embedded_users += 1


def _release_embedded_path() -> None:
    global _embedded_path, _embedded_users
    with _embedded_guard:
        _embedded_users -= 1
        if _embedded_users == 0:
            _embedded_path = None


@dataclass(slots=True)
class _Slot:
    """One chdb session, used by one worker thread at a time (a session refuses a query while it
    has a streaming insert open). Settings and the current database are per session."""

    session: Any
    database_selected: bool = False
    max_execution_time_s: int = 0


@dataclass(slots=True)
class _Job:
    # Set once the awaiting task has given up (deadline or cancellation): a worker that only now
    # gets a session must not run a statement nobody waits for.
    abandoned: bool = False


class _Abandoned(Exception):
    """Raised in a worker thread whose caller has gone; nobody ever receives it."""


class EmbeddedClickHouse:
    """chdb sessions on one data directory, used from worker threads. Build it with
    `open_embedded_clickhouse`."""

    backend_name: Final = BACKEND

    def __init__(self, sessions: Sequence[Any], *, database: str) -> None:
        self._database = database
        self._idle: queue.Queue[_Slot] = queue.Queue()
        for session in sessions:
            self._idle.put(_Slot(session=session))
        self._slot_count = len(sessions)
        self._limiter = anyio.CapacityLimiter(len(sessions))
        self._closed = False

    @property
    def database(self) -> str:
        return self._database

    async def ensure_database(self, *, timeout_s: float) -> None:
        sql = f"CREATE DATABASE IF NOT EXISTS {quote_identifier(self._database)}"

        def run(slot: _Slot) -> None:
            slot.session.query(sql, "TabSeparated")

        await self._call(run, timeout_s=timeout_s, in_database=False)

    async def execute(self, sql: str, *, timeout_s: float) -> None:
        def run(slot: _Slot) -> None:
            slot.session.query(sql, "TabSeparated")

        await self._call(run, timeout_s=timeout_s)

    async def query_rows(self, sql: str, *, timeout_s: float) -> list[dict[str, Any]]:
        statement = with_format(sql, "JSONEachRow")

        def run(slot: _Slot) -> bytes:
            result: bytes = slot.session.query(statement, "JSONEachRow").bytes()
            return result

        body = await self._call(run, timeout_s=timeout_s)
        try:
            return decode_json_each_row(body)
        except ValueError as exc:
            raise BackendError(
                "embedded ClickHouse returned an unreadable result",
                backend=BACKEND,
                detail=str(exc),
            ) from exc

    async def query_row_binary(
        self, sql: str, types: Sequence[RowBinaryType], *, timeout_s: float
    ) -> list[list[Any]]:
        statement = with_format(sql, "RowBinary")

        def run(slot: _Slot) -> bytes:
            result: bytes = slot.session.query(statement, "RowBinary").bytes()
            return result

        body = await self._call(run, timeout_s=timeout_s)
        try:
            return decode_row_binary(body, types)
        except ValueError as exc:
            raise BackendError(
                "embedded ClickHouse returned an unreadable result",
                backend=BACKEND,
                detail=str(exc),
            ) from exc

    async def insert_rowbinary(
        self, table: str, columns: Sequence[str], body: bytes, *, timeout_s: float
    ) -> None:
        await self._insert(table, columns, body, "RowBinary", timeout_s=timeout_s)

    async def insert_native(
        self, table: str, columns: Sequence[str], body: bytes, *, timeout_s: float
    ) -> None:
        await self._insert(table, columns, body, "Native", timeout_s=timeout_s)

    async def _insert(self, table: str, columns: Sequence[str], body: bytes, input_format: str,
                      *, timeout_s: float) -> None:
        statement = insert_prefix(table, columns)

        def run(slot: _Slot) -> None:
            inserter = slot.session.send_insert(statement, input_format)
            try:
                inserter.append(body)
                inserter.finish()
            except BaseException:
                # Frees the session for the next statement; a no-op after a failed finish().
                inserter.cancel()
                raise

        await self._call(run, timeout_s=timeout_s)

    async def ping(self, *, timeout_s: float) -> None:
        def run(slot: _Slot) -> None:
            slot.session.query("SELECT 1", "TabSeparated")

        await self._call(run, timeout_s=timeout_s, in_database=False)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S + 1.0):
            await anyio.to_thread.run_sync(self._close_sessions, abandon_on_cancel=True)

    def _close_sessions(self) -> None:
        """Close every session once it is idle; a session still busy in an abandoned thread past
        the deadline is left to the garbage collector."""
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        try:
            for _ in range(self._slot_count):
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                try:
                    slot = self._idle.get(timeout=remaining_s)
                except queue.Empty:
                    break
                with contextlib.suppress(Exception):  # closing must not mask the caller's error
                    slot.session.close()
        finally:
            _release_embedded_path()

    async def _call(
        self, work: Callable[[_Slot], _T], *, timeout_s: float, in_database: bool = True
    ) -> _T:
        if self._closed:
            raise BackendUnavailable("the embedded ClickHouse is closed", backend=BACKEND)
        job = _Job()
        server_timeout_s = math.ceil(timeout_s)
        try:
            with anyio.fail_after(timeout_s):
                # abandon_on_cancel: a chdb call cannot be interrupted, so on a deadline the
                # caller leaves and the thread finishes alone (bounded by max_execution_time).
                return await anyio.to_thread.run_sync(
                    self._run_in_thread,
                    job,
                    work,
                    in_database,
                    server_timeout_s,
                    limiter=self._limiter,
                    abandon_on_cancel=True,
                )
        except TimeoutError as exc:
            raise BackendTimeout(
                f"embedded ClickHouse did not answer within {timeout_s} s", backend=BACKEND
            ) from exc
        finally:
            job.abandoned = True

    def _run_in_thread(
        self,
        job: _Job,
        work: Callable[[_Slot], _T],
        in_database: bool,
        server_timeout_s: int,
    ) -> _T:
        # Blocking here is fine: this is a worker thread, and the limiter bounds how many wait.
        # (A queue rather than the limiter alone: on asyncio, anyio hands the limiter token back
        # when a call is abandoned, while its thread still holds the session.)
        slot = self._idle.get()
        try:
            if job.abandoned:
                raise _Abandoned
            if slot.max_execution_time_s != server_timeout_s:
                slot.session.query(f"SET max_execution_time = {server_timeout_s}", "TabSeparated")
                slot.max_execution_time_s = server_timeout_s
            if in_database and not slot.database_selected:
                slot.session.query(f"USE {quote_identifier(self._database)}", "TabSeparated")
                slot.database_selected = True
            return work(slot)
        except RuntimeError as exc:  # chdb's ChdbError and its plain RuntimeErrors
            raise translate_error(parse_error(str(exc))) from exc
        finally:
            self._idle.put(slot)


@contextlib.asynccontextmanager
async def open_embedded_clickhouse(
    *, data_dir: Path, database: str, max_threads: int = 2
) -> AsyncIterator[EmbeddedClickHouse]:
    """chdb on `data_dir` with `max_threads` sessions (statements run in parallel up to that).

    Several of these may be open at once on the same `data_dir` (they share chdb's one embedded
    server); a different `data_dir` in the same process is a ConfigError, and so is a directory
    another process holds. The database is not created here: call `ensure_database`.
    """
    if max_threads < 1:
        raise ValueError("max_threads must be at least 1")
    # Shielded and not abandonable: sessions opened by a thread whose caller was cancelled
    # would leak (local work, ~30 ms, so no deadline is needed).
    with anyio.CancelScope(shield=True):
        sessions = await anyio.to_thread.run_sync(_open_sessions, data_dir, max_threads)
    clickhouse = EmbeddedClickHouse(sessions, database=database)
    try:
        yield clickhouse
    finally:
        await clickhouse.aclose()


def _open_sessions(data_dir: Path, count: int) -> list[Any]:
    """Claim `data_dir` for this process, import chdb and open `count` sessions on it (in a
    worker thread: all of it blocks)."""
    path = data_dir.resolve()
    _claim_embedded_path(path)
    sessions: list[Any] = []
    try:
        path.mkdir(parents=True, exist_ok=True)
        try:
            from chdb.session import Session
        except ImportError as exc:
            raise ConfigError(
                "embedded ClickHouse needs the chdb package"
                " (pip install 'mlrun-tracking[embedded]')"
            ) from exc
        try:
            for _ in range(count):
                sessions.append(Session(str(path)))  # type: ignore[no-untyped-call]
        except RuntimeError as exc:
            error = parse_error(str(exc))
            raise ConfigError(
                f"cannot open embedded ClickHouse (chdb) on {path}: {error.message}; chdb allows"
                " one data directory per process and one process per data directory"
            ) from exc
    except BaseException:
        for session in sessions:
            with contextlib.suppress(Exception):
                session.close()
        _release_embedded_path()
        raise
    return sessions
