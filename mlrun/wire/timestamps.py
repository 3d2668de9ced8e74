"""How instants appear in answers: ISO-8601 UTC with milliseconds and a `Z` suffix
(`2026-12-03T10:15:00.000Z`), one formatter for every answer of the server.

Must not import the server or the SDK.
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
