"""ClickHouse storage: the `ClickHouse` protocol every metrics reader and writer codes against,
and the one translation of ClickHouse's errors into the error tree that both transports share.

The transports that implement the protocol: `storage.clickhouse.http_client` (a ClickHouse
server over its HTTP interface) and `storage.clickhouse.embedded` (chdb, in-process). The
schema applier is `storage.clickhouse.migrations`; the read path's SQL is
`storage.clickhouse.metric_reads`.

Must not import a transport (httpx, chdb), trio or asyncio, the HTTP/gRPC edges, or other
storages: code that takes a `ClickHouse` must not load what it does not use.

Invariants (every implementation holds to them):
- Every call takes `timeout_s` and holds to it: an absolute `anyio.fail_after` on our side, and
  `max_execution_time` on the server's side, so an abandoned query stops there too.
- Foreign exceptions (httpx, chdb) leave only as `errors.BackendUnavailable` / `BackendTimeout`
  (could not reach / no answer in time / server overloaded) or `errors.BackendError` (ClickHouse
  rejected the statement; its text in `detail`, its code in `backend_code`), cause chained.
  Cancellation is never caught.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol

from mlrun.server.errors import BackendError, BackendTimeout, BackendUnavailable, MlrunError
from mlrun.server.protocols.clickhouse import (
    TIMEOUT_ERROR_CODES,
    TRANSIENT_ERROR_CODES,
    ClickHouseError,
    RowBinaryType,
)

BACKEND: Final = "clickhouse"

# Awaited cleanup is shielded, and bounded by this.
CLOSE_TIMEOUT_S: Final = 5.0


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

    async def query_row_binary(
        self, sql: str, types: Sequence[RowBinaryType], *, timeout_s: float
    ) -> list[list[Any]]:
        """Run a SELECT whose columns have exactly `types` (FORMAT RowBinary is appended);
        rows as lists (`protocols.clickhouse.decode_row_binary`). For large numeric arrays:
        they decode without a parsed number per element."""

    async def insert_rowbinary(
        self, table: str, columns: Sequence[str], body: bytes, *, timeout_s: float
    ) -> None:
        """Insert RowBinary-encoded rows (see protocols.clickhouse.encode_*) into `table`."""

    async def insert_native(
        self, table: str, columns: Sequence[str], body: bytes, *, timeout_s: float
    ) -> None:
        """Insert Native blocks (protocols.clickhouse.encode_metric_block) into `table`."""

    async def ping(self, *, timeout_s: float) -> None:
        """Raise BackendUnavailable/BackendTimeout unless ClickHouse answers."""

    async def aclose(self) -> None: ...


def translate_error(error: ClickHouseError) -> MlrunError:
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
