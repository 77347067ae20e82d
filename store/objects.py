"""Blobs in object storage (S3 and S3-compatible servers): the store's :class:`~kvzip_rag.store.backends.BlobBackend`
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
import re
import threading
from datetime import timedelta
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from kvzip_rag.errors import BlobStorageError, InvalidArgumentError
from kvzip_rag.extras import require

from .backends import BlobBackend, LocalBlobs


TIMEOUT_RETRIES = 2  # with a timeout: retries of a request that timed out or found the server down
COALESCE = 4096  # ranges closer than this are one request: a few KiB cost less than another round trip

# URL schemes obstore opens as object stores, by family (its ``from_url`` also takes http:// and memory://: no place
# for a store's blobs)
OBJECT_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "az": "az", "abfs": "az", "abfss": "az", "azure": "az"}
# the environment variables obstore's credential chain reads, per family (named in error messages)
_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary keys), or "
          "AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, or the instance metadata service; for an S3-compatible "
          "server also AWS_ENDPOINT_URL and AWS_REGION (and AWS_ALLOW_HTTP=true for an http:// endpoint)",
    "gs": "GOOGLE_SERVICE_ACCOUNT (a key file) or GOOGLE_SERVICE_ACCOUNT_KEY (its JSON), or "
          "GOOGLE_APPLICATION_CREDENTIALS",
    "az": "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_KEY), or a managed "
          "identity",
}
# the environment variables of obstore's client options (``{prefix}{KEY}``), which explicit client options replace
_ENV_PREFIX = {"s3": "AWS_", "gs": "GOOGLE_", "az": "AZURE_"}
_ENV_CLIENT_KEYS = ("allow_http", "allow_invalid_certificates", "proxy_url", "proxy_ca_certificate", "proxy_excludes",
                    "root_certificate", "user_agent")
# obstore found no credentials in the environment and asked the instance metadata service (IMDS), which failed
_NO_CREDENTIALS = ("169.254.169.254", "/latest/api/token", "/latest/meta-data", "credential")


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


def bounded(timeout: float, family: str = "s3") -> dict:
    """obstore options that make a request to a server that is down or stalled fail within about
    ``(TIMEOUT_RETRIES + 1) * timeout`` seconds (obstore's defaults retry for up to 3 minutes): connect and read
    timeouts of ``timeout`` seconds, ``TIMEOUT_RETRIES`` retries with a short backoff. Client options given here
    replace those obstore reads from the environment, so those (``AWS_ALLOW_HTTP``...) are carried over."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 86400:
        raise InvalidArgumentError(f"blob_timeout is a number of seconds > 0, got {timeout!r}")
    seconds = timedelta(seconds=timeout)
    prefix = _ENV_PREFIX[family]
    from_env = {key: os.environ[prefix + key.upper()] for key in _ENV_CLIENT_KEYS if prefix + key.upper() in os.environ}
    return {
        "client_options": {**from_env, "connect_timeout": seconds, "read_timeout": seconds},
        "retry_config": {"max_retries": TIMEOUT_RETRIES, "retry_timeout": seconds * (TIMEOUT_RETRIES + 1),
                         "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=1)}},
    }


class ObstoreObjects:
    """Any store obstore opens from a URL (``s3://bucket/prefix``; also ``gs://``, ``az://``), keys under its prefix.

    ``timeout`` (seconds) bounds each request to a server that does not answer (:func:`bounded`); None keeps
    obstore's defaults (retries for up to 3 minutes: for batch jobs that should ride out a server restart)."""

    def __init__(self, url: str, timeout: float | None = None, **options):
        require("obstore", "s3", f"blob storage at {url!r}")
        import obstore
        from obstore.exceptions import BaseError
        from obstore.store import from_url

        self._obstore = obstore
        self._errors = BaseError
        self.url = url
        self.family = OBJECT_SCHEMES.get(urlparse(url).scheme.lower(), "s3")
        if timeout is not None:
            options = {**bounded(timeout, self.family), **options}
        with self._translated("open"):
            self.store = from_url(url, **options)
        self.counter = ReadCounter()

    @contextmanager
    def _translated(self, action: str, key: str = ""):
        """obstore's errors as :class:`BlobStorageError` naming the URL (and, when the request was refused or no
        credentials were found, the variables obstore reads them from); a missing object stays FileNotFoundError."""
        try:
            yield
        except FileNotFoundError:
            raise
        except self._errors as error:
            raise BlobStorageError(self._explain(action, key, error)) from None

    def _explain(self, action: str, key: str, error: Exception) -> str:
        text = str(error)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        code = re.search(r"<Code>([^<]+)</Code>", text)
        what = (lines[0] if lines else type(error).__name__) + (f" ({code.group(1)})" if code else "")
        where = self.describe(key) if key else self.url
        message = f"object storage failed to {action} {where}: {what}"
        credentials = _CREDENTIALS[self.family]
        if any(sign in text.lower() for sign in _NO_CREDENTIALS):
            return (f"no credentials for {self.url}: obstore found none in the environment ({what}); set "
                    f"{credentials}")
        if type(error).__name__ in ("PermissionDeniedError", "UnauthenticatedError") or "403" in text:
            return (f"{message}. The server refused the credentials or their permissions: obstore reads them from "
                    f"{credentials}")
        return message

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
        with self._translated("read", key):
            data = bytes(self._obstore.get_range(self.store, check_key(key), start=start, length=length))
        self.counter.add(len(data))
        return data

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ``(start, length)`` ranges of one object, fetched concurrently; ranges less than ``COALESCE``
        bytes apart travel in one request (the counter counts what travelled, gaps included)."""
        wanted = [(a, n) for a, n in ranges if n > 0]
        if not wanted:
            return [b"" for _ in ranges]
        with self._translated("read", key):
            pieces = iter(self._obstore.get_ranges(
                self.store, check_key(key), starts=[a for a, _ in wanted], lengths=[n for _, n in wanted],
                coalesce=COALESCE,
            ))
        out = [bytes(next(pieces)) if n > 0 else b"" for _, n in ranges]
        spans = _coalesced(wanted)
        self.counter.add(sum(z - a for a, z in spans), len(spans))
        return out

    def read(self, key: str) -> bytes:
        with self._translated("read", key):
            data = bytes(self._obstore.get(self.store, check_key(key)).bytes())
        self.counter.add(len(data))
        return data

    def size(self, key: str) -> int:
        with self._translated("read", key):
            return int(self._obstore.head(self.store, check_key(key))["size"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def write(self, key: str, data: bytes) -> None:
        """One upload: readers see no object or all of it."""
        with self._translated("write", key):
            self._obstore.put(self.store, check_key(key), data)

    def delete(self, key: str) -> None:
        try:
            with self._translated("delete", key):
                self._obstore.delete(self.store, check_key(key))
        except FileNotFoundError:
            pass

    def entries(self) -> Iterator[tuple[str, int, float]]:
        """``(key, size, modified)`` of every object under the prefix (for gc of orphans)."""
        with self._translated("list"):
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


def open_objects(location: str | os.PathLike, timeout: float | None = None, **options) -> BlobBackend:
    """A backend for a local folder (a path or ``file://`` URL) or an object store URL (``s3://bucket/prefix``;
    also ``gs://`` and ``az://``). Other schemes are refused (``InvalidArgumentError``); without obstore,
    ``MissingExtraError`` names the ``[s3]`` extra.

    ``options`` go to obstore's ``from_url`` (e.g. ``endpoint=``, ``region=``); credentials normally come from the
    environment (see the module docstring). ``timeout``: see :class:`ObstoreObjects` (a local folder has none).
    Opening creates nothing: a local folder is created by the first write into it.
    """
    if isinstance(location, os.PathLike):
        return LocalBlobs(location, create=False)
    if not isinstance(location, str) or not location:
        raise InvalidArgumentError(f"a blob location is a folder or a URL such as s3://bucket/prefix, got {location!r}")
    parsed = urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgumentError(f"{location!r}: a file:// URL names a local folder (file:///path)")
        return LocalBlobs(unquote(parsed.path), create=False)
    if len(parsed.scheme) <= 1:  # no scheme, or a Windows drive letter
        return LocalBlobs(location, create=False)
    if parsed.scheme.lower() not in OBJECT_SCHEMES:
        raise InvalidArgumentError(
            f"blob URL {location!r}: the scheme {parsed.scheme!r} is not supported; use s3://bucket/prefix (also "
            "gs://bucket/prefix, az://container/prefix) or a local folder (a path or file:///folder)")
    if not parsed.netloc:
        raise InvalidArgumentError(f"blob URL {location!r} names no bucket: use {parsed.scheme}://bucket/prefix")
    return ObstoreObjects(location, timeout, **options)
