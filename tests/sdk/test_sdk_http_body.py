"""The HTTP transport compresses request bodies except to a server on this machine: which hosts
count as loopback."""

from __future__ import annotations

import pytest

from mlrun.sdk.transport_http import is_loopback


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:3001", True),
        ("http://127.8.9.10", True),
        ("http://[::1]:3001", True),
        ("http://localhost:3001", True),
        ("https://LOCALHOST", True),
        ("http://api.localhost:8080", True),
        ("http://10.0.0.5:3001", False),
        ("https://tracker.internal", False),
        ("http://[2001:db8::1]:3001", False),
        ("http://localhost.example.com", False),
    ],
)
def test_loopback_hosts_get_uncompressed_bodies(url: str, loopback: bool) -> None:
    assert is_loopback(url) is loopback
