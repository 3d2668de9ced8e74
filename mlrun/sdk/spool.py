"""The offline spool: one directory per run per process, one file per operation, crash-safe.

Layout of a run spool directory (`<spool root>/<created ms>.<pid>.<run id>/`):

    lock                       flock(LOCK_EX) held by the owning process while it lives; the
                               kernel drops it on exit, even on kill -9, so `mlrun sync` knows a
                               directory is free to replay by taking the lock itself
    0000000000000007-batch.op  pending operation number 7 (the outbox's `pos`), replayed in order
    dead/...                   operations the server refused (400/401/403/404/409), kept
    corrupt/...                files that failed their check on recovery (quarantined, counted)

File format: a 16-byte header `MLSP` · version (1 byte) · 3 zero bytes · payload length (u32 BE)
· CRC-32 of the payload (u32 BE), then the payload. A file is written to `<name>.tmp`, fsynced,
renamed into place and the directory fsynced, so after a crash a name either holds a whole file
or does not exist; leftover `.tmp` files are deleted on recovery, and a file whose length or CRC
does not match (storage that lied about fsync, a truncated copy) is moved to `corrupt/`.

Size cap (`max_bytes`, counted over every file under the directory) is enforced on every write:
a write that would pass it raises `SpoolFull` and writes nothing; the caller counts and reports
it. Small control files (`exempt=True`: run creation and finish, < 1 KiB) may pass the cap so a
replay can still create and close the run.

The class is not thread-safe; the outbox serialises access under its lock.
Must not import httpx, grpc or anything from `mlrun.server`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from mlrun.sdk.errors import SpoolLocked

logger = logging.getLogger("mlrun.sdk.spool")

_HEADER = struct.Struct(">4sB3xII")
_MAGIC = b"MLSP"
_VERSION = 1
_SUFFIX = ".op"
LOCK_NAME = "lock"
DEAD_DIR = "dead"
CORRUPT_DIR = "corrupt"


# Lock descriptors of the spools open in this process. A forked child (a DataLoader worker, say)
# inherits them, and flock is released only when every copy is closed: the child closes its
# copies at once, so a child that outlives the parent cannot keep a spool "in use".
_open_lock_fds: set[int] = set()


def _close_lock_fds_in_child() -> None:
    for fd in _open_lock_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _open_lock_fds.clear()


os.register_at_fork(after_in_child=_close_lock_fds_in_child)


class SpoolFull(Exception):
    """Writing this file would pass the spool's size cap; nothing was written."""


class SpoolCorrupt(Exception):
    """A spool file failed its length or CRC check."""


@dataclass(frozen=True, slots=True, order=True)
class SpoolEntry:
    pos: int
    path: Path
    size_bytes: int


@dataclass(frozen=True, slots=True)
class SpoolStatistics:
    used_bytes: int
    max_bytes: int
    refused_writes: int
    quarantined_files: int


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, _VERSION, len(payload), zlib.crc32(payload)) + payload


def unframe(data: bytes) -> bytes:
    if len(data) < _HEADER.size:
        raise SpoolCorrupt(f"file of {len(data)} bytes is shorter than its header")
    magic, version, length, crc = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise SpoolCorrupt("not a spool file (bad magic or version)")
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise SpoolCorrupt(f"truncated: {len(payload)} of {length} payload bytes")
    if zlib.crc32(payload) != crc:
        raise SpoolCorrupt("CRC mismatch")
    return payload


def entry_name(pos: int, kind: str) -> str:
    return f"{pos:016d}-{kind}{_SUFFIX}"


class Spool:
    """One run spool directory, owned (locked) by this object until `close()`."""

    def __init__(self, directory: Path, *, max_bytes: int, lock_fd: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._lock_fd: int | None = lock_fd
        self._used_bytes = 0
        self._refused_writes = 0
        self._quarantined = 0

    @classmethod
    def open(cls, directory: Path, *, max_bytes: int) -> Spool:
        """Create or reopen `directory` and lock it; raise SpoolLocked if a live process has it."""
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"{directory} is in use by a live process") from None
        _open_lock_fds.add(fd)
        return cls(directory, max_bytes=max_bytes, lock_fd=fd)

    def recover(self) -> list[SpoolEntry]:
        """Scan the directory after (re)opening: drop temp files, quarantine damaged files,
        account every byte against the cap, and return the pending entries in order."""
        entries: list[SpoolEntry] = []
        self._used_bytes = 0
        for path in self.directory.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write that never reached its rename
            elif path.is_file() and path.name.endswith(_SUFFIX):
                try:
                    unframe(path.read_bytes())
                    pos = int(path.name.split("-", 1)[0])
                except (SpoolCorrupt, ValueError) as exc:
                    self._quarantine(path, str(exc))
                    continue
                size = path.stat().st_size
                self._used_bytes += size
                entries.append(SpoolEntry(pos, path, size))
        for sub in (DEAD_DIR, CORRUPT_DIR):
            folder = self.directory / sub
            for path in folder.iterdir() if folder.is_dir() else ():
                if path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)
                elif path.is_file():
                    self._used_bytes += path.stat().st_size
        entries.sort()
        return entries

    def write(self, pos: int, kind: str, payload: bytes, *, exempt: bool = False) -> SpoolEntry:
        path = self._write_file(self.directory / entry_name(pos, kind), frame(payload), exempt)
        return SpoolEntry(pos, path, _HEADER.size + len(payload))

    def read(self, entry: SpoolEntry) -> bytes:
        return unframe(entry.path.read_bytes())

    def remove(self, entry: SpoolEntry) -> None:
        # No fsync: a file resurrected by a crash is replayed, and the server's idempotency
        # ledger answers it as a duplicate.
        entry.path.unlink(missing_ok=True)
        self._used_bytes -= entry.size_bytes

    def quarantine(self, entry: SpoolEntry, reason: str) -> None:
        self._quarantine(entry.path, reason)

    def dead_letter(self, pos: int, kind: str, payload: bytes) -> Path:
        folder = self.directory / DEAD_DIR
        folder.mkdir(exist_ok=True)
        return self._write_file(folder / entry_name(pos, kind), frame(payload), exempt=False)

    def dead_letters(self) -> list[Path]:
        folder = self.directory / DEAD_DIR
        return sorted(folder.glob(f"*{_SUFFIX}")) if folder.is_dir() else []

    def read_dead_letter(self, path: Path) -> bytes:
        return unframe(path.read_bytes())

    def remove_dead_letter(self, path: Path) -> None:
        size = path.stat().st_size
        path.unlink()
        self._used_bytes -= size

    def statistics(self) -> SpoolStatistics:
        return SpoolStatistics(
            used_bytes=self._used_bytes,
            max_bytes=self.max_bytes,
            refused_writes=self._refused_writes,
            quarantined_files=self._quarantined,
        )

    def close(self, *, remove_if_empty: bool) -> bool:
        """Release the lock; with `remove_if_empty`, delete the directory when nothing is left
        in it (no pending, dead or quarantined file). Returns whether it was removed."""
        removed = False
        if remove_if_empty and self.directory.is_dir() and self._holds_nothing():
            (self.directory / LOCK_NAME).unlink(missing_ok=True)
            for sub in (DEAD_DIR, CORRUPT_DIR):
                with contextlib.suppress(OSError):
                    (self.directory / sub).rmdir()
            with contextlib.suppress(OSError):
                self.directory.rmdir()
                removed = True
        if self._lock_fd in _open_lock_fds:  # (not after a fork: the child closed it already)
            _open_lock_fds.discard(self._lock_fd)
            os.close(self._lock_fd)  # closing the descriptor releases the flock
        self._lock_fd = None
        return removed

    def _holds_nothing(self) -> bool:
        for path in self.directory.iterdir():
            if path.name == LOCK_NAME:
                continue
            if path.is_dir() and not any(path.iterdir()):
                continue
            return False
        return True

    def _write_file(self, path: Path, data: bytes, exempt: bool) -> Path:
        if not exempt and self._used_bytes + len(data) > self.max_bytes:
            self._refused_writes += 1
            raise SpoolFull(
                f"spool {self.directory} holds {self._used_bytes} of {self.max_bytes} bytes; "
                f"a {len(data)}-byte file does not fit"
            )
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
        self._used_bytes += len(data)
        return path

    def _quarantine(self, path: Path, reason: str) -> None:
        folder = self.directory / CORRUPT_DIR
        folder.mkdir(exist_ok=True)
        path.replace(folder / path.name)
        self._quarantined += 1
        logger.error("spool file %s is damaged (%s); moved to %s", path.name, reason, folder)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_spool_dirs(root: Path) -> list[Path]:
    """The run spool directories under `root`, oldest first (names start with creation ms).
    `root` may itself be one run spool directory."""
    if (root / LOCK_NAME).exists():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / LOCK_NAME).exists())
