"""Header and metadata normalisation shared by the HTTP and gRPC edges.

Must not import anything of the server beyond the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable


def joined_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased names; a repeated header's values joined by ", " as RFC 9110 allows, so no
    value silently replaces another (the credential check refuses a repeated one)."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers
