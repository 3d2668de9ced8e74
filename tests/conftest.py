"""Session-wide test wiring: real backends started on free loopback ports (see tests/backends/).

Each backend module starts its server under a temp dir on a free port and stops it by PID at
session end. Never mock a database here; fakes belong only where a fault is injected on cue.
"""

from __future__ import annotations

pytest_plugins = [
    "backends.postgres",
    "backends.clickhouse",
    "backends.s3",
]
