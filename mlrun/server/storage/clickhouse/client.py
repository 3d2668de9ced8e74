"""ClickHouse storage: the `ClickHouse` interface, its two transports, and the schema applier.

Owns:
- `ClickHouse`, the protocol every metrics reader and writer codes against;
- `open_http_clickhouse`: a ClickHouse server over its HTTP interface (httpx, keep-alive);
- `open_embedded_clickhouse`: chdb, ClickHouse in-process, driven from worker threads;
- `apply_clickhouse_migrations`: the `sql/clickhouse/NNNN_*.sql` files plus their ledger.
SQL text, row encoding and error parsing come from `protocols.clickhouse` (pure); this module
only moves bytes and translates failures.

Must not import trio or asyncio (anyio only), the HTTP/gRPC edges, or other storages. chdb is
imported lazily, in a worker thread, by `open_embedded_clickhouse` (~0.3 s and ~290 MB), so a
server using the HTTP transport never loads it.

Invariants:
- Every call takes `timeout_s` and holds to it: an absolute `anyio.fail_after` on our side, and
  `max_execution_time` on the server's side, so an abandoned query stops there too.
- Foreign exceptions (httpx, chdb) leave only as `errors.BackendUnavailable` / `BackendTimeout`
  (could not reach / no answer in time / server overloaded) or `errors.BackendError` (ClickHouse
  rejected the statement; its text in `detail`, its code in `backend_code`), cause chained.
  Cancellation is never caught.
- chdb serves one data directory per process: a second directory is refused with ConfigError.
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import anyio
import anyio.to_thread
import httpx

from mlrun.server.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    MlrunError,
)
from mlrun.server.protocols.clickhouse import (
    TIMEOUT_ERROR_CODES,
    TRANSIENT_ERROR_CODES,
    ClickHouseError,
    HttpRequest,
    auth_headers,
    build_insert_request,
    build_query_request,
    deadline_settings,
    decode_json_each_row,
    find_error_in_body,
    insert_prefix,
    parse_error,
    quote_identifier,
    quote_list,
    with_format,
)
from mlrun.server.storage.migrations import load_migrations

BACKEND: Final = "clickhouse"
_T = TypeVar("_T")

# Awaited cleanup is shielded, and bounded by this.
_CLOSE_TIMEOUT_S: Final = 5.0
# A result is read into memory whole; queries are expected to LIMIT themselves well below this.
_MAX_RESPONSE_BYTES: Final = 256 * 1024 * 1024


class ClickHouse(Protocol):
    """What metrics code needs from ClickHouse, whichever transport carries it."""

    @property
    def backend_name(self) -> str: ...

    @property
    def database(self) -> str: ...

    async def ensure_database(self, *, timeout_s: float) -> None:
        """CREATE DATABASE IF NOT EXISTS for `database` (issued without a current database)."""

    async def execute(self, sql: str, *, timeout_s: float) -> None:
        """Run one statement in `database`, discarding any output."""

    async def query_rows(self, sql: str, *, timeout_s: float) -> list[dict[str, Any]]:
        """Run a SELECT (FORMAT JSONEachRow is appended); Int64/UInt64 come back as int."""

    async def insert_rowbinary(
        self, table: str, columns: Sequence[str], body: bytes, *, timeout_s: float
    ) -> None:
        """Insert RowBinary-encoded rows (see protocols.clickhouse.encode_*) into `table`."""

    async def ping(self, *, timeout_s: float) -> None:
        """Raise BackendUnavailable/BackendTimeout unless ClickHouse answers."""

    async def aclose(self) -> None: ...


def _translate(error: ClickHouseError) -> MlrunError:
    """A ClickHouse error as the error tree sees it: overload and timeouts can be retried, the
    rest is a statement ClickHouse refused (our bug), reported without its text to clients."""
    if error.code in TIMEOUT_ERROR_CODES:
        return BackendTimeout(f"ClickHouse timed out (code {error.code})", backend=BACKEND)
    if error.code in TRANSIENT_ERROR_CODES:
        return BackendUnavailable(
            f"ClickHouse is overloaded or unreachable (code {error.code})", backend=BACKEND
        )
    return BackendError(
        "ClickHouse rejected a statement",
        backend=BACKEND,
        detail=error.message,
        backend_code=error.code,
    )


# =========================================================================== HTTP transport


class HttpClickHouse:
    """A ClickHouse server over HTTP. Build it with `open_http_clickhouse`."""

    backend_name: Final = BACKEND

    def __init__(
        self, client: httpx.AsyncClient, *, database: str, gzip_min_bytes: int | None
    ) -> None:
        self._client = client
        self._database = database
        self._gzip_min_bytes = gzip_min_bytes
        self._closed = False

    @property
    def database(self) -> str:
        return self._database

    async def ensure_database(self, *, timeout_s: float) -> None:
        sql = f"CREATE DATABASE IF NOT EXISTS {quote_identifier(self._database)}"
        request = build_query_request(sql, database=None, settings=deadline_settings(timeout_s))
        await self._post(request, timeout_s=timeout_s)

    async def execute(self, sql: str, *, timeout_s: float) -> None:
        request = build_query_request(
            sql, database=self._database, settings=deadline_settings(timeout_s)
        )
        await self._post(request, timeout_s=timeout_s)

    async def query_rows(self, sql: str, *, timeout_s: float) -> list[dict[str, Any]]:
        request = build_query_request(
            with_format(sql, "JSONEachRow"),
            database=self._database,
            settings=deadline_settings(timeout_s),
        )
        body = await self._post(request, timeout_s=timeout_s)
        try:
            return decode_json_each_row(body)
        except ValueError as exc:
            raise BackendError(
                "ClickHouse returned an unreadable result", backend=BACKEND, detail=str(exc)
            ) from exc

    async def insert_rowbinary(
        self, table: str, columns: Sequence[str], body: bytes, *, timeout_s: float
    ) -> None:
        build = functools.partial(
            build_insert_request,
            table,
            columns,
            body,
            database=self._database,
            settings=deadline_settings(timeout_s),
        )
        if self._gzip_min_bytes is not None and len(body) >= self._gzip_min_bytes:
            # gzip level 1 shrinks metric rows ~3x but runs at ~80 MB/s: off the event loop.
            request = await anyio.to_thread.run_sync(functools.partial(build, gzip_level=1))
        else:
            request = build()
        await self._post(request, timeout_s=timeout_s)

    async def ping(self, *, timeout_s: float) -> None:
        self._check_open()
        try:
            with anyio.fail_after(timeout_s):
                response = await self._client.get("/ping", timeout=timeout_s)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise BackendTimeout("ClickHouse did not answer a ping", backend=BACKEND) from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable("ClickHouse is unreachable", backend=BACKEND) from exc
        if response.status_code != 200 or response.content.strip() != b"Ok.":
            raise BackendUnavailable(
                f"ClickHouse ping answered HTTP {response.status_code}", backend=BACKEND
            )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT_S):
            await self._client.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("the ClickHouse client is closed", backend=BACKEND)

    async def _post(self, request: HttpRequest, *, timeout_s: float) -> bytes:
        """POST one request and return the 200 body, or raise the translated failure."""
        self._check_open()
        try:
            with anyio.fail_after(timeout_s):
                async with self._client.stream(
                    "POST",
                    "/",
                    params=request.params,
                    headers=request.headers,
                    content=request.body,
                    timeout=timeout_s,
                ) as response:
                    body = await self._read_body(response)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise BackendTimeout(
                f"ClickHouse did not answer within {timeout_s} s", backend=BACKEND
            ) from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable("ClickHouse is unreachable", backend=BACKEND) from exc

        if response.status_code == 200:
            streamed_error = find_error_in_body(body)
            if streamed_error is not None:
                raise _translate(streamed_error)
            return body
        text = body.decode("utf-8", errors="replace")
        error = parse_error(text, code_header=response.headers.get("X-ClickHouse-Exception-Code"))
        if error.code is not None:
            raise _translate(error)
        if response.status_code >= 500:  # a proxy or a dying server, not ClickHouse's verdict
            raise BackendUnavailable(
                f"ClickHouse answered HTTP {response.status_code}", backend=BACKEND
            )
        raise BackendError(
            f"ClickHouse answered HTTP {response.status_code}",
            backend=BACKEND,
            detail=text[:2000],
        )

    @staticmethod
    async def _read_body(response: httpx.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > _MAX_RESPONSE_BYTES:
                    raise BackendError(
                        "a ClickHouse result exceeded the size limit",
                        backend=BACKEND,
                        detail=f"more than {_MAX_RESPONSE_BYTES} bytes",
                    )
                chunks.append(chunk)
        except httpx.TransportError as exc:
            # Servers from 25.x break the HTTP framing right after writing a mid-stream
            # exception into the body: the text we already have says what went wrong.
            streamed_error = find_error_in_body(b"".join(chunks))
            if streamed_error is not None:
                raise _translate(streamed_error) from exc
            raise
        return b"".join(chunks)


@contextlib.asynccontextmanager
async def open_http_clickhouse(
    *,
    host: str,
    port: int,
    user: str,
    password: str,
    database: str,
    max_connections: int = 8,
    keepalive_expiry_s: float = 2.0,
    gzip_min_bytes: int | None = None,
) -> AsyncIterator[HttpClickHouse]:
    """A client for a ClickHouse server's HTTP interface; nothing is sent until the first call.

    `keepalive_expiry_s` must stay below the server's keep_alive_timeout (3 s in the packaged
    config), or a request can race the server closing an idle connection. `gzip_min_bytes`
    gzips insert bodies from that size on. Off by default: measured on loopback, 1M metric rows
    in 10k-row batches went ~35% slower with gzip (level 1 makes the body ~3x smaller but
    compresses at ~80 MB/s); it pays only on a slow network.
    """
    url_host = f"[{host}]" if ":" in host else host
    client = httpx.AsyncClient(
        base_url=f"http://{url_host}:{port}",
        headers=auth_headers(user, password),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=keepalive_expiry_s,
        ),
        # Never route a database connection through a proxy picked up from the environment.
        trust_env=False,
    )
    clickhouse = HttpClickHouse(client, database=database, gzip_min_bytes=gzip_min_bytes)
    try:
        yield clickhouse
    finally:
        await clickhouse.aclose()


# =========================================================================== embedded (chdb)

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

    async def insert_rowbinary(
        self, table: str, columns: Sequence[str], body: bytes, *, timeout_s: float
    ) -> None:
        statement = insert_prefix(table, columns)

        def run(slot: _Slot) -> None:
            inserter = slot.session.send_insert(statement, "RowBinary")
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
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT_S + 1.0):
            await anyio.to_thread.run_sync(self._close_sessions, abandon_on_cancel=True)

    def _close_sessions(self) -> None:
        """Close every session once it is idle; a session still busy in an abandoned thread past
        the deadline is left to the garbage collector."""
        deadline = time.monotonic() + _CLOSE_TIMEOUT_S
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
            raise _translate(parse_error(str(exc))) from exc
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


# =========================================================================== migrations

_MIGRATION_TIMEOUT_S: Final = 60.0
_LEDGER_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS schema_migrations"
    " (version UInt32, name String, checksum String, applied_at_ms Int64)"
    " ENGINE = MergeTree ORDER BY version"
)


async def apply_clickhouse_migrations(
    ch: ClickHouse, *, lock: contextlib.AbstractAsyncContextManager[None] | None = None
) -> list[int]:
    """Create `ch.database` if needed, apply the schema versions its ledger lacks, in order, and
    return them. Each version is recorded right after all its statements succeeded, so a crash
    mid-version re-runs that version (its statements are IF NOT EXISTS). `lock` (a PostgreSQL
    advisory lock in the server) serialises servers starting at once.

    Raises ConfigError when a recorded version's checksum differs from its file: released schema
    files never change; a change goes into a new NNNN file.
    """
    migrations = load_migrations("clickhouse")
    async with lock if lock is not None else contextlib.nullcontext():
        await ch.ensure_database(timeout_s=_MIGRATION_TIMEOUT_S)
        await ch.execute(_LEDGER_DDL, timeout_s=_MIGRATION_TIMEOUT_S)
        rows = await ch.query_rows(
            "SELECT version, checksum FROM schema_migrations", timeout_s=_MIGRATION_TIMEOUT_S
        )
        recorded: dict[int, set[str]] = {}
        for row in rows:
            recorded.setdefault(int(row["version"]), set()).add(str(row["checksum"]))
        applied: list[int] = []
        for migration in migrations:
            checksums = recorded.get(migration.version)
            if checksums is not None:
                if checksums != {migration.checksum}:
                    raise ConfigError(
                        f"clickhouse schema {migration.version:04d}_{migration.name}.sql changed"
                        f" after it was applied to database {ch.database!r} (recorded checksum"
                        f" {sorted(checksums)[0][:12]}, file {migration.checksum[:12]}); schema"
                        " files are forward-only: put the change in a new file"
                    )
                continue
            for statement in migration.statements:
                await ch.execute(statement, timeout_s=_MIGRATION_TIMEOUT_S)
            ledger_row = quote_list(
                [migration.version, migration.name, migration.checksum, time.time_ns() // 1_000_000]
            )
            await ch.execute(
                "INSERT INTO schema_migrations (version, name, checksum, applied_at_ms)"
                f" VALUES {ledger_row}",
                timeout_s=_MIGRATION_TIMEOUT_S,
            )
            applied.append(migration.version)
        return applied
