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

    def block_step_counts(self, where: str) -> dict[str, int]:
        """Distinct steps per metric name as the block rollups hold them (the popcounts of each
        block's step masks, summed; the distinct count every read reports), for `metric_blocks`
        rows matching `where`."""
        counts: dict[str, int] = {}
        for row in self.rows(
                "SELECT name, block, groupBitOrMerge(steps_low) AS low,"
                " groupBitOrMerge(steps_high) AS high"
                f" FROM metric_blocks WHERE {where} GROUP BY name, block"):
            bits = bin(int(row["low"])).count("1") + bin(int(row["high"])).count("1")
            counts[row["name"]] = counts.get(row["name"], 0) + bits
        return counts
