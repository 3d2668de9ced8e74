"""ClickHouse straight from the bench, bypassing the server: direct inserts and counting back.

Owns: one blocking connection per writer thread to the server's ClickHouse — a clickhouse-server
over HTTP (`http.client`, keep-alive) or, for a server on the embedded default, chdb on the
server's data directory once that server has stopped (chdb serves a directory to one process);
the RowBinary insert into `metrics` (or another table with its columns: the plain-MergeTree
reference of `bench.reference`), a DDL statement; and `count_points`, which reads back how many
rows and how many distinct (run, name, step) a set of runs holds.

SQL, insert requests, row encoding and error parsing come from `mlrun.server.protocols.
clickhouse` (pure), so the baseline sends exactly the bytes the server's writer would.
ClickHouse failures leave as `StoreError` (a short `kind`, whether a retry can help, the
server's text in `detail`); credentials never appear in URLs or messages.

Must not import anyio or the server's storage layer: the baseline measures ClickHouse, not
the server's client of it.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mlrun.server.protocols.clickhouse import (
    METRIC_COLUMNS,
    TRANSIENT_ERROR_CODES,
    ClickHouseError,
    auth_headers,
    build_insert_request,
    build_query_request,
    decode_json_each_row,
    find_error_in_body,
    parse_error,
    quote_identifier,
    quote_list,
    with_format,
)

METRICS_TABLE = "metrics"


class StoreError(Exception):
    def __init__(self, kind: str, *, retryable: bool, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.retryable = retryable
        self.detail = detail


def _error_from(error: ClickHouseError) -> StoreError:
    return StoreError(
        f"clickhouse {error.code}",
        retryable=error.code in TRANSIENT_ERROR_CODES,
        detail=error.message[:300],
    )


@dataclass(frozen=True, slots=True)
class StoredCount:
    rows: int  # raw rows, replaced duplicates included until ClickHouse merges them
    distinct_points: int  # distinct (run_id, name, step): what every query sees


class MetricsConnection(Protocol):
    """One thread's connection to the metrics database."""

    def insert_metrics(self, rowbinary: bytes, table: str = METRICS_TABLE) -> None: ...

    def query_rows(self, sql: str) -> list[dict[str, Any]]: ...

    def execute(self, sql: str) -> None: ...

    def close(self) -> None: ...


class MetricsStore(Protocol):
    """Where a workload's points land; hands out one connection per thread."""

    def connect(self) -> MetricsConnection: ...

    def describe(self) -> str: ...


def count_points(connection: MetricsConnection, run_ids: Sequence[str],
                 table: str = METRICS_TABLE) -> StoredCount:
    """Rows and distinct (run, name, step) of `run_ids` in `table` (portable to 18.16: no
    multi-argument uniqExact, a GROUP BY subquery instead)."""
    if not run_ids:
        return StoredCount(rows=0, distinct_points=0)
    sql = (
        "SELECT count() AS distinct_points, sum(copies) AS rows FROM ("
        f" SELECT count() AS copies FROM {quote_identifier(table)}"
        f" WHERE run_id IN {quote_list(run_ids)} GROUP BY run_id, name, step)"
    )
    (row,) = connection.query_rows(sql)
    return StoredCount(rows=int(row["rows"] or 0), distinct_points=int(row["distinct_points"]))


# --------------------------------------------------------------------------- clickhouse-server


@dataclass(frozen=True, slots=True)
class ClickHouseServerStore:
    """A clickhouse-server's HTTP interface and the database the MLRun server writes to."""

    host: str
    port: int
    user: str
    password: str
    database: str
    timeout_s: float = 30.0

    def connect(self) -> ClickHouseHttpConnection:
        return ClickHouseHttpConnection(self)

    def describe(self) -> str:
        return f"clickhouse-server http://{self.host}:{self.port} database {self.database}"


class ClickHouseHttpConnection:
    """A keep-alive HTTP connection (not shared between threads). A broken connection is
    closed and reopened by the next request; the failed request is the caller's to retry."""

    def __init__(self, store: ClickHouseServerStore) -> None:
        self._store = store
        self._headers = auth_headers(store.user, store.password)
        self._connection = http.client.HTTPConnection(
            store.host, store.port, timeout=store.timeout_s
        )

    def insert_metrics(self, rowbinary: bytes, table: str = METRICS_TABLE) -> None:
        request = build_insert_request(
            table, METRIC_COLUMNS, rowbinary, database=self._store.database
        )
        status, body = self._post(request.params, request.body)
        if status != 200:
            raise _error_from(parse_error(body.decode("utf-8", errors="replace")))

    def execute(self, sql: str) -> None:
        request = build_query_request(sql, database=self._store.database)
        status, body = self._post(request.params, request.body)
        if status != 200:
            raise _error_from(parse_error(body.decode("utf-8", errors="replace")))

    def query_rows(self, sql: str) -> list[dict[str, Any]]:
        request = build_query_request(
            with_format(sql, "JSONEachRow"), database=self._store.database
        )
        status, body = self._post(request.params, request.body)
        if status != 200:
            raise _error_from(parse_error(body.decode("utf-8", errors="replace")))
        late_error = find_error_in_body(body)
        if late_error is not None:
            raise _error_from(late_error)
        return decode_json_each_row(body)

    def close(self) -> None:
        self._connection.close()

    def _post(self, params: Sequence[tuple[str, str]], body: bytes) -> tuple[int, bytes]:
        path = "/?" + urllib.parse.urlencode(params)
        try:
            self._connection.request("POST", path, body=body, headers=self._headers)
            response = self._connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._connection.close()  # the next request opens a fresh connection
            raise StoreError(type(exc).__name__, retryable=True, detail=str(exc)) from exc


# --------------------------------------------------------------------------- chdb


class ChdbStore:
    """chdb on the data directory of a stopped embedded-default server (`<data dir>/clickhouse`,
    as the server lays it out). chdb is imported on first use (~0.4 s, ~290 MB)."""

    def __init__(self, data_dir: Path, database: str) -> None:
        self.data_dir = data_dir
        self.database = database
        self._lock = threading.Lock()  # opening sessions concurrently is not worth the risk

    def connect(self) -> ChdbConnection:
        with self._lock:
            from chdb.session import Session

            session = Session(str(self.data_dir))  # type: ignore[no-untyped-call]
        return ChdbConnection(session, self.database)

    def describe(self) -> str:
        return f"chdb {self.data_dir} database {self.database}"


class ChdbConnection:
    """One chdb session (a session runs one statement at a time)."""

    def __init__(self, session: Any, database: str) -> None:
        self._session = session
        self._database = database
        self._run(f"USE {quote_identifier(database)}")

    def insert_metrics(self, rowbinary: bytes, table: str = METRICS_TABLE) -> None:
        statement = (
            f"INSERT INTO {quote_identifier(self._database)}.{quote_identifier(table)} "
            f"({', '.join(quote_identifier(column) for column in METRIC_COLUMNS)})"
        )
        try:
            inserter = self._session.send_insert(statement, "RowBinary")
            try:
                inserter.append(rowbinary)
                inserter.finish()
            except BaseException:
                inserter.cancel()  # frees the session for the next statement
                raise
        except RuntimeError as exc:  # chdb's errors are RuntimeErrors
            raise _error_from(parse_error(str(exc))) from exc

    def query_rows(self, sql: str) -> list[dict[str, Any]]:
        return decode_json_each_row(self._run(with_format(sql, "JSONEachRow")))

    def execute(self, sql: str) -> None:
        self._run(sql)

    def close(self) -> None:
        self._session.close()

    def _run(self, sql: str) -> bytes:
        try:
            result: bytes = self._session.query(sql, "JSONEachRow").bytes()
        except RuntimeError as exc:
            raise _error_from(parse_error(str(exc))) from exc
        return result
