"""Reading back what a test's server stored, straight from the backends (never through the
server under test), so a test checks storage rather than the server's own account of it.
Must not import the mlrun package."""

from __future__ import annotations

from typing import Any

import httpx


class ClickHouseReader:
    """Counts what a test's server stored, straight from ClickHouse."""

    def __init__(self, server: Any, database: str) -> None:
        self._url = f"http://{server.host}:{server.port}/"
        self._database = database
        self._headers = {"X-ClickHouse-User": server.user, "X-ClickHouse-Key": server.password}

    def rows(self, sql: str) -> list[dict[str, Any]]:
        response = httpx.post(self._url, params={"database": self._database},
                              content=f"{sql} FORMAT JSONEachRow", headers=self._headers,
                              timeout=30)
        response.raise_for_status()
        return [httpx.Response(200, content=line).json()
                for line in response.text.splitlines() if line]

    def scalar(self, sql: str) -> Any:
        (row,) = self.rows(sql)
        (value,) = row.values()
        return value
