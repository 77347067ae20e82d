"""CacheStore: documents, segments and compressed caches as SQL rows plus one safetensors blob per cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
import torch
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from kvzip_rag.budget import check_ratio_level
from kvzip_rag.cache import PackedCache, PackedLayer
from kvzip_rag.errors import (
    CorruptBlobError,
    EmptyDocumentError,
    InvalidArgumentError,
    KVzipError,
    ModelMismatchError,
)

from .blob import (
    ReadStats,
    check_model,
    fsync_dir,
    new_blob_name,
    read_blob,
    verify_blob,
    write_blob,
)
from .schema import Cache, Document, Segment, create_schema, make_engine, search_segments, writer
from .segment import segment_document


DB_NAME = "index.sqlite"
BLOB_DIR_NAME = "blobs"
DEFAULT_CACHE_BYTES = 1 << 30
Progress = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SegmentRecord:
    id: int
    document_id: str
    index: int
    text: str
    token_count: int
    char_start: int
    char_end: int


@dataclass(frozen=True)
class CacheRecord:
    id: int
    document_id: str
    segment_id: int
    segment_index: int
    model_name: str
    model_fingerprint: str
    template_digest: str
    ratio: float
    level: str
    scorer: str
    blob_path: str  # relative to the store's blob dir
    nbytes: int  # size of the blob file
    kv_nbytes: int  # keys + values inside it
    full_nbytes: int  # the uncompressed cache of the same tokens
    prefix_length: int
    context_length: int
    sha256: str
    created: datetime


@dataclass(frozen=True)
class DocumentRecord:
    id: str
    content_hash: str
    text: str = field(repr=False)
    metadata: dict
    created: datetime
    segments: tuple[SegmentRecord, ...] = field(repr=False)
    caches: tuple[CacheRecord, ...] = field(repr=False)

    @property
    def token_count(self) -> int:
        return sum(s.token_count for s in self.segments)


@dataclass(frozen=True)
class SearchHit:
    document_id: str
    segment_id: int
    segment_index: int
    score: float  # higher is better (BM25 on SQLite, ts_rank on PostgreSQL, matched terms elsewhere)
    text: str = field(repr=False)
    metadata: dict = field(repr=False)


@dataclass(frozen=True)
class VerifyProblem:
    cache_id: int
    document_id: str
    segment_index: int
    blob_path: str
    error: str


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GCReport:
    removed: list[str] = field(default_factory=list)  # blob-dir relative paths of orphan blobs / temp files
    freed_nbytes: int = 0
    missing: list[int] = field(default_factory=list)  # cache ids whose blob is gone (see verify())


def _segment_record(s: Segment) -> SegmentRecord:
    return SegmentRecord(s.id, s.document_id, s.index, s.text, s.token_count, s.char_start, s.char_end)


def _cache_record(c: Cache, segment: Segment) -> CacheRecord:
    return CacheRecord(
        id=c.id, document_id=segment.document_id, segment_id=segment.id, segment_index=segment.index,
        model_name=c.model_name, model_fingerprint=c.model_fingerprint, template_digest=c.template_digest,
        ratio=c.ratio, level=c.level, scorer=c.scorer, blob_path=c.blob_path, nbytes=c.nbytes,
        kv_nbytes=c.kv_nbytes, full_nbytes=c.full_nbytes, prefix_length=c.prefix_length,
        context_length=c.context_length, sha256=c.sha256, created=c.created,
    )


def _document_record(d: Document) -> DocumentRecord:
    segments = sorted(d.segments, key=lambda s: s.index)
    return DocumentRecord(
        id=d.id, content_hash=d.content_hash, text=d.text, metadata=dict(d.meta or {}), created=d.created,
        segments=tuple(_segment_record(s) for s in segments),
        caches=tuple(_cache_record(c, s) for s in segments for c in sorted(s.caches, key=lambda c: c.id)),
    )


# ----------------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Kind:
    """What distinguishes two caches of the same segment."""

    fingerprint: str
    template: str
    ratio: float
    level: str
    scorer: str

    def matches(self, c: Cache) -> bool:
        return (c.model_fingerprint, c.template_digest, c.level, c.scorer) == (
            self.fingerprint, self.template, self.level, self.scorer
        ) and abs(c.ratio - self.ratio) < 1e-9


def _scorer_name(scorer, level: str) -> str:
    from kvzip_rag.compress import resolve_scorer

    return "kvzip-head" if level == "head" else resolve_scorer(scorer).name


def _content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _check_doc_id(doc_id) -> str:
    if not isinstance(doc_id, str) or not doc_id or len(doc_id) > 255 or "\x00" in doc_id:
        raise InvalidArgumentError(f"a document id is a non-empty string of at most 255 characters, got {doc_id!r}")
    return doc_id


def _check_metadata(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise InvalidArgumentError("metadata must be a dict with string keys")
    try:
        return json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise InvalidArgumentError(f"metadata must be JSON-serialisable: {error}") from error


_SQLITE_SAFE_KEY = re.compile(r"[A-Za-z0-9_\- ]{1,200}")


def _fresh(cache: PackedCache) -> PackedCache:
    """A new PackedCache sharing the (never mutated) packed tensors, with its own empty tails."""
    layers = [
        PackedLayer(x.keys, x.values, x.offsets, x.positions, x.scores, x.base_length, x.compressed, x.sliding_window)
        for x in cache.layers
    ]
    return PackedCache(layers, cache.info)


class _LRU:
    """Loaded caches by key, evicted least-recently-used first beyond a byte budget (thread-safe)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.items: OrderedDict[tuple, PackedCache] = OrderedDict()
        self.nbytes = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            cache = self.items.get(key)
            if cache is not None:
                self.items.move_to_end(key)
            return cache

    def put(self, key, cache: PackedCache) -> None:
        size = cache.nbytes
        with self.lock:
            if key in self.items or size > self.max_bytes:
                return
            self.items[key] = cache
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.nbytes -= old.nbytes

    def drop(self, cache_ids: Iterable[int]) -> None:
        ids = set(cache_ids)
        with self.lock:
            for key in [k for k in self.items if k[0] in ids]:
                self.nbytes -= self.items.pop(key).nbytes

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.nbytes = 0


# ----------------------------------------------------------------------------------------------------- the store


class CacheStore:
    """Documents, their segments and compressed caches: SQL rows + one safetensors blob per cache.

    ``CacheStore(path)`` keeps ``index.sqlite`` and ``blobs/`` in the folder ``path`` (default: the user data dir,
    or ``$KVZIP_RAG_STORE``). ``CacheStore(url="postgresql+psycopg2://...", blob_dir=...)`` takes any SQLAlchemy URL;
    blobs always live on the local file system. ``cache_bytes`` bounds the in-memory LRU of loaded caches.
    Safe to use from several threads and processes at once.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        url: str | None = None,
        blob_dir: str | os.PathLike | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        engine_options: dict | None = None,
    ):
        if url is None:
            if path is None:
                env = os.environ.get("KVZIP_RAG_STORE")
                if env:
                    path = env
                else:
                    import platformdirs

                    path = Path(platformdirs.user_data_dir("kvzip-rag")) / "store"
            self.path: Path | None = Path(path).expanduser().resolve()
            self.path.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{self.path / DB_NAME}"
            blob_dir = blob_dir or self.path / BLOB_DIR_NAME
        else:
            if path is not None:
                raise InvalidArgumentError("give either a store folder (path) or a database url, not both")
            self.path = None
            if blob_dir is None:
                database = sa.engine.make_url(url)
                if database.get_backend_name() == "sqlite" and database.database not in (None, "", ":memory:"):
                    blob_dir = Path(database.database).expanduser().resolve().parent / BLOB_DIR_NAME
                else:
                    raise InvalidArgumentError(
                        f"a store on {database.get_backend_name()} needs blob_dir= (a local folder)"
                    )
        self.blob_dir = Path(blob_dir).expanduser().resolve()
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.engine = make_engine(url, **(engine_options or {}))
        self._writer = writer(self.engine)
        self.search_method = create_schema(self.engine)  # "fts5", "postgres" or "terms"
        self._lru = _LRU(cache_bytes)
        self.last_read_nbytes = 0  # bytes read from disk by the latest load_cache (0 when served from memory)

    # -------------------------------------------------------------------------------------------- plumbing

    def copy_to(self, dest: str | os.PathLike) -> None:
        """Copy this folder store into ``dest`` (a consistent database snapshot plus hard-linked blobs).

        Used to make a persisted LlamaIndex folder self-contained; a crash at any step leaves no row in ``dest``
        that points at a missing blob. Only folder (SQLite) stores can be copied.
        """
        if self.path is None:
            raise InvalidArgumentError("only a folder (SQLite) store can be copied; this one is at a database URL")
        _copy_store(self, Path(dest))

    def close(self) -> None:
        self._lru.clear()
        self.engine.dispose()

    def __enter__(self) -> "CacheStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"CacheStore(url={url!r}, blob_dir={str(self.blob_dir)!r})"

    def _read(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _write(self) -> Session:
        return Session(self._writer, expire_on_commit=False)

    def _blob(self, relative: str) -> Path:
        path = (self.blob_dir / relative).resolve()
        if self.blob_dir not in path.parents:  # rows are ours, but never follow one outside the blob dir
            raise CorruptBlobError(f"blob path {relative!r} points outside the blob folder; refusing it")
        return path

    def _label(self, document_id: str, segment_index: int) -> str:
        return f"document {document_id!r} segment {segment_index}"

    def _remove_blobs(self, relatives: Iterable[str]) -> None:
        dirs = set()
        for relative in relatives:
            try:
                path = self._blob(relative)
                path.unlink()
                dirs.add(path.parent)
            except (FileNotFoundError, CorruptBlobError):
                pass
        for directory in dirs:
            fsync_dir(directory)

    # -------------------------------------------------------------------------------------------- documents

    def __len__(self) -> int:
        with self._read() as session:
            return session.scalar(sa.select(sa.func.count()).select_from(Document)) or 0

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self.get_document(doc_id) is not None

    def _load_document(self, session: Session, doc_id: str) -> Document | None:
        stmt = (
            sa.select(Document)
            .where(Document.id == doc_id)
            .options(selectinload(Document.segments).selectinload(Segment.caches))
        )
        return session.scalars(stmt).first()

    def get_document(self, doc_id: str) -> DocumentRecord | None:
        """The document with its segments and caches, or None."""
        with self._read() as session:
            document = self._load_document(session, doc_id)
            return _document_record(document) if document else None

    def list_documents(
        self, *, metadata: dict | None = None, limit: int | None = None, offset: int = 0
    ) -> list[DocumentRecord]:
        """Documents in insertion order (id order within a second), optionally only those whose metadata has
        all the given ``key: value`` pairs."""
        with self._read() as session:
            stmt = sa.select(Document).options(selectinload(Document.segments).selectinload(Segment.caches))
            condition = self._metadata_condition(session, metadata)
            if condition is not None:
                stmt = stmt.where(condition)
            stmt = stmt.order_by(Document.created, Document.id).offset(offset)
            if limit is not None:
                stmt = stmt.limit(limit)
            return [_document_record(d) for d in session.scalars(stmt)]

    def delete_document(self, doc_id: str) -> bool:
        """Remove the document's rows, then its blobs. False if there was no such document."""
        with self._write() as session, session.begin():
            document = self._load_document(session, doc_id)
            if document is None:
                return False
            caches = [(c.id, c.blob_path) for s in document.segments for c in s.caches]
            session.delete(document)
        # Rows first: a crash here leaves orphan blobs (gc removes them), never rows without blobs.
        self._lru.drop(c for c, _ in caches)
        self._remove_blobs(p for _, p in caches)
        return True

    def add_document(
        self,
        model,
        text: str,
        *,
        doc_id: str | None = None,
        metadata: dict | None = None,
        ratio: float = 0.3,
        level: str = "pair",
        scorer: str = "kvzip",
        force: bool = False,
        max_segment_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> DocumentRecord:
        """Segment, compress and store ``text``; returns the stored document.

        ``doc_id`` defaults to a hash of the text. Re-adding the same text under the same id is a no-op when caches
        of this model, template, ratio, level and scorer already exist (only metadata given here is updated);
        missing caches are added. ``force=True`` recompresses them, and is required to replace a document whose id
        exists with other text. ``max_segment_tokens`` defaults to ``default_max_tokens(model)``.
        """
        if not isinstance(text, str) or not text.strip():
            raise EmptyDocumentError("the document is empty or whitespace only; there is nothing to compress")
        check_ratio_level(ratio, level)
        kind = _Kind(model.fingerprint, model.template.digest, float(ratio), level, _scorer_name(scorer, level))
        content_hash = _content_hash(text)
        doc_id = _check_doc_id(doc_id) if doc_id is not None else content_hash[:32]
        meta = _check_metadata(metadata) if metadata is not None else None
        with self._read() as session:
            existing = self._load_document(session, doc_id)
            existing = _document_record(existing) if existing else None
        if existing is not None and existing.content_hash == content_hash:
            return self._ensure_caches(existing, model, kind, scorer, force=force, metadata=meta, progress=progress)
        if existing is not None and not force:
            raise InvalidArgumentError(
                f"document {doc_id!r} already exists with different text; delete it first or pass force=True to "
                "replace it"
            )
        pieces = segment_document(model, text, max_segment_tokens)
        written: list[str] = []
        try:
            caches = []
            for index, piece in enumerate(pieces):
                caches.append(self._compress_one(model, piece.text, kind, scorer, written, progress))
                if progress:
                    progress("compress", index + 1, len(pieces))
            self._touch(written)
            with self._write() as session, session.begin():
                old = self._load_document(session, doc_id)
                old_blobs = []
                if old is not None:  # stored by another writer since we looked
                    if not force:
                        if old.content_hash == content_hash:
                            raise _Raced()
                        raise InvalidArgumentError(
                            f"document {doc_id!r} already exists with different text; delete it first or pass "
                            "force=True to replace it"
                        )
                    old_blobs = [(c.id, c.blob_path) for s in old.segments for c in s.caches]
                    session.delete(old)
                    session.flush()
                document = Document(id=doc_id, content_hash=content_hash, text=text, meta=meta or {})
                for index, (piece, cache_row) in enumerate(zip(pieces, caches)):
                    segment = Segment(index=index, text=piece.text, token_count=piece.token_count,
                                      char_start=piece.char_start, char_end=piece.char_end)
                    segment.caches.append(cache_row)
                    document.segments.append(segment)
                session.add(document)
        except _Raced:
            self._remove_blobs(written)
            return self.add_document(model, text, doc_id=doc_id, metadata=metadata, ratio=ratio, level=level,
                                     scorer=scorer, force=False, max_segment_tokens=max_segment_tokens)
        except IntegrityError:
            self._remove_blobs(written)
            if force:
                raise
            # Another process added this id meanwhile: same text -> their caches serve us; other text -> error.
            return self.add_document(model, text, doc_id=doc_id, metadata=metadata, ratio=ratio, level=level,
                                     scorer=scorer, force=False, max_segment_tokens=max_segment_tokens)
        except BaseException:
            self._remove_blobs(written)
            raise
        if old_blobs:
            self._lru.drop(c for c, _ in old_blobs)
            self._remove_blobs(p for _, p in old_blobs)
        return self.get_document(doc_id)

    def _touch(self, relatives: list[str]) -> None:
        """Refresh blob mtimes right before the rows commit, so gc's age guard covers slow multi-segment adds."""
        now = time.time()
        for relative in relatives:
            os.utime(self._blob(relative), (now, now))

    def _compress_one(
        self, model, text: str, kind: _Kind, scorer, written: list[str], progress: Progress | None = None
    ) -> Cache:
        """Compress one segment and write its blob; returns the (unsaved) row."""
        from kvzip_rag.compress import compress

        cache = compress(model, text, ratio=kind.ratio, level=kind.level, scorer=scorer, progress=progress)
        name = new_blob_name()
        relative = f"{name[:2]}/{name}"
        path = self.blob_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        result = write_blob(cache, path)
        written.append(relative)
        info = cache.info
        return Cache(
            model_name=info.model_name, model_fingerprint=info.model_fingerprint,
            template_digest=info.template_digest, ratio=kind.ratio, level=kind.level, scorer=info.scorer,
            blob_path=relative, nbytes=result.nbytes, kv_nbytes=result.kv_nbytes, full_nbytes=info.full_nbytes,
            prefix_length=info.prefix_length, context_length=info.context_length, sha256=result.sha256,
        )

    def _ensure_caches(
        self, document: DocumentRecord, model, kind: _Kind, scorer, *, force: bool, metadata: dict | None,
        progress: Progress | None, drop_others: bool = False,
    ) -> DocumentRecord:
        """Add (or with ``force`` replace) the caches of ``kind`` for every segment of an existing document."""
        have = {c.segment_id: c for c in document.caches if _matches_record(kind, c)}
        todo = [s for s in document.segments if force or s.id not in have]
        others = [c for c in document.caches
                  if c.model_fingerprint == kind.fingerprint and not _matches_record(kind, c)]
        if not todo and (metadata is None or metadata == document.metadata) and not (drop_others and others):
            return document  # the no-op
        written: list[str] = []
        replaced: list[tuple[int, str]] = []
        try:
            rows = {}
            for done, segment in enumerate(todo):
                rows[segment.id] = self._compress_one(model, segment.text, kind, scorer, written, progress)
                if progress:
                    progress("compress", done + 1, len(todo))
            self._touch(written)
            with self._write() as session, session.begin():
                current = self._load_document(session, document.id)
                if current is None or current.content_hash != document.content_hash:
                    raise KVzipError(f"document {document.id!r} was deleted or replaced while it was being compressed")
                if metadata is not None:
                    current.meta = metadata
                for segment in current.segments:
                    row = rows.get(segment.id)
                    for cache in list(segment.caches):
                        same = kind.matches(cache)
                        if (same and row is not None) or (drop_others and not same
                                                           and cache.model_fingerprint == kind.fingerprint):
                            replaced.append((cache.id, cache.blob_path))
                            segment.caches.remove(cache)
                    session.flush()
                    if row is not None:
                        segment.caches.append(row)
        except IntegrityError:
            # A concurrent add stored the same kind of cache first: theirs is as good as ours.
            self._remove_blobs(written)
            return self.get_document(document.id)
        except BaseException:
            self._remove_blobs(written)
            raise
        self._lru.drop(c for c, _ in replaced)
        self._remove_blobs(p for _, p in replaced)
        return self.get_document(document.id)

    def recompress(
        self,
        doc_id: str,
        model,
        *,
        ratio: float = 0.3,
        level: str = "pair",
        scorer: str = "kvzip",
        replace: bool = False,
        progress: Progress | None = None,
    ) -> DocumentRecord:
        """(Re)build the caches of ``doc_id`` for ``model`` at ``ratio``/``level``/``scorer``.

        Caches of that kind are rebuilt; other caches are kept unless ``replace=True``, which removes this model's
        caches at other ratios, levels or scorers (other models' caches are always kept).
        """
        check_ratio_level(ratio, level)
        with self._read() as session:
            document = self._load_document(session, doc_id)
            if document is None:
                raise KeyError(f"no document {doc_id!r} in this store")
            record = _document_record(document)
        kind = _Kind(model.fingerprint, model.template.digest, float(ratio), level, _scorer_name(scorer, level))
        return self._ensure_caches(record, model, kind, scorer, force=True, metadata=None, progress=progress,
                                   drop_others=replace)

    # -------------------------------------------------------------------------------------------- search

    def _metadata_condition(self, session: Session, metadata: dict | None):
        """SQL condition on Document for ``metadata`` equality; keys SQL cannot address safely go through Python."""
        if not metadata:
            return None
        metadata = _check_metadata(metadata)
        dialect = session.get_bind().dialect.name
        conditions, in_python = [], {}
        for key, value in metadata.items():
            condition = _sql_json_equals(dialect, key, value)
            if condition is None:
                in_python[key] = value
            else:
                conditions.append(condition)
        if in_python:
            ids = [
                doc_id for doc_id, meta in session.execute(sa.select(Document.id, Document.meta))
                if isinstance(meta, dict) and all(k in meta and meta[k] == v for k, v in in_python.items())
            ]
            conditions.append(Document.id.in_(ids))
        return sa.and_(*conditions)

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        doc_ids: Iterable[str] | None = None,
        metadata: dict | None = None,
    ) -> list[SearchHit]:
        """The ``k`` segments that best match ``query`` (full-text, best first), optionally only within ``doc_ids``
        and documents whose metadata has all the given ``key: value`` pairs."""
        if not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
        with self._read() as session:
            conditions = []
            if doc_ids is not None:
                ids = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
                conditions.append(Segment.document_id.in_(ids))
            condition = self._metadata_condition(session, metadata)
            if condition is not None:
                conditions.append(condition)
            where = sa.and_(*conditions) if conditions else None
            ranked = search_segments(session, query, k, where, method=self.search_method)
            if not ranked:
                return []
            rows = {
                s.id: (s, meta)
                for s, meta in session.execute(
                    sa.select(Segment, Document.meta)
                    .join(Document, Document.id == Segment.document_id)
                    .where(Segment.id.in_([r[0] for r in ranked]))
                )
            }
            return [
                SearchHit(rows[i][0].document_id, i, rows[i][0].index, score, rows[i][0].text, dict(rows[i][1] or {}))
                for i, score in ranked
                if i in rows
            ]

    # -------------------------------------------------------------------------------------------- caches

    def caches_for(self, doc_id: str, model=None, *, segment: int | None = None) -> list[CacheRecord]:
        """Stored caches of a document (of one segment index, of one model's fingerprint and template)."""
        with self._read() as session:
            stmt = sa.select(Cache, Segment).join(Segment, Segment.id == Cache.segment_id).where(
                Segment.document_id == doc_id
            )
            if segment is not None:
                stmt = stmt.where(Segment.index == segment)
            if model is not None:
                stmt = stmt.where(
                    Cache.model_fingerprint == model.fingerprint, Cache.template_digest == model.template.digest
                )
            stmt = stmt.order_by(Segment.index, Cache.ratio.desc(), Cache.id)
            return [_cache_record(c, s) for c, s in session.execute(stmt)]

    def _resolve(self, target, segment: int) -> tuple[int | None, int | None, str | None, int | None]:
        """(cache_id, segment_id, document_id, segment_index) from whatever load_cache was given."""
        if isinstance(target, CacheRecord):
            return target.id, None, None, None
        if isinstance(target, (SearchHit, SegmentRecord)):
            return None, target.segment_id if isinstance(target, SearchHit) else target.id, None, None
        if isinstance(target, bool):
            raise InvalidArgumentError(f"cannot load a cache from {target!r}")
        if isinstance(target, int):
            return target, None, None, None
        if isinstance(target, str):
            return None, None, target, segment
        raise InvalidArgumentError(
            "load_cache takes a document id (with segment=), a SearchHit, a SegmentRecord, a CacheRecord or a cache id"
        )

    def _pick(self, model, target, segment: int, ratio: float | None, level: str | None) -> CacheRecord:
        cache_id, segment_id, doc_id, segment_index = self._resolve(target, segment)
        with self._read() as session:
            if cache_id is not None:
                found = session.execute(
                    sa.select(Cache, Segment).join(Segment, Segment.id == Cache.segment_id).where(Cache.id == cache_id)
                ).first()
                if found is None:
                    raise KeyError(f"no cache {cache_id} in this store")
                record = _cache_record(*found)
                check_model(_as_info(record), model, self._label(record.document_id, record.segment_index))
                return record
            stmt = sa.select(Segment)
            if segment_id is not None:
                stmt = stmt.where(Segment.id == segment_id)
            else:
                stmt = stmt.where(Segment.document_id == doc_id, Segment.index == segment_index)
            seg = session.scalars(stmt.options(selectinload(Segment.caches))).first()
            if seg is None:
                if doc_id is not None and session.get(Document, doc_id) is None:
                    raise KeyError(f"no document {doc_id!r} in this store")
                raise KeyError(f"no such segment ({target!r}, segment {segment})")
            records = [_cache_record(c, seg) for c in seg.caches]
        label = self._label(seg.document_id, seg.index)
        mine = [c for c in records if c.model_fingerprint == model.fingerprint
                and c.template_digest == model.template.digest]
        if not mine:
            if records:
                built = ", ".join(sorted({f"{c.model_name} ({c.model_fingerprint})" for c in records}))
                raise ModelMismatchError(
                    f"{label} has caches built by {built} only, none by model {model.name!r} "
                    f"(fingerprint {model.fingerprint}) with its current template; call recompress() for this model"
                )
            raise KeyError(f"{label} has no cache")
        usable = []
        for c in mine:
            if ratio is not None and c.ratio + 1e-12 < ratio:
                continue
            if level is not None and level != c.level and (c.ratio < 1.0 or "head" in (level, c.level)):
                continue
            usable.append(c)
        if not usable:
            stored = ", ".join(f"ratio {c.ratio} level {c.level}" for c in mine)
            raise InvalidArgumentError(
                f"{label} is stored at {stored}; it cannot load at ratio {ratio} level {level or 'as stored'} "
                "(a cache loads at any lower ratio of its own level): recompress() it"
            )
        if ratio is None:  # the best stored cache
            return max(usable, key=lambda c: (c.level == (level or c.level), c.ratio, c.id))
        # the smallest stored cache that can serve the ratio: fewest bytes to read
        return min(usable, key=lambda c: (c.level != (level or c.level), c.ratio, -c.id))

    def load_cache(
        self,
        target,
        model,
        *,
        segment: int = 0,
        ratio: float | None = None,
        level: str | None = None,
        device: torch.device | str | None = None,
    ) -> PackedCache:
        """A ready-to-use ``PackedCache`` (empty tail) for ``model``.

        ``target``: a document id (with ``segment=`` index), a ``SearchHit``, a ``SegmentRecord``, a ``CacheRecord``
        or a cache id. ``ratio`` below the stored one reads only the kept entries (equal to ``at_ratio``). Every call
        returns a new object, so conversations never share tails; repeated loads are served from an in-memory LRU.
        """
        if ratio is not None or level is not None:
            check_ratio_level(ratio if ratio is not None else 1.0, level or "pair")
        record = self._pick(model, target, segment, ratio, level)
        device = torch.device(device) if device is not None else model.device
        ratio = record.ratio if ratio is None else float(ratio)
        level = level or record.level
        key = (record.id, ratio, level, str(device))
        cached = self._lru.get(key)
        if cached is not None:
            self.last_read_nbytes = 0
            return _fresh(cached)
        stats = ReadStats()
        cache = read_blob(
            self._blob(record.blob_path), ratio=ratio, level=level, model=model, device=device,
            label=self._label(record.document_id, record.segment_index), stats=stats,
        )
        self.last_read_nbytes = stats.nbytes
        self._lru.put(key, cache)
        return _fresh(cache)

    # -------------------------------------------------------------------------------------------- maintenance

    def verify(self, doc_ids: Iterable[str] | None = None) -> VerifyReport:
        """Check every blob (or those of ``doc_ids``): present, same sha256 as recorded, valid header and
        checksums, and describing the cache its row says. Problems are reported, nothing is changed."""
        report = VerifyReport()
        with self._read() as session:
            stmt = sa.select(Cache, Segment).join(Segment, Segment.id == Cache.segment_id)
            if doc_ids is not None:
                ids = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
                stmt = stmt.where(Segment.document_id.in_(ids))
            records = [_cache_record(c, s) for c, s in session.execute(stmt.order_by(Cache.id))]
        for record in records:
            report.checked += 1
            label = self._label(record.document_id, record.segment_index)
            try:
                header = verify_blob(self._blob(record.blob_path), record.sha256, label)
                info = header.info
                if (info.model_fingerprint, info.template_digest, info.level, info.context_length) != (
                    record.model_fingerprint, record.template_digest, record.level, record.context_length
                ) or abs(info.ratio - record.ratio) > 1e-9:
                    raise CorruptBlobError(f"{label}: the blob does not describe the cache its row records")
            except KVzipError as error:
                report.problems.append(
                    VerifyProblem(record.id, record.document_id, record.segment_index, record.blob_path, str(error))
                )
        return report

    def gc(self, *, min_age_s: float = 600.0, dry_run: bool = False) -> GCReport:
        """Remove blobs (and stale temp files) that no row points to and that are older than ``min_age_s``
        (younger ones may belong to an add still in progress in another process). Reports rows whose blob is
        missing in ``missing`` (``verify()`` says more)."""
        report = GCReport()
        with self._read() as session:
            referenced = dict(session.execute(sa.select(Cache.blob_path, Cache.id)).all())
        now = time.time()
        for path in sorted(self.blob_dir.rglob("*")):
            if not path.is_file():
                continue
            relative = path.relative_to(self.blob_dir).as_posix()
            if relative in referenced:
                continue
            if not (path.name.endswith(".safetensors") or path.name.endswith(".tmp")):
                continue  # not ours: never touch files we did not write
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if now - stat.st_mtime < min_age_s:
                continue
            report.removed.append(relative)
            report.freed_nbytes += stat.st_size
            if not dry_run:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        report.missing = sorted(cid for rel, cid in referenced.items() if not (self.blob_dir / rel).is_file())
        return report


class _Raced(Exception):
    """Another writer stored the same document between our check and our transaction."""


def _matches_record(kind: _Kind, c: CacheRecord) -> bool:
    return (c.model_fingerprint, c.template_digest, c.level, c.scorer) == (
        kind.fingerprint, kind.template, kind.level, kind.scorer
    ) and abs(c.ratio - kind.ratio) < 1e-9


def _as_info(record: CacheRecord):
    from kvzip_rag.cache import CacheInfo

    return CacheInfo(record.model_name, record.model_fingerprint, record.template_digest, record.prefix_length,
                     record.context_length, record.ratio, record.level, record.scorer, record.full_nbytes)


def _sql_json_equals(dialect: str, key: str, value):
    """``metadata[key] == value`` in SQL with the JSON type checked, or None when SQL can't say it safely."""
    if isinstance(value, (dict, list)):
        return None
    if dialect == "sqlite":
        if not _SQLITE_SAFE_KEY.fullmatch(key):
            return None  # SQLite JSON paths cannot quote every key: let Python compare
        path = f'$."{key}"'
        kind = sa.func.json_type(Document.meta, path)
        extract = sa.func.json_extract(Document.meta, path)
        if value is None:
            return kind == "null"
        if isinstance(value, bool):
            return kind == ("true" if value else "false")
        if isinstance(value, int):
            return sa.and_(kind.in_(["integer", "real"]), extract == value)
        if isinstance(value, float):
            return sa.and_(kind.in_(["integer", "real"]), extract == value)
        return sa.and_(kind == "text", extract == value)
    if dialect == "postgresql":
        element = Document.meta[key]
        kind = sa.func.json_typeof(element)
        if value is None:
            return kind == "null"
        if isinstance(value, bool):
            return sa.and_(kind == "boolean", element.as_string() == ("true" if value else "false"))
        if isinstance(value, (int, float)):  # CASE: never cast a non-number (PostgreSQL would raise)
            return sa.case((kind == "number", element.as_float()), else_=None) == float(value)
        return sa.and_(kind == "string", element.as_string() == value)
    return None


# ------------------------------------------------------------------------------------------ copying a store

def _sqlite_backup(source: Path, target: Path) -> None:
    """A consistent snapshot of ``source`` written into ``target`` (works while others use either database)."""
    src = sqlite3.connect(str(source), timeout=30)
    try:
        dst = sqlite3.connect(str(target), timeout=30)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(target.name + ".part")
    try:
        os.link(source, temp)
    except OSError:
        shutil.copy2(source, temp)
    os.replace(temp, target)


def _copy_store(store: CacheStore, dest: Path) -> None:
    """Copy a folder store into ``dest``: database snapshot to a staging file, referenced blobs (hard links: blobs
    are immutable), then the snapshot into place, then blobs no row references are removed. A crash at any step
    leaves no row in ``dest`` that points at a missing blob."""
    dest = dest.resolve()
    if store.path is not None and dest == store.path:
        return
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / (DB_NAME + ".staging")
    staging.unlink(missing_ok=True)
    _sqlite_backup(store.path / DB_NAME, staging)
    connection = sqlite3.connect(str(staging))
    try:
        referenced = {row[0] for row in connection.execute("SELECT blob_path FROM caches")}
    finally:
        connection.close()
    blob_root = dest / BLOB_DIR_NAME
    for relative in sorted(referenced):
        source = (store.blob_dir / relative).resolve()
        target = (blob_root / relative).resolve()
        if store.blob_dir not in source.parents or blob_root not in target.parents:
            raise KVzipError(f"refusing to copy blob path {relative!r}: it points outside the blob folder")
        if target.exists() and target.stat().st_size == source.stat().st_size:
            continue
        _link_or_copy(source, target)
    _sqlite_backup(staging, dest / DB_NAME)
    staging.unlink(missing_ok=True)
    for path in blob_root.rglob("*.safetensors"):
        if path.relative_to(blob_root).as_posix() not in referenced:
            path.unlink(missing_ok=True)
