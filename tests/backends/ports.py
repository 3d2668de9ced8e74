"""Free loopback ports for the servers the test session starts (PostgreSQL, ClickHouse, rclone).

Owns: picking a port the kernel reports free, and the rule for the race that comes with it.
The probe socket binds 127.0.0.1:0 and closes, which hands the port back to the kernel before
the server binds it; in that window another process can take it. With pytest-xdist every worker
starts its own servers at the same moment, and every client socket of the suite draws its source
port from the same range, so each backend retries a first start whose log says the address was
in use, on a new port, at most `PORT_ATTEMPTS` times. A restart (`stop()` then `start()`) keeps
its port: clients built before the stop must find the server again.

Must not import mlrun: the fixtures stand apart from the code they test.
"""

from __future__ import annotations

import socket

PORT_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def address_was_in_use(log_text: str) -> bool:
    """The server's start-up log says its port was taken (PostgreSQL writes `Address already in
    use`, rclone `address already in use`, ClickHouse `Address already in use`)."""
    return "address already in use" in log_text.lower()
