"""Stopping a test backend's child process (ClickHouse, Redis): shared by their wrappers.

Owns only the stop sequence; each wrapper keeps its own start, readiness and freeze state.
"""

from __future__ import annotations

import os
import signal
import subprocess


def terminate_child(process: subprocess.Popen[bytes], *, frozen: bool, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; a frozen (SIGSTOPped) child is continued first,
    since a stopped process never sees SIGTERM."""
    if process.poll() is not None:
        return
    if frozen:
        os.kill(process.pid, signal.SIGCONT)
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)
