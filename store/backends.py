"""Blob transport: where blob bytes live and how they move, knowing nothing of their format.

A :class:`BlobBackend` reads a byte range, writes a whole object atomically, deletes and lists, so an object-store
backend (:mod:`.objects`) only has to implement those calls; :class:`LocalBlobs` is the file-system one. Writes
that hit a full disk become ``StoreFullError`` here (:func:`is_disk_full` is the one heuristic for "full").
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from kvzip_rag.errors import CorruptBlobError, StoreFullError


class RangeReader(Protocol):
    """One blob opened for byte-range reads (a file handle, an object-store object)."""

    size: int

    def read(self, start: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class BlobBackend(Protocol):
    """Where blob bytes live. Names are generated (never from user input), ``"ab/abcdef….safetensors"``."""

    def open(self, name: str) -> RangeReader:
        """``FileNotFoundError`` when there is no such blob."""

    def write(self, name: str, data: bytes) -> None:
        """Store ``data`` whole and atomically (readers see the old object, none, or all of ``data``)."""

    def delete(self, name: str) -> None: ...

    def entries(self) -> Iterator[tuple[str, int, float]]:
        """``(name, size, mtime)`` of every object, temp files included (for gc)."""

    def describe(self, name: str) -> str: ...


def is_disk_full(error: BaseException, path: str | os.PathLike | None = None) -> bool:
    """ENOSPC/EDQUOT, SQLite's "database or disk is full", or its "disk I/O error" while ``path``'s disk has
    (almost) no free space left."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    if "database or disk is full" in text:
        return True
    if "disk i/o error" in text and path is not None:
        try:
            return shutil.disk_usage(path).free < (1 << 20)
        except OSError:
            return False
    return False


def full_error(where: str, needed: int | None, error: BaseException) -> StoreFullError:
    need = f"; about {needed} more bytes are needed" if needed else ""
    return StoreFullError(
        errno.ENOSPC,
        f"the disk holding {where} is full{need} ({error}); nothing was stored. Free space (kvzip-rag rm / gc, "
        "or elsewhere on that disk) and retry",
    )


class LocalBlobs:
    """Blobs as files under ``root``: temp file, fsync, rename, fsync the directory."""

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root).expanduser().resolve()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root not in path.parents:  # rows are ours, but never follow one outside the blob dir
            raise CorruptBlobError(f"blob path {name!r} points outside the blob folder; refusing it")
        return path

    def describe(self, name: str) -> str:
        return str(self.root / name)

    def open(self, name: str) -> "_LocalRange":
        return _LocalRange(self.path(name))

    def write(self, name: str, data: bytes) -> None:
        path = self.path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        except OSError as error:
            if is_disk_full(error):
                raise full_error(str(path), len(data), error) from error
            raise

    def delete(self, name: str) -> None:
        try:
            path = self.path(name)
            path.unlink()
        except (FileNotFoundError, CorruptBlobError):
            return
        fsync_dir(path.parent)

    def entries(self) -> Iterator[tuple[str, int, float]]:
        for path in sorted(self.root.rglob("*")):
            try:
                if path.is_file():
                    info = path.stat()
                    yield path.relative_to(self.root).as_posix(), info.st_size, info.st_mtime
            except FileNotFoundError:
                continue

    def touch(self, name: str) -> None:
        try:
            os.utime(self.path(name))
        except OSError:
            pass


class _LocalRange:
    def __init__(self, path: Path):
        self.fd = -1
        # O_NONBLOCK: a FIFO in a blob's place must not block the open (no effect on reads of a regular file)
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
        mode = os.fstat(self.fd).st_mode
        if not stat.S_ISREG(mode):
            self.close()
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
            raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL, f"the blob is {kind}", str(path))
        self.size = os.fstat(self.fd).st_size

    def read(self, start: int, length: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self.fd, length, start)
        os.lseek(self.fd, start, os.SEEK_SET)
        return os.read(self.fd, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over ``path``, fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def new_blob_name() -> str:
    """A generated name: never derived from document ids or metadata."""
    name = f"{uuid.uuid4().hex}.safetensors"
    return f"{name[:2]}/{name}"


def file_sha256(backend: BlobBackend, name: str) -> str:
    digest, position, reader = hashlib.sha256(), 0, backend.open(name)
    try:
        while position < reader.size:
            chunk = reader.read(position, min(1 << 20, reader.size - position))
            if not chunk:
                break
            digest.update(chunk)
            position += len(chunk)
    finally:
        reader.close()
    return digest.hexdigest()
