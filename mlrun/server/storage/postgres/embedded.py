"""The embedded metadata default: PostgreSQL 16 from the `pgserver` wheel, data under the data dir.

Owns: starting pgserver on `<data_dir>/postgres` in a worker thread, handing out its DSN (a unix
socket inside that directory, no TCP port), and stopping postgres on exit while keeping the data.

Must not import: the rest of the server beyond `errors`; trio or asyncio. `pgserver` is imported
lazily, in the worker thread, so a production install (DATABASE_URL set) never needs the wheel.

Invariants:
- pgserver runs with cleanup_mode="stop": the last handle to close stops postgres and keeps the
  data ("delete" would remove the directory, None would leave postgres running after we exit).
- As root, pgserver runs postgres as a system user `pgserver` (it creates it with useradd) and,
  measured with pgserver 0.1.4, silently chmods g+rx,o+rx every ancestor of the data dir and of
  its own binaries up to `/` so that user can reach them (a mode-700 /root or
  /tmp/pytest-of-root becomes 755). We refuse instead of widening permissions: a directory other
  users cannot traverse is a ConfigError naming MLRUN_DATA_DIR, raised before pgserver runs.
- pgserver counts handles per data dir in `.handle_pids.json` and stops postgres only when the
  last one closes. A process killed with SIGKILL leaves its pid there, after which postgres would
  never be stopped again; dead pids are pruned (under pgserver's own lock) before each start.
- One open per data dir per process: pgserver caches servers by path, so a second handle in the
  same process would share, and be stopped by, the first one's exit.

Measured on the 2-core test machine: first start (pgserver import + initdb + start) ~1.0 s, a
start on existing data ~0.12 s, stop ~0.1 s.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from mlrun.server import errors

_PGDATA_NAME = "postgres"
_open_data_dirs: set[Path] = set()


@asynccontextmanager
async def open_embedded_postgres(data_dir: Path) -> AsyncIterator[str]:
    """Start (or attach to) the embedded PostgreSQL under `data_dir` and yield its DSN.

    Raises errors.ConfigError (one line, naming MLRUN_DATA_DIR) when the directory is unusable
    or postgres fails to start. On exit postgres is stopped, shielded from cancellation; the stop
    is bounded by pg_ctl's own wait (60 s)."""
    pgdata = await anyio.to_thread.run_sync(_pgdata_for, data_dir)
    if pgdata in _open_data_dirs:
        raise errors.ConfigError(
            f"MLRUN_DATA_DIR={data_dir}: the embedded PostgreSQL is already open in this process"
        )
    _open_data_dirs.add(pgdata)
    try:
        server = await anyio.to_thread.run_sync(_start, pgdata, data_dir)
        try:
            yield str(server.get_uri())
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(server.cleanup)
    finally:
        _open_data_dirs.discard(pgdata)


def _pgdata_for(data_dir: Path) -> Path:
    return data_dir.expanduser().resolve() / _PGDATA_NAME


def _start(pgdata: Path, data_dir: Path) -> Any:
    """Blocking: check reachability, create the directory, start pgserver (worker thread only)."""
    if os.geteuid() == 0:
        # Checked before importing pgserver: importing it is harmless, but get_server would chmod.
        blocked = _untraversable_directory(pgdata.parent)
        if blocked is not None:
            raise errors.ConfigError(
                f"MLRUN_DATA_DIR={data_dir}: directory {blocked} is not traversable by other users"
                " (the embedded PostgreSQL runs as user 'pgserver'); choose a data dir outside it"
                " or chmod o+x it"
            )
    from pgserver import _commands
    from pgserver.postgres_server import PostgresServer, get_server

    if os.geteuid() == 0:
        blocked = _untraversable_directory(Path(_commands.POSTGRES_BIN_PATH))
        if blocked is not None:
            raise errors.ConfigError(
                f"MLRUN_DATA_DIR={data_dir}: pgserver's binaries are under {blocked}, which user"
                " 'pgserver' cannot traverse; install the virtualenv outside a mode-700 directory"
            )
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        with PostgresServer._lock:
            _prune_dead_handles(pgdata)
        return get_server(pgdata, cleanup_mode="stop")
    except (OSError, subprocess.SubprocessError, AssertionError) as exc:
        raise errors.ConfigError(
            f"MLRUN_DATA_DIR={data_dir}: the embedded PostgreSQL did not start"
            f" ({type(exc).__name__}); see {pgdata / 'log'}"
        ) from exc


def _untraversable_directory(path: Path) -> Path | None:
    """The first existing directory from `/` down to `path` that other users cannot enter."""
    for directory in (*reversed(path.parents), path):
        try:
            mode = directory.stat().st_mode
        except FileNotFoundError:
            return None  # the rest gets created by us with the default (umask 022) mode
        if not mode & stat.S_IXOTH:
            return directory
    return None


def _prune_dead_handles(pgdata: Path) -> None:
    """Drop pids of processes that no longer exist from pgserver's handle list."""
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except FileNotFoundError:
        return
    except ValueError:
        pids = []  # a torn write; nothing in it can be trusted
    alive = [pid for pid in pids if isinstance(pid, int) and _process_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
