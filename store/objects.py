"""Where blobs live: a local folder or an object store (S3 and S3-compatible servers), behind a few calls.

Blobs are immutable and named by a fresh uuid, so writing atomically is simple: an object is written whole (local
folder: temp file, fsync, rename; S3: one PUT, or a multipart upload that the server publishes only when it
completes) and only then does a row point at it. A crash in between leaves an object no row names, which
:meth:`CacheStore.gc` finds with :meth:`BlobObjects.list` and removes. Readers ask for byte ranges (the safetensors
header, then only the row prefixes a lower ratio keeps), so a 0.1-ratio load of a 0.3 blob transfers about a third
of it; every backend counts what it read (:attr:`BlobObjects.counter`).

Object stores go through `obstore <https://developmentseed.org/obstore>`_ (Rust ``object_store``), chosen over
fsspec/s3fs by measurement against a local S3 server (BENCHMARKS.md, "Scale"): faster ranged GETs, ~6x the
throughput of whole-object GETs, a synchronous API, one small wheel with no dependencies. Credentials and endpoint
come from obstore's usual configuration: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP`` environment variables, instance metadata, web identity
(or ``options`` a caller passes to :func:`open_objects`); never from kvzip-rag's own files.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from kvzip_rag.errors import InvalidArgumentError

from .blob import atomic_write, fsync_dir


class ReadCounter:
    """Bytes and requests a backend has read (thread-safe): what a ranged load really cost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.nbytes = 0
        self.requests = 0

    def add(self, nbytes: int, requests: int = 1) -> None:
        with self._lock:
            self.nbytes += nbytes
            self.requests += requests

    def reset(self) -> None:
        with self._lock:
            self.nbytes = self.requests = 0


def check_key(key: str) -> str:
    """A relative "/"-separated key without ``..``: rows are ours, but never follow one out of the root."""
    parts = PurePosixPath(key).parts if isinstance(key, str) else ()
    if not parts or key.startswith("/") or "\\" in key or any(p in ("..", ".") for p in parts):
        raise InvalidArgumentError(f"blob key {key!r} must be a relative path inside the blob root")
    return key


class BlobObjects(ABC):
    """Immutable objects by key: ranged reads, whole reads, atomic writes, deletes and a listing for gc."""

    url: str

    def __init__(self) -> None:
        self.counter = ReadCounter()

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (fewer only if the object is shorter). FileNotFoundError if absent."""

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ``(start, length)`` ranges of one object (object stores fetch them concurrently and merge
        neighbours into one request)."""
        return [self.read_range(key, start, length) for start, length in ranges]

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The whole object. FileNotFoundError if absent."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes. FileNotFoundError if absent."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Publish the object whole or not at all."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    @abstractmethod
    def entries(self) -> Iterator[tuple[str, int, float]]:
        """``(key, size, modified)`` of every object (for gc of orphans), in no particular order."""

    def describe(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class LocalObjects(BlobObjects):
    """A local folder: ``pread`` for ranges, temp file + fsync + rename for writes."""

    def __init__(self, root: str | os.PathLike):
        super().__init__()
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidArgumentError(f"bad byte range ({start}, {length}) of {key!r}")
        fd = os.open(self.path(key), os.O_RDONLY)
        try:
            data = os.pread(fd, length, start)
        finally:
            os.close(fd)
        self.counter.add(len(data))
        return data

    def read(self, key: str) -> bytes:
        data = self.path(key).read_bytes()
        self.counter.add(len(data))
        return data

    def size(self, key: str) -> int:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no blob {key!r} in {self.root}")
        return path.stat().st_size

    def write(self, key: str, data: bytes) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def entries(self) -> Iterator[tuple[str, int, float]]:
        for path in self.root.rglob("*"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed while we walked
                continue
            if path.is_file():
                yield path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime


class ObstoreObjects(BlobObjects):
    """Any store obstore opens from a URL (``s3://bucket/prefix``; also ``gs://``, ``az://``), keys under its prefix."""

    def __init__(self, url: str, **options):
        super().__init__()
        try:
            import obstore
            from obstore.store import from_url
        except ImportError as error:
            raise InvalidArgumentError(
                f"blob storage at {url!r} needs obstore: pip install 'kvzip-rag[s3]'"
            ) from error
        self._obstore = obstore
        self.url = url
        self.store = from_url(url, **options)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidArgumentError(f"bad byte range ({start}, {length}) of {key!r}")
        if length == 0:
            return b""
        data = bytes(self._obstore.get_range(self.store, check_key(key), start=start, length=length))
        self.counter.add(len(data))
        return data

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        wanted = [(a, n) for a, n in ranges if n > 0]
        if not wanted:
            return [b"" for _ in ranges]
        pieces = iter(self._obstore.get_ranges(
            self.store, check_key(key), starts=[a for a, _ in wanted], lengths=[n for _, n in wanted]
        ))
        out = [bytes(next(pieces)) if n > 0 else b"" for _, n in ranges]
        self.counter.add(sum(map(len, out)), len(wanted))
        return out

    def read(self, key: str) -> bytes:
        data = bytes(self._obstore.get(self.store, check_key(key)).bytes())
        self.counter.add(len(data))
        return data

    def size(self, key: str) -> int:
        return int(self._obstore.head(self.store, check_key(key))["size"])

    def write(self, key: str, data: bytes) -> None:
        self._obstore.put(self.store, check_key(key), data)

    def delete(self, key: str) -> None:
        try:
            self._obstore.delete(self.store, check_key(key))
        except FileNotFoundError:
            pass

    def entries(self) -> Iterator[tuple[str, int, float]]:
        for batch in self._obstore.list(self.store, chunk_size=1000):
            for meta in batch:
                yield meta["path"], int(meta["size"]), meta["last_modified"].timestamp()


def open_objects(location: str | os.PathLike, **options) -> BlobObjects:
    """A backend for a local folder (a path or ``file://`` URL) or an object store URL (``s3://bucket/prefix``).

    ``options`` go to obstore's ``from_url`` (e.g. ``endpoint=``, ``region=``); credentials normally come from the
    environment (see the module docstring).
    """
    if isinstance(location, BlobObjects):
        return location
    if isinstance(location, os.PathLike):
        return LocalObjects(location)
    if not isinstance(location, str) or not location:
        raise InvalidArgumentError(f"a blob location is a folder or a URL such as s3://bucket/prefix, got {location!r}")
    scheme = urlparse(location).scheme
    if scheme == "file":
        parsed = urlparse(location)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgumentError(f"{location!r}: a file:// URL names a local folder (file:///path)")
        return LocalObjects(unquote(parsed.path))
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter
        return LocalObjects(location)
    return ObstoreObjects(location, **options)
