"""Blobs in object storage (S3 and S3-compatible servers): the store's :class:`~kvzip_rag.store.blob.BlobBackend`
over `obstore <https://developmentseed.org/obstore>`_, and :func:`open_objects` for a ``blob_url``.

Blobs are immutable and named by a fresh uuid, so writing atomically is simple: an object is uploaded whole (one PUT,
or a multipart upload the server publishes only when it completes) and only then does a row point at it. A crash in
between leaves an object no row names, which :meth:`CacheStore.gc` finds through :meth:`ObstoreObjects.entries`
and removes. Readers ask for byte ranges (the safetensors header, then only the row prefixes a lower ratio keeps,
all heads of a tensor in one concurrent call that obstore coalesces), so a 0.1-ratio load of a 0.3 blob transfers
about a third of it; :attr:`ObstoreObjects.counter` counts what was read.

obstore (Rust ``object_store``) was chosen over fsspec/s3fs by measurement against a local S3 server (BENCHMARKS.md,
"Scale"): faster ranged GETs, ~6x the throughput of whole-object GETs, a synchronous API, one small wheel with no
dependencies. Credentials and endpoint come from obstore's usual configuration: the ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``
environment variables, instance metadata or web identity (or ``options`` a caller passes to :func:`open_objects`);
never from kvzip-rag's own files.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.extras import require

from .blob import BlobBackend, LocalBlobs


COALESCE = 4096  # ranges closer than this are one request: a few KiB cost less than another round trip


def _coalesced(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[start, end)`` spans the requests cover once ranges closer than ``COALESCE`` are merged."""
    spans: list[list[int]] = []
    for start, length in sorted(ranges):
        if spans and start - spans[-1][1] < COALESCE:
            spans[-1][1] = max(spans[-1][1], start + length)
        else:
            spans.append([start, start + length])
    return [(a, z) for a, z in spans]


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
    """A relative "/"-separated key without ``..``: rows are ours, but never follow one out of the prefix."""
    parts = PurePosixPath(key).parts if isinstance(key, str) else ()
    if not parts or key.startswith("/") or "\\" in key or any(p in ("..", ".") for p in parts):
        raise InvalidArgumentError(f"blob key {key!r} must be a relative path inside the blob root")
    return key


class ObstoreObjects:
    """Any store obstore opens from a URL (``s3://bucket/prefix``; also ``gs://``, ``az://``), keys under its prefix."""

    def __init__(self, url: str, **options):
        require("obstore", "s3", f"blob storage at {url!r}")
        import obstore
        from obstore.store import from_url

        self._obstore = obstore
        self.url = url
        self.store = from_url(url, **options)
        self.counter = ReadCounter()

    def __repr__(self) -> str:
        return f"ObstoreObjects({self.url!r})"

    def describe(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def open(self, key: str) -> _ObjectRange:
        """The object for ranged reads (its size from one HEAD request). FileNotFoundError if it is absent."""
        return _ObjectRange(self, key, self.size(key))

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (fewer only past the end). FileNotFoundError if the object is absent."""
        if start < 0 or length < 0:
            raise InvalidArgumentError(f"bad byte range ({start}, {length}) of {key!r}")
        if length == 0:
            return b""
        data = bytes(self._obstore.get_range(self.store, check_key(key), start=start, length=length))
        self.counter.add(len(data))
        return data

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ``(start, length)`` ranges of one object, fetched concurrently; ranges less than ``COALESCE``
        bytes apart travel in one request (the counter counts what travelled, gaps included)."""
        wanted = [(a, n) for a, n in ranges if n > 0]
        if not wanted:
            return [b"" for _ in ranges]
        pieces = iter(self._obstore.get_ranges(
            self.store, check_key(key), starts=[a for a, _ in wanted], lengths=[n for _, n in wanted],
            coalesce=COALESCE,
        ))
        out = [bytes(next(pieces)) if n > 0 else b"" for _, n in ranges]
        spans = _coalesced(wanted)
        self.counter.add(sum(z - a for a, z in spans), len(spans))
        return out

    def read(self, key: str) -> bytes:
        data = bytes(self._obstore.get(self.store, check_key(key)).bytes())
        self.counter.add(len(data))
        return data

    def size(self, key: str) -> int:
        return int(self._obstore.head(self.store, check_key(key))["size"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def write(self, key: str, data: bytes) -> None:
        """One upload: readers see no object or all of it."""
        self._obstore.put(self.store, check_key(key), data)

    def delete(self, key: str) -> None:
        try:
            self._obstore.delete(self.store, check_key(key))
        except FileNotFoundError:
            pass

    def entries(self) -> Iterator[tuple[str, int, float]]:
        """``(key, size, modified)`` of every object under the prefix (for gc of orphans)."""
        for batch in self._obstore.list(self.store, chunk_size=1000):
            for meta in batch:
                yield meta["path"], int(meta["size"]), meta["last_modified"].timestamp()


class _ObjectRange:
    """One object opened by :meth:`ObstoreObjects.open` (the store's ``RangeReader``); objects are immutable, so
    nothing is held open."""

    def __init__(self, objects: ObstoreObjects, key: str, size: int):
        self.objects, self.key, self.size = objects, key, size

    def read(self, start: int, length: int) -> bytes:
        return self.objects.read_range(self.key, start, length)

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return self.objects.read_ranges(self.key, ranges)

    def close(self) -> None:
        pass


def open_objects(location: str | os.PathLike, **options) -> BlobBackend:
    """A backend for a local folder (a path or ``file://`` URL) or an object store URL (``s3://bucket/prefix``).

    ``options`` go to obstore's ``from_url`` (e.g. ``endpoint=``, ``region=``); credentials normally come from the
    environment (see the module docstring).
    """
    if isinstance(location, os.PathLike):
        return LocalBlobs(location)
    if not isinstance(location, str) or not location:
        raise InvalidArgumentError(f"a blob location is a folder or a URL such as s3://bucket/prefix, got {location!r}")
    parsed = urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgumentError(f"{location!r}: a file:// URL names a local folder (file:///path)")
        return LocalBlobs(unquote(parsed.path))
    if len(parsed.scheme) <= 1:  # no scheme, or a Windows drive letter
        return LocalBlobs(location)
    return ObstoreObjects(location, **options)
