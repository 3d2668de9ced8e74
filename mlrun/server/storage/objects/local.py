"""The embedded default artifact store: a local directory served by the MLRun server itself
through signed, expiring URLs.

Owns `open_local_store` -> `LocalArtifactStore`: objects are files under `root/objects/`;
uploads are written to `root/tmp/` and renamed into place (atomic); multipart parts live under
`root/uploads/<upload_id>/` until completed. Its URLs point at the server itself
(`public_base_url` + `LOCAL_ROUTE_PREFIX` + key) and carry `expires` and an HMAC-SHA256
`signature`, both defined in `objects.local_signing`: the HTTP edge checks them there with the
pure `verify_local_signature` and then calls `write_object_from` / `write_part_from` /
`open_object_reader` here.

Must not import: the HTTP or gRPC edges, the S3 store, trio or asyncio (anyio only), psycopg,
chdb.

Invariants:
- Every key goes through `protocols.s3.validate_artifact_key` first, and every path is resolved
  and refused when outside the root: no key can traverse paths.
- Blocking file I/O and hashing run in worker threads behind a bounded `CapacityLimiter`.
- A local object is either absent or complete: readers never see a partial write, and no write
  ever changes an existing file in place (a new file is renamed over the name), which is what
  makes a hard link a safe copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Final

import anyio

from mlrun.server import errors
from mlrun.server.ports.objects import (
    BACKEND,
    CHUNK_BYTES,
    DEFAULT_COMPLETE_TIMEOUT_S,
    DEFAULT_HASH_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    MIN_PART_BYTES,
    ObjectInfo,
    PresignedRequest,
)
from mlrun.server.protocols import s3 as s3proto
from mlrun.server.storage.objects.local_signing import UPLOAD_ID, signed_local_url
from mlrun.wire.artifacts import MAX_PART_NUMBER
from mlrun.wire.error_codes import ErrorCode

MIN_SIGNING_SECRET_BYTES: Final = 32

# Worker threads for file I/O and hashing, shared by every operation of one store.
MAX_FILE_THREADS: Final = 4

# Temp files older than this at open were left by a crash (no writer lives that long).
STALE_TMP_AGE_S: Final = 24 * 3600

CLEANUP_TIMEOUT_S: Final = 5.0


class ObjectReader:
    """An open local object: `size_bytes`, and `chunks()` to stream it. Use via
    `LocalArtifactStore.open_object_reader`; the file stays open until that block exits, so a
    concurrent overwrite does not change what this reader returns."""

    def __init__(self, file: BinaryIO, size_bytes: int, limiter: anyio.CapacityLimiter) -> None:
        self._file = file
        self.size_bytes = size_bytes
        self._limiter = limiter

    async def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
        while True:
            chunk = await anyio.to_thread.run_sync(
                self._file.read, chunk_bytes, limiter=self._limiter
            )
            if not chunk:
                return
            yield chunk


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _fsync_and_close(file: BinaryIO) -> None:
    try:
        file.flush()
        os.fsync(file.fileno())
    finally:
        file.close()


class LocalArtifactStore:
    """Artifacts as files under a root directory. Build it with `open_local_store`."""

    backend_name = BACKEND

    def __init__(
        self,
        *,
        root: Path,
        public_base_url: str,
        signing_secret: bytes,
        limiter: anyio.CapacityLimiter,
    ) -> None:
        self.root = root
        self._objects = root / "objects"
        self._tmp = root / "tmp"
        self._uploads = root / "uploads"
        self.public_base_url = public_base_url.rstrip("/")
        self._secret = signing_secret
        self._limiter = limiter

    # paths (called in worker threads: `resolve` touches the file system)

    def _object_path(self, key: str) -> Path:
        s3proto.validate_artifact_key(key)
        base = self._objects.resolve()
        path = (base / key).resolve()
        if not path.is_relative_to(base) or path == base:
            # Only a symlink planted inside the root could get here: refuse, never follow.
            raise errors.InvalidInput(
                "invalid artifact name: it resolves outside the store", field="name"
            )
        return path

    def _upload_dir(self, key: str, upload_id: str) -> Path:
        if not UPLOAD_ID.match(upload_id):
            raise errors.NotFound("no such multipart upload")
        path = self._uploads / upload_id
        try:
            owner = (path / "key").read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise errors.NotFound("no such multipart upload") from exc
        if owner != key:
            raise errors.NotFound("no such multipart upload")
        return path

    def _new_tmp(self) -> Path:
        return self._tmp / f"{secrets.token_hex(16)}.tmp"

    # blocking work, run in threads

    def _install(self, tmp: Path, target: Path) -> None:
        """Rename a finished temp file into place (atomic on one file system)."""
        for _ in range(3):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
                return
            except FileNotFoundError:
                # A concurrent delete pruned the empty parent between mkdir and rename.
                if not tmp.exists():
                    raise
                continue
            except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
                raise errors.Conflict(
                    "an artifact name collides with an existing artifact path",
                    code=ErrorCode.NAME_CONFLICT,
                ) from exc
        raise errors.Conflict("the artifact path kept changing during the upload")

    def _remove_empty_parents(self, path: Path) -> None:
        base = self._objects.resolve()
        parent = path.parent
        while parent != base and parent.is_relative_to(base):
            try:
                parent.rmdir()
            except OSError:
                return
            parent = parent.parent

    async def _write_tmp(
        self, chunks: AsyncIterable[bytes], max_bytes: int
    ) -> tuple[Path, int, str]:
        """Stream chunks into a new temp file; return (path, size, sha256 hex). On any failure
        or cancellation the temp file is removed."""
        tmp = self._new_tmp()
        file = await anyio.to_thread.run_sync(_open_exclusive, tmp, limiter=self._limiter)
        hasher = hashlib.sha256()
        size = 0
        buffer = bytearray()
        try:
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise errors.PayloadTooLarge(
                            f"the artifact is larger than the allowed {max_bytes} bytes",
                            field="body",
                        )
                    buffer += chunk
                    if len(buffer) >= CHUNK_BYTES:
                        await anyio.to_thread.run_sync(
                            _write_and_hash, file, hasher.update, buffer, limiter=self._limiter
                        )
                        buffer.clear()
                if buffer:
                    await anyio.to_thread.run_sync(
                        _write_and_hash, file, hasher.update, buffer, limiter=self._limiter
                    )
            finally:
                # Shielded but not deadline-bounded: a worker thread cannot be interrupted, and
                # the descriptor must be closed whatever happens; fsync of one file is short.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_fsync_and_close, file, limiter=self._limiter)
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                await anyio.to_thread.run_sync(_unlink_quietly, tmp, limiter=self._limiter)
            raise
        return tmp, size, hasher.hexdigest()

    # the public surface

    async def ensure_bucket(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Create the store's directories (idempotent); the local twin of bucket creation."""

        def make() -> None:
            for path in (self._objects, self._tmp, self._uploads):
                path.mkdir(parents=True, exist_ok=True)

        try:
            await anyio.to_thread.run_sync(make, limiter=self._limiter)
        except OSError as exc:
            raise errors.BackendUnavailable(
                "the artifact directory cannot be created", backend=BACKEND
            ) from exc

    async def ping(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        def check() -> bool:
            return all(
                path.is_dir() and os.access(path, os.W_OK | os.X_OK)
                for path in (self._objects, self._tmp, self._uploads)
            )

        if not await anyio.to_thread.run_sync(check, limiter=self._limiter):
            raise errors.BackendUnavailable(
                "the artifact directory is missing or not writable", backend=BACKEND
            )

    def _presign(
        self,
        method: str,
        key: str,
        expires_s: int,
        upload_id: str | None = None,
        part_number: int | None = None,
    ) -> PresignedRequest:
        s3proto.validate_artifact_key(key)
        if not 1 <= expires_s <= s3proto.MAX_PRESIGN_EXPIRES_S:
            raise ValueError(
                f"expires_s must be within 1..{s3proto.MAX_PRESIGN_EXPIRES_S}, got {expires_s}"
            )
        expires_at_s = int(time.time()) + expires_s
        url = signed_local_url(
            public_base_url=self.public_base_url,
            signing_secret=self._secret,
            method=method,
            key=key,
            expires_at_s=expires_at_s,
            upload_id=upload_id,
            part_number=part_number,
        )
        return PresignedRequest(
            url=url, method=method, expires_at=datetime.fromtimestamp(expires_at_s, UTC)
        )

    def presign_put(self, key: str, *, expires_s: int) -> PresignedRequest:
        return self._presign("PUT", key, expires_s)

    def presign_get(self, key: str, *, expires_s: int) -> PresignedRequest:
        return self._presign("GET", key, expires_s)

    def presign_upload_part(
        self, key: str, upload_id: str, part_number: int, *, expires_s: int
    ) -> PresignedRequest:
        if not UPLOAD_ID.match(upload_id):
            raise errors.InvalidInput("not a valid upload id", field="upload_id")
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise errors.InvalidInput(
                f"part numbers must be within 1..{MAX_PART_NUMBER}", field="part_number"
            )
        return self._presign("PUT", key, expires_s, upload_id, part_number)

    async def write_object_from(
        self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int
    ) -> ObjectInfo:
        """Store the streamed bytes under `key` atomically (overwrites, as S3 PUT does)."""
        s3proto.validate_artifact_key(key)
        tmp, size, digest = await self._write_tmp(chunks, max_bytes)

        def install() -> None:
            try:
                self._install(tmp, self._object_path(key))
            except BaseException:
                _unlink_quietly(tmp)
                raise

        await anyio.to_thread.run_sync(install, limiter=self._limiter)
        return ObjectInfo(size_bytes=size, etag=f'"{digest}"')

    async def write_part_from(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        chunks: AsyncIterable[bytes],
        *,
        max_bytes: int,
    ) -> str:
        """Store one part of a multipart upload; return its ETag (quoted SHA-256 hex).

        A part uploaded twice keeps the last copy, as on S3.
        """
        s3proto.validate_artifact_key(key)
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise errors.InvalidInput("part number out of range", field="part_number")
        await anyio.to_thread.run_sync(self._upload_dir, key, upload_id, limiter=self._limiter)
        tmp, _size, digest = await self._write_tmp(chunks, max_bytes)

        def install() -> None:
            try:
                upload = self._upload_dir(key, upload_id)
                # The ETag is in the file name, so a (part, ETag) pair names exactly one file
                # even when the same part is uploaded twice concurrently.
                target = upload / f"{part_number:05d}-{digest}.part"
                os.replace(tmp, target)
                for stale in upload.glob(f"{part_number:05d}-*.part"):
                    if stale != target:
                        _unlink_quietly(stale)
            except FileNotFoundError as exc:
                _unlink_quietly(tmp)
                raise errors.NotFound("no such multipart upload") from exc
            except BaseException:
                _unlink_quietly(tmp)
                raise

        await anyio.to_thread.run_sync(install, limiter=self._limiter)
        return f'"{digest}"'

    async def create_multipart(self, key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
        s3proto.validate_artifact_key(key)
        upload_id = secrets.token_hex(16)

        def create() -> None:
            path = self._uploads / upload_id
            path.mkdir(parents=True)
            (path / "key").write_text(key, encoding="utf-8")

        await anyio.to_thread.run_sync(create, limiter=self._limiter)
        return upload_id

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[tuple[int, str]],
        *,
        timeout_s: float = DEFAULT_COMPLETE_TIMEOUT_S,
    ) -> None:
        """Concatenate the listed parts, in order, into the object (atomically)."""
        s3proto.validate_artifact_key(key)
        ordered = s3proto.normalize_parts(parts)

        def complete() -> None:
            upload = self._upload_dir(key, upload_id)
            files: list[Path] = []
            for index, (number, etag) in enumerate(ordered):
                digest = etag.strip('"')
                path = upload / f"{number:05d}-{digest}.part"
                if not re.fullmatch(r"[0-9a-f]{64}", digest) or not path.is_file():
                    raise errors.InvalidInput(
                        f"part {number} was not uploaded or its ETag does not match",
                        field="parts",
                    )
                if index < len(ordered) - 1 and path.stat().st_size < MIN_PART_BYTES:
                    raise errors.InvalidInput(
                        f"part {number} is smaller than {MIN_PART_BYTES} bytes and not the last",
                        field="parts",
                    )
                files.append(path)
            tmp = self._new_tmp()
            try:
                with open(tmp, "xb") as out:
                    for path in files:
                        with open(path, "rb") as part:
                            shutil.copyfileobj(part, out, CHUNK_BYTES)
                    out.flush()
                    os.fsync(out.fileno())
                self._install(tmp, self._object_path(key))
            except BaseException:
                _unlink_quietly(tmp)
                raise
            shutil.rmtree(upload, ignore_errors=True)

        await anyio.to_thread.run_sync(complete, limiter=self._limiter)

    async def abort_multipart(
        self, key: str, upload_id: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        """Drop an upload and its parts; an unknown upload counts as already aborted."""
        s3proto.validate_artifact_key(key)

        def abort() -> None:
            try:
                upload = self._upload_dir(key, upload_id)
            except errors.NotFound:
                return
            shutil.rmtree(upload, ignore_errors=True)

        await anyio.to_thread.run_sync(abort, limiter=self._limiter)

    async def head_object(
        self, key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> ObjectInfo | None:
        def stat() -> ObjectInfo | None:
            path = self._object_path(key)
            try:
                info = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not path.is_file():
                return None
            # Opaque, cheap and changes with every rewrite; not a content hash.
            token = f"{info.st_size}-{info.st_mtime_ns}-{info.st_ino}".encode()
            return ObjectInfo(info.st_size, f'"{hashlib.sha256(token).hexdigest()[:32]}"')

        result: ObjectInfo | None = await anyio.to_thread.run_sync(stat, limiter=self._limiter)
        return result

    @asynccontextmanager
    async def open_object_reader(self, key: str) -> AsyncIterator[ObjectReader]:
        """Open `key` for streaming; NotFound when it does not exist."""

        def open_file() -> tuple[BinaryIO, int]:
            path = self._object_path(key)
            try:
                file = open(path, "rb")  # noqa: SIM115 - closed by the caller's block
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
                raise errors.NotFound("the artifact object does not exist") from exc
            return file, os.fstat(file.fileno()).st_size

        file, size = await anyio.to_thread.run_sync(open_file, limiter=self._limiter)
        try:
            yield ObjectReader(file, size, self._limiter)
        finally:
            file.close()  # closing a read-only descriptor does not block

    async def sha256_of(self, key: str, *, timeout_s: float = DEFAULT_HASH_TIMEOUT_S) -> str:
        def digest() -> str:
            path = self._object_path(key)
            hasher = hashlib.sha256()
            try:
                with open(path, "rb") as file:
                    while chunk := file.read(CHUNK_BYTES):
                        hasher.update(chunk)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
                raise errors.NotFound("the artifact object does not exist") from exc
            return hasher.hexdigest()

        result: str = await anyio.to_thread.run_sync(digest, limiter=self._limiter)
        return result

    async def copy_object(
        self, source_key: str, target_key: str, *, timeout_s: float = DEFAULT_COMPLETE_TIMEOUT_S
    ) -> bool:
        """A hard link under the target's name: O(1), and safe because every write here
        installs a new file (rename) instead of writing into an existing one, so a later upload
        to the source key can never change the target's bytes."""
        def copy() -> bool:
            source = self._object_path(source_key)
            target = self._object_path(target_key)
            if not source.is_file():
                return False
            tmp = self._new_tmp()
            os.link(source, tmp)
            try:
                self._install(tmp, target)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            return True

        return await anyio.to_thread.run_sync(copy, limiter=self._limiter)

    async def delete_object(self, key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        def delete() -> None:
            path = self._object_path(key)
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            # S3 has no directories: leave none behind to collide with a later key.
            self._remove_empty_parents(path)

        await anyio.to_thread.run_sync(delete, limiter=self._limiter)

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_AGE_S
        for path in self._tmp.glob("*.tmp"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()


def _write_and_hash(file: BinaryIO, update: Callable[[bytearray], object], data: bytearray) -> None:
    file.write(data)
    update(data)


def _open_exclusive(path: Path) -> BinaryIO:
    return open(path, "xb")


@asynccontextmanager
async def open_local_store(
    *, root: Path, public_base_url: str, signing_secret: bytes
) -> AsyncIterator[LocalArtifactStore]:
    """Yield a local store under `root` (its directories are created on entry).

    `public_base_url` is where clients reach this server's HTTP listener (for example
    `http://127.0.0.1:3001`); when the listener binds port 0 it can be set later through the
    store's `public_base_url` attribute. `signing_secret` (at least 32 bytes) signs its URLs;
    keep it stable across restarts or URLs already handed out stop working.
    """
    if len(signing_secret) < MIN_SIGNING_SECRET_BYTES:
        raise ValueError(f"the signing secret needs at least {MIN_SIGNING_SECRET_BYTES} bytes")
    store = LocalArtifactStore(
        root=root,
        public_base_url=public_base_url,
        signing_secret=signing_secret,
        limiter=anyio.CapacityLimiter(MAX_FILE_THREADS),
    )
    await store.ensure_bucket()
    await anyio.to_thread.run_sync(store._remove_stale_tmp)
    yield store
