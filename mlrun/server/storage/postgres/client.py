"""The PostgreSQL metadata client: a psycopg 3 connection pool driven from worker threads.

Owns: the pool's lifetime (`open_postgres`), running one transaction per call in a worker thread
(`Postgres.run`), readiness (`ping`), session advisory locks (`advisory_lock`) and the schema
migrations applier for `sql/postgres/` (`apply_postgres_migrations`).

Must not import: trio or asyncio (anyio only), psycopg's async classes (`AsyncConnection` does
not run on trio, psycopg issue #29), or anything of the server above storage except `errors`
and `migrations`.

Invariants:
- Every psycopg call happens in a worker thread, bounded by a CapacityLimiter sized to the pool;
  the event loop never blocks on the network.
- Every call has a deadline: the pool wait, `statement_timeout` (server side) and the caller's
  `timeout_s` (client side) all derive from one `timeout_s`.
- A worker thread is never abandoned while it uses a connection: when the calling task is
  cancelled (or its deadline passes), the running statement is cancelled on the server
  (`cancel_safe`, re-sent until the thread finishes, because a cancel request that lands between
  two statements is ignored by PostgreSQL), the transaction is rolled back, and only then does
  the cancellation propagate.
- Foreign exceptions are translated here (cause chained): no connection / lost connection ->
  BackendUnavailable, statement or lock timeout -> BackendTimeout, any other driver error ->
  BackendError with the driver text only in `detail`. Exceptions raised by `fn` itself that are
  not driver errors (errors.MlrunError, ConfigError, bugs) pass through unchanged.
- `open_postgres` does not wait for a first connection: the server starts (and its health
  endpoints answer) while PostgreSQL is down; readiness is `ping()`.
- Pooled connections are in autocommit mode outside `run`, so a connection in the pool is never
  inside a transaction; `run` opens and closes its own transaction explicitly.
"""

from __future__ import annotations

import logging
import math
import select
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, cast

import anyio
import anyio.to_thread
import psycopg
import psycopg.errors
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from mlrun.server import errors
from mlrun.server.storage.migrations import load_migrations

T = TypeVar("T")

BACKEND = "postgres"
_log = logging.getLogger(__name__)

# Key of the transaction-level advisory lock that serialises schema migrations across servers
# ("mlrun" in ASCII, then 1). Other advisory-lock users must pick different keys.
MIGRATIONS_LOCK_KEY = 0x6D6C72756E_0001

# A failing reconnection attempt backs off 1, 2, 4 ... s; giving up after this window and
# restarting on demand keeps the gap between attempts (and so the time to notice that the
# server is back) at a few seconds instead of minutes.
_RECONNECT_WINDOW_S = 10.0
# How long `cancel_safe` may take to deliver one cancel request, how often it is re-sent while
# the worker thread has not finished, and the total time spent cancelling before giving up
# (statement_timeout then remains the backstop).
_CANCEL_REQUEST_TIMEOUT_S = 2.0
_CANCEL_RESEND_S = 0.5
_CANCEL_BUDGET_S = 10.0
_CLOSE_TIMEOUT_S = 5.0
_RELEASE_TIMEOUT_S = 5.0
# TCP keepalive / user timeout: bound how long a statement can hang on a dead network path
# (libpq has no client-side statement timeout; these are ignored on unix sockets).
_SOCKET_DEFAULTS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 15,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "application_name": "mlrun-server",
}


@dataclass(frozen=True, slots=True)
class PostgresStatistics:
    pool_max: int
    pool_size: int
    pool_available: int
    requests_waiting: int


class _Abandoned(Exception):
    """The caller went away (cancelled or out of time) before the transaction could commit."""


@dataclass(frozen=True, slots=True)
class _Outcome(Generic[T]):
    value: T | None = None
    error: Exception | None = None


class _Borrow:
    """One call's hold on a pooled connection, shared between its worker thread and the task
    that may have to cancel its statement from another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self.abandoned = False
        self._started = False
        self.finished = threading.Event()  # set by the worker thread as its very last step

    def begin(self) -> bool:
        """Worker thread, first step: False when the caller gave up before the thread started
        (then it must do nothing: nobody waits for it)."""
        with self._lock:
            if self.abandoned:
                return False
            self._started = True
            return True

    def give_up_unless_started(self) -> bool:
        """The cancelled caller: True when the thread has not started (a cancelled thread hop
        may never run it), which then never will do anything; False when it is running."""
        with self._lock:
            if self._started:
                return False
            self.abandoned = True
            return True

    def attach(self, conn: psycopg.Connection[Any]) -> bool:
        with self._lock:
            if self.abandoned:
                return False
            self._conn = conn
            return True

    def detach(self) -> None:
        # Taking the lock waits out a cancel in flight, so a cancel request can never hit the
        # statement of whoever borrows this connection next.
        with self._lock:
            self._conn = None

    def cancel_statement(self) -> None:
        """Blocking (helper thread): mark abandoned and cancel whatever statement is running."""
        with self._lock:
            self.abandoned = True
            conn = self._conn
            if conn is None or conn.closed:
                return
            try:
                conn.cancel_safe(timeout=_CANCEL_REQUEST_TIMEOUT_S)
            except psycopg.Error as exc:
                _log.warning("could not cancel a PostgreSQL statement: %s", exc)


class _StaleConnectionCheck:
    """Pool checkout check: only a connection with unread input is probed with a round trip.

    An idle connection has nothing to read unless the server closed it (shutdown, restart,
    terminated backend). When the probe fails, every idle sibling is stale too (a restart closes
    them all), so the pool is drained at once instead of discovering them one by one with the
    pool's 1-2-4 s back-off between checkout attempts."""

    def __init__(self) -> None:
        self.pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None

    def __call__(self, conn: psycopg.Connection[Any]) -> None:
        if not _has_unread_input(conn):
            return
        try:
            psycopg_pool.ConnectionPool.check_connection(conn)
        except psycopg.Error:
            if self.pool is not None:
                self.pool.drain()
            raise


def _has_unread_input(conn: psycopg.Connection[Any]) -> bool:
    try:
        fd = conn.fileno()
    except psycopg.Error:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


class Postgres:
    """The metadata database. Get one from `open_postgres`."""

    backend_name: ClassVar[str] = BACKEND

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]],
        limiter: anyio.CapacityLimiter,
    ) -> None:
        self._pool = pool
        self._limiter = limiter
        # For thread hops whose bound is already held (`_limiter`, taken by `_call` itself):
        # anyio's default limiter (40 threads) must not add a second queue.
        self._unlimited = anyio.CapacityLimiter(math.inf)
        # The session statement_timeout each connection was last given by `run_statement`
        # (a connection the pool replaced drops out on its own).
        self._session_timeouts: weakref.WeakKeyDictionary[psycopg.Connection[Any], int] = (
            weakref.WeakKeyDictionary())
        self._session_timeouts_lock = threading.Lock()

    @property
    def max_connections(self) -> int:
        """Connections the pool may open (and worker threads that may use them at once)."""
        return int(self._limiter.total_tokens)

    async def run(
        self, fn: Callable[[psycopg.Connection[Any]], T], *, timeout_s: float = 10.0
    ) -> T:
        """Run `fn(conn)` in a worker thread inside one transaction and return its result.

        Commits when `fn` returns, rolls back when it raises or when the caller is cancelled or
        out of time before the commit. `fn` runs in a worker thread: it must not touch the event
        loop, and must not commit or roll back itself. To recover from an expected error (a
        unique violation, say), catch it inside a nested `with conn.transaction():` (a
        savepoint); an uncaught driver error becomes errors.BackendError (cause chained).
        Every statement, including the wait for a pooled connection, must finish within
        `timeout_s`, else errors.BackendTimeout (or BackendUnavailable when no connection could
        be had at all)."""
        return await self._call(lambda borrow: self._transaction(fn, borrow, timeout_s), timeout_s)

    async def run_statement(
        self, fn: Callable[[psycopg.Connection[Any]], T], *, timeout_s: float = 10.0
    ) -> T:
        """Like `run`, for an `fn` that runs ONE statement (a read, or one atomic write): in
        autocommit, so the statement is its own transaction, with no BEGIN and no COMMIT round
        trip (1 round trip instead of 3: ~0.3 ms less per call on loopback). Its
        `statement_timeout` is the connection's session value, set to `timeout_s` only when the
        connection's last one differs (it bounds each statement; the whole call is still
        bounded by `timeout_s`). Reads of a few statements that need no common snapshot may use
        it too, each statement its own transaction. An `fn` that must see one snapshot across
        statements, or write more than once, uses `run`."""
        return await self._call(lambda borrow: self._statement(fn, borrow, timeout_s), timeout_s)

    async def ping(self, *, timeout_s: float) -> None:
        """Raise errors.BackendUnavailable unless PostgreSQL answers a query within `timeout_s`."""
        await self.run(_select_one, timeout_s=timeout_s)

    @asynccontextmanager
    async def advisory_lock(self, key: int, *, timeout_s: float) -> AsyncIterator[None]:
        """Hold the session-level `pg_advisory_lock(key)` for the duration of the block.

        The lock lives on a dedicated pooled connection held for the whole block (so the pool
        has one connection fewer meanwhile). Waiting longer than `timeout_s` raises
        errors.BackendTimeout. On exit, also on cancellation, the lock is released and the
        connection returned (shielded, bounded); if the unlock fails the connection is closed,
        which ends the session and so releases the lock too."""
        held: list[psycopg.Connection[Any]] = []
        try:
            await self._call(lambda borrow: self._lock(key, borrow, timeout_s, held), timeout_s)
        except BaseException:
            # The thread may have got the lock just as we were cancelled.
            if held:
                await self._release(held[0], key)
            raise
        try:
            yield
        finally:
            await self._release(held[0], key)

    def statistics(self) -> PostgresStatistics:
        stats = self._pool.get_stats()
        return PostgresStatistics(
            pool_max=stats.get("pool_max", 0),
            pool_size=stats.get("pool_size", 0),
            pool_available=stats.get("pool_available", 0),
            requests_waiting=stats.get("requests_waiting", 0),
        )

    async def _call(self, work: Callable[[_Borrow], T], timeout_s: float) -> T:
        """Run `work` in a worker thread; cancel its statement if we are cancelled meanwhile.

        The worker thread reports into `outcomes` and `borrow.finished` itself, so the awaiting
        task needs no helper task to notice a cancellation (a task group and a watcher task per
        call cost ~0.1 ms of CPU on every PostgreSQL call): it awaits the thread abandonably,
        and when cancelled it cancels the statement and then waits, shielded, until the thread
        has really finished before the cancellation goes on. So the thread is never left
        running with a connection, and the limiter's token (held here, not by the thread hop)
        is given back only then."""
        borrow = _Borrow()
        outcomes: list[_Outcome[T]] = []
        with anyio.move_on_after(timeout_s):
            async with self._limiter:
                try:
                    await anyio.to_thread.run_sync(
                        _capture_into, work, borrow, outcomes, limiter=self._unlimited,
                        abandon_on_cancel=True)
                except anyio.get_cancelled_exc_class():
                    await _cancel_and_wait(borrow, self._unlimited)
                    raise
        if not outcomes:
            raise errors.BackendTimeout(
                f"no PostgreSQL worker free within {timeout_s:g} s", backend=BACKEND
            )
        # Past our own deadline the thread's real outcome still wins: a commit that made it is
        # reported as a success, a statement we cancelled as a timeout.
        outcome = outcomes[0]
        if outcome.error is not None:
            translated = _translate(outcome.error, timeout_s)
            if translated is outcome.error:
                raise translated
            raise translated from outcome.error
        return cast(T, outcome.value)

    def _transaction(
        self, fn: Callable[[psycopg.Connection[Any]], T], borrow: _Borrow, timeout_s: float
    ) -> T:
        """Blocking (worker thread): check out a connection and run `fn` in one transaction."""
        deadline = time.monotonic() + timeout_s
        with self._pool.connection(timeout=timeout_s) as conn:
            if not borrow.attach(conn):
                raise _Abandoned()
            try:
                remaining_ms = max(1, math.ceil((deadline - time.monotonic()) * 1000))
                try:
                    # One round trip: no parameters, so psycopg uses the simple query protocol,
                    # which accepts several statements. SET LOCAL ends with the transaction.
                    conn.execute(f"BEGIN; SET LOCAL statement_timeout = {remaining_ms}")
                    result = fn(conn)
                    if borrow.abandoned:
                        raise _Abandoned()
                    if conn.info.transaction_status == TransactionStatus.INERROR:
                        # COMMIT of a failed transaction silently rolls back: never report
                        # that as a success.
                        raise errors.BackendError(
                            "PostgreSQL transaction failed",
                            backend=BACKEND,
                            detail="fn caught a statement error outside a savepoint",
                        )
                    conn.commit()
                except BaseException:
                    if not conn.broken:
                        try:
                            conn.rollback()
                        except psycopg.Error as exc:
                            _log.warning("PostgreSQL rollback failed: %s", exc)
                    raise
            finally:
                borrow.detach()
        return result

    def _statement(
        self, fn: Callable[[psycopg.Connection[Any]], T], borrow: _Borrow, timeout_s: float
    ) -> T:
        """Blocking (worker thread): check out a connection and run `fn` in autocommit."""
        timeout_ms = max(1, math.ceil(timeout_s * 1000))
        with self._pool.connection(timeout=timeout_s) as conn:
            if not borrow.attach(conn):
                raise _Abandoned()
            try:
                with self._session_timeouts_lock:
                    current = self._session_timeouts.pop(conn, None)  # unknown until SET ends
                if current != timeout_ms:
                    conn.execute(f"SET statement_timeout = {timeout_ms}")
                with self._session_timeouts_lock:
                    self._session_timeouts[conn] = timeout_ms
                return fn(conn)
            finally:
                borrow.detach()

    def _lock(
        self, key: int, borrow: _Borrow, timeout_s: float, held: list[psycopg.Connection[Any]]
    ) -> None:
        """Blocking (worker thread): take `pg_advisory_lock(key)` on a connection kept out of
        the pool; on success the connection is appended to `held`."""
        conn = self._pool.getconn(timeout=timeout_s)
        try:
            if not borrow.attach(conn):
                raise _Abandoned()
            try:
                timeout_ms = max(1, math.ceil(timeout_s * 1000))
                # A session-level lock survives the end of the transaction it was taken in;
                # the transaction only scopes the statement_timeout of the wait.
                with conn.transaction():
                    conn.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
                    conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            finally:
                borrow.detach()
        except BaseException:
            self._pool.putconn(conn)
            raise
        held.append(conn)
        if borrow.abandoned:
            raise _Abandoned()  # the awaiting side sees `held` and releases it

    async def _release(self, conn: psycopg.Connection[Any], key: int) -> None:
        # Shielded and bounded: the unlock cannot be skipped by a cancellation, and a release
        # stuck on a dead network is abandoned to its thread (which still returns the
        # connection once libpq gives up).
        with anyio.move_on_after(_RELEASE_TIMEOUT_S, shield=True):
            await anyio.to_thread.run_sync(
                self._unlock_and_return, conn, key, abandon_on_cancel=True
            )

    def _unlock_and_return(self, conn: psycopg.Connection[Any], key: int) -> None:
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except psycopg.Error as exc:
            _log.warning("advisory unlock failed, closing the session instead: %s", exc)
            conn.close()
        finally:
            self._pool.putconn(conn)


def open_postgres(
    dsn: str, *, max_connections: int = 8, connect_timeout_s: float = 5.0
) -> AbstractAsyncContextManager[Postgres]:
    """Open a pool of at most `max_connections` connections to `dsn`; close it on exit.

    Does not wait for a first connection (see the module invariants); connections are made in
    the background and on demand, each attempt bounded by `connect_timeout_s`. A DSN that does
    not parse is an errors.ConfigError."""
    if max_connections < 1:
        raise ValueError("max_connections must be at least 1")
    if connect_timeout_s <= 0:
        raise ValueError("connect_timeout_s must be positive")
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise errors.ConfigError("DATABASE_URL is not a valid PostgreSQL DSN") from exc
    defaults = dict(_SOCKET_DEFAULTS, connect_timeout=max(2, math.ceil(connect_timeout_s)))
    kwargs: dict[str, Any] = {k: v for k, v in defaults.items() if k not in params}
    kwargs["autocommit"] = True
    return _open_postgres(dsn, kwargs, max_connections)


@asynccontextmanager
async def _open_postgres(
    dsn: str, kwargs: dict[str, Any], max_connections: int
) -> AsyncIterator[Postgres]:
    check = _StaleConnectionCheck()
    pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
        dsn,
        kwargs=kwargs,
        min_size=min(2, max_connections),
        max_size=max_connections,
        open=False,
        check=check,
        name="mlrun-postgres",
        reconnect_timeout=_RECONNECT_WINDOW_S,
    )
    check.pool = pool
    # open() starts the pool's own threads; wait=False: connecting happens in the background.
    await anyio.to_thread.run_sync(pool.open)
    try:
        yield Postgres(pool, anyio.CapacityLimiter(max_connections))
    finally:
        with anyio.CancelScope(shield=True):
            # Bounded by close()'s own timeout for the pool's threads.
            await anyio.to_thread.run_sync(lambda: pool.close(timeout=_CLOSE_TIMEOUT_S))


async def apply_postgres_migrations(pg: Postgres, *, timeout_s: float = 60.0) -> list[int]:
    """Apply the pending `sql/postgres/NNNN_*.sql` files; return the versions applied.

    Everything happens in one transaction under a transaction-level advisory lock, so servers
    starting at once against one database serialise here: the first applies, the others then
    find every version in the ledger and apply nothing. A ledger checksum that differs from
    its file stops start-up with errors.ConfigError (released files never change)."""
    migrations = await anyio.to_thread.run_sync(load_migrations, "postgres")

    def apply(conn: psycopg.Connection[Any]) -> list[int]:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATIONS_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY,"
            " name text NOT NULL,"
            " checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        recorded = {
            version: (name, checksum)
            for version, name, checksum in conn.execute(
                "SELECT version, name, checksum FROM schema_migrations"
            )
        }
        applied: list[int] = []
        for migration in migrations:
            if migration.version in recorded:
                name, checksum = recorded[migration.version]
                if checksum != migration.checksum:
                    raise errors.ConfigError(
                        f"sql/postgres/{migration.version:04d}_{migration.name}.sql differs from"
                        f" the version applied to the database ({name}, sha256 {checksum[:12]}):"
                        " released schema files must not change; add a new file instead"
                    )
                continue
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied.append(migration.version)
        unknown = sorted(set(recorded) - {m.version for m in migrations})
        if unknown:
            _log.warning("database has schema versions this server does not know: %s", unknown)
        return applied

    return await pg.run(apply, timeout_s=timeout_s)


async def _cancel_and_wait(borrow: _Borrow, unlimited: anyio.CapacityLimiter) -> None:
    """The caller was cancelled while its worker thread may still run: cancel the statement
    (re-sent every `_CANCEL_RESEND_S` for at most `_CANCEL_BUDGET_S`), then wait, shielded, for
    the thread to finish (statement_timeout is the backstop after the budget)."""
    if borrow.give_up_unless_started():
        return
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(_CANCEL_BUDGET_S):
            while not borrow.finished.is_set():
                await anyio.to_thread.run_sync(borrow.cancel_statement, abandon_on_cancel=True)
                await anyio.to_thread.run_sync(borrow.finished.wait, _CANCEL_RESEND_S,
                                               abandon_on_cancel=True)
        if not borrow.finished.is_set():
            await anyio.to_thread.run_sync(borrow.finished.wait, limiter=unlimited)


def _capture_into(work: Callable[[_Borrow], T], borrow: _Borrow,
                  outcomes: list[_Outcome[T]]) -> None:
    """Worker thread: run `work`, append its outcome (a value or the exception), then mark the
    borrow finished. The outcome is there even when the awaiting task stopped waiting."""
    if not borrow.begin():
        return
    try:
        try:
            outcomes.append(_Outcome(value=work(borrow)))
        except Exception as exc:
            outcomes.append(_Outcome(error=exc))
    finally:
        borrow.finished.set()



def _translate(exc: Exception, timeout_s: float) -> Exception:
    if isinstance(exc, _Abandoned):
        return errors.BackendTimeout(
            f"PostgreSQL did not finish within {timeout_s:g} s", backend=BACKEND
        )
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return errors.BackendUnavailable(
            f"no PostgreSQL connection within {timeout_s:g} s", backend=BACKEND
        )
    if isinstance(exc, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
        return errors.BackendTimeout(
            f"PostgreSQL did not finish within {timeout_s:g} s", backend=BACKEND
        )
    if isinstance(exc, psycopg.OperationalError):
        # Connection refused or lost, server shutting down, pool closed, out of resources.
        return errors.BackendUnavailable("PostgreSQL is unavailable", backend=BACKEND)
    if isinstance(exc, psycopg.Error):
        return errors.BackendError(
            "PostgreSQL rejected a statement",
            backend=BACKEND,
            detail=f"{exc.sqlstate or '-'}: {exc}",
        )
    return exc


def _select_one(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT 1")
