"""CacheStore: documents, segments and compressed caches as SQL rows plus one blob per cache (storage only).

Compression lives in :mod:`.indexer` (``add_document``/``recompress`` delegate to an ``Indexer``), blob bytes in
:mod:`.blob` (format) and :mod:`.backends` (transport), the cache <-> blob mapping and ratio policy in
:mod:`.cachefile`, metadata filters in :mod:`.filters`, copying in :mod:`.backup`, full disks in :mod:`.reserve`,
the shared template prefix in :mod:`.prefixes`. Choosing and reading a cache for a question is in :mod:`.loading`,
verify/gc in :mod:`.maintenance`. Over 400 lines because it is the store's whole public API
(documents, search, loading, verify/gc/copy) plus the full-disk and read-only handling every write shares.

torch (and the cache, indexing and loading modules that need it) is imported only by the methods that compress,
load or verify caches: opening a store to list, search, delete or gc does not (``kvzip-rag ls`` starts fast).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from kvzip_rag.budget import AS_STORED, DEFAULT_BUDGET, Budget, CacheKind, select_cache
from kvzip_rag.checks import check_index
from kvzip_rag.errors import (
    DocumentNotFoundError,
    InvalidArgumentError,
    OrphanBlobWarning,
    StoreError,
    StoreFullError,
)
from kvzip_rag.paths import default_store_path

from . import maintenance
from .backends import BlobBackend, LocalBlobs, full_error, is_disk_full, new_blob_name
from .backup import copy_folder_store
from .blob import ReadStats
from .filters import metadata_condition
from .lru import CacheLRU
from .prefixes import SharedPrefixes
from .ranking import search_segments
from .records import (
    CacheRecord,
    DocumentRecord,
    GCReport,
    SearchHit,
    VerifyReport,
    cache_record,
    document_record,
    segment_label,
)
from .reserve import DiskReserve
from .schema import (
    Cache,
    Document,
    OldStoreError,
    Prefix,
    Segment,
    add_kv_bits,
    create_schema,
    lacks_kv_bits,
    make_engine,
    parse_url,
    schema_state,
    search_method,
    writer,
)
from .segment import MAX_SEGMENTS
from .validate import check_doc_id, check_k, check_page, check_query, doc_id_list

if TYPE_CHECKING:
    import torch

    from kvzip_rag.cache import PackedCache

    from .indexer import Indexer, Progress

DB_NAME = "index.sqlite"
BLOB_DIR_NAME = "blobs"
DEFAULT_CACHE_BYTES = 1 << 30
GC_MIN_AGE_S = 600.0


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK) if path.exists() else _writable(path.parent) if path.parent != path else False


def check_store_arguments(path, url, cache_bytes, max_segments, engine_options) -> None:
    """What a store is opened with, checked before anything is created (one-line ``InvalidArgumentError``s)."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"a store folder is a path, got {type(path).__name__}")
    if url is not None and not isinstance(url, str):
        raise InvalidArgumentError(f"a database url is a string, got {type(url).__name__}")
    check_index(cache_bytes, "cache_bytes")
    check_index(max_segments, "max_segments", 1)
    if engine_options is not None and not isinstance(engine_options, Mapping):
        raise InvalidArgumentError(f"engine_options is a dict of create_engine() options, got {engine_options!r:.80}")


class CacheStore:
    """Documents, their segments and compressed caches: SQL rows + one safetensors blob per cache.

    ``CacheStore(path)`` keeps ``index.sqlite`` and ``blobs/`` in the folder ``path`` (default: the user data dir,
    or ``$KVZIP_RAG_STORE``). ``CacheStore(url="postgresql+psycopg2://...", blob_dir=...)`` takes any SQLAlchemy URL;
    blobs live in the folder ``blob_dir``, at ``blob_url`` (``s3://bucket/prefix`` through obstore, credentials
    from its usual environment; or ``file:///folder``), or in any :class:`~kvzip_rag.store.backends.BlobBackend`
    given as ``blobs=``; ``blob_timeout`` (seconds) makes a request to an object store that is down fail in seconds
    (``kvzip-rag`` uses 5) instead of after obstore's 3 minutes of retries. ``cache_bytes`` bounds the in-memory
    LRU of loaded caches. A folder that
    cannot be written (a mounted snapshot) opens read-only (``read_only=None``, the default, decides by the file
    system); writes then raise ``StoreError``. Safe to use from several threads and processes at once.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        url: str | None = None,
        blob_dir: str | os.PathLike | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        engine_options: dict | None = None,
        read_only: bool | None = None,
        max_segments: int = MAX_SEGMENTS,
        blobs: BlobBackend | None = None,
        blob_url: str | None = None,
        blob_timeout: float | None = None,
    ):
        check_store_arguments(path, url, cache_bytes, max_segments, engine_options)
        self.blob_url: str | None = None  # the object store holding the blobs (None: a local folder or blobs=)
        if blob_url is not None:  # a folder (path or file://) or an object store (s3://bucket/prefix)
            if blobs is not None or blob_dir is not None:
                raise InvalidArgumentError("give one of blob_url=, blob_dir= and blobs=")
            from .objects import open_objects

            backend = open_objects(blob_url, blob_timeout)
            if isinstance(backend, LocalBlobs):
                blob_dir = backend.root
            else:
                blobs, self.blob_url = backend, blob_url
        database: Path | None = None
        if url is None:
            if path is None:
                path = default_store_path()
            self.path: Path | None = Path(path).expanduser().resolve()
            database = self.path / DB_NAME
            blob_dir = blob_dir or self.path / BLOB_DIR_NAME
        else:
            if path is not None:
                raise InvalidArgumentError("give either a store folder (path) or a database url, not both")
            self.path = None
            parsed = parse_url(url)
            if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
                database = Path(parsed.database).expanduser().resolve()
                blob_dir = blob_dir or database.parent / BLOB_DIR_NAME
            elif blob_dir is None and blobs is None:
                raise InvalidArgumentError(f"a store on {parsed.get_backend_name()} needs blob_dir= (a local folder)")
        if blobs is not None:  # another backend (object storage, ...): blob_dir is not used
            blob_dir = None
        self.blob_dir: Path | None = Path(blob_dir).expanduser().resolve() if blob_dir is not None else None
        if read_only is None:
            read_only = database is not None and database.exists() and not (
                _writable(database) and _writable(database.parent)
                and (self.blob_dir is None or _writable(self.blob_dir)))
        self.read_only = read_only
        self.max_segments = max_segments
        where = str(database or self.blob_dir)
        if not read_only:
            try:
                if self.path is not None:
                    self.path.mkdir(parents=True, exist_ok=True)
                if self.blob_dir is not None:
                    self.blob_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                if is_disk_full(error):
                    raise full_error(where, None, error) from error
                raise StoreError(f"cannot create the store at {where}: {error}") from error
        self.blobs: BlobBackend = blobs if blobs is not None else LocalBlobs(self.blob_dir, create=False)
        if url is None or (database is not None and read_only):
            url = f"sqlite:///{database}"
        self.url = url
        self._database = database
        self.engine = make_engine(url, read_only=read_only, **(engine_options or {}))
        disk = self.blob_dir or (database.parent if database is not None else None)
        self.reserve = DiskReserve(None if read_only else database, disk, self.engine)
        self._writer = writer(self.engine)
        self.search_method = self._open_schema(where)  # "fts5", "postgres" or "terms"
        self._lru = CacheLRU(cache_bytes)
        self.prefixes = SharedPrefixes(self)
        self.last_read_nbytes = 0  # bytes read from disk by the latest load_cache (0 when served from memory)
        self.reserve.keep()

    def _open_schema(self, where: str) -> str:
        """Check the schema with a read; create it only when missing (a full disk can still open a store)."""
        rebuild = (f"the store at {where} was written by an older kvzip-rag ({{}}); this version stores the "
                   "template prefix once per model (blob format kvzip-rag/2) and cannot read it. Rebuild it: index "
                   "the documents again into a new folder (kvzip-rag --store NEW index FILES), then delete the old one")
        try:
            with self.engine.connect() as connection:
                state = schema_state(connection)
            if state is None and not self.read_only:
                return self.reserve.retry(lambda: create_schema(self.engine), where)
            if state is None:
                raise StoreError(f"{where} holds no kvzip-rag store (and it is read-only, so none can be created)")
            if state != "2":
                raise OldStoreError(f"schema version {state}")
            if lacks_kv_bits(self.engine):
                if self.read_only:
                    raise StoreError(f"the store at {where} predates quantized caches; open it once writable to "
                                     "upgrade it (one column is added)")
                self.reserve.retry(lambda: add_kv_bits(self.engine), where)
            return search_method(self.engine)
        except OldStoreError as error:
            raise StoreError(rebuild.format(error)) from None
        except sa.exc.OperationalError as error:
            if is_disk_full(error.orig or error, self._database.parent if self._database else None):
                if self.reserve.release():
                    return self._open_schema(where)
                raise full_error(where, None, error.orig or error) from None
            raise StoreError(f"cannot open the store at {where}: {error.orig or error}") from None

    # -------------------------------------------------------------------------------------------- plumbing

    def copy_to(self, dest: str | os.PathLike) -> None:
        """Copy this folder store into ``dest`` (a consistent database snapshot plus hard-linked blobs).

        Used to make a persisted LlamaIndex folder self-contained; a crash at any step leaves no row in ``dest``
        that points at a missing blob. Only SQLite stores can be copied.
        """
        if self._database is None or self.blob_dir is None:
            raise InvalidArgumentError("only a folder (SQLite, local blobs) store can be copied")
        dest = Path(dest).resolve()
        if dest == self.path:
            return
        copy_folder_store(self._database, self.blob_dir, dest, DB_NAME, BLOB_DIR_NAME)

    def close(self) -> None:
        self._lru.clear()
        self.prefixes.clear()
        self.engine.dispose()

    def __enter__(self) -> "CacheStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        blobs = str(self.blob_dir) if self.blob_dir else self.blob_url or type(self.blobs).__name__
        return f"CacheStore(url={url!r}, blobs={blobs!r}{', read_only=True' if self.read_only else ''})"

    def indexer(self, model, **options) -> Indexer:
        """An :class:`~kvzip_rag.store.indexer.Indexer` compressing with ``model`` into this store."""
        from .indexer import Indexer

        options.setdefault("max_segments", self.max_segments)
        return Indexer(model, self, **options)

    def read_session(self) -> Session:
        """A session for reads (its objects stay usable after it closes)."""
        return Session(self.engine, expire_on_commit=False)

    def write_session(self) -> Session:
        """A session for one write transaction (``with store.write_session() as s, s.begin(): ...``)."""
        return Session(self._writer, expire_on_commit=False)

    def require_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"the store at {self.where} is open read-only (a read-only folder or "
                             "read_only=True): it can be searched and loaded, not changed")

    @property
    def where(self) -> str:
        """The store's location, for messages."""
        return str(self.path or self._database or self.blob_dir or self.url)

    # ---------------------------------------------------------------------------------- blobs

    def put_blob(self, data: bytes) -> str:
        """Write ``data`` as a new blob (before any row points at it); its generated name."""
        self.require_writable()
        name = new_blob_name()
        self.blobs.write(name, data)
        return name

    def _touch(self, names: list[str]) -> None:
        """Refresh blob mtimes right before the rows commit, so gc's age guard covers slow multi-segment adds."""
        touch = getattr(self.blobs, "touch", None)  # optional: object stores keep their own times
        for name in names:
            if touch is not None:
                touch(name)

    def remove_blobs(self, names: Iterable[str]) -> None:
        """Delete blobs (after the rows that pointed at them are gone; missing ones are fine)."""
        for name in names:
            self.blobs.delete(name)

    def _forget(self, blobs: list[tuple[str, str]], what: str = "the caches were replaced") -> None:
        """Drop caches whose rows are gone (``(payload_sha256, blob_path)``) from memory, then their blobs. The
        change is done once its rows commit, so a blob that cannot be removed (the object store refuses deletes,
        a read-only folder) is an orphan for ``gc``: an ``OrphanBlobWarning``, not an error."""
        self._lru.drop(p for p, _ in blobs)
        failed: list[str] = []
        for _, name in blobs:
            try:
                self.blobs.delete(name)
            except (StoreError, OSError) as error:
                failed.append(f"{self.blobs.describe(name)}: {error}")
        if failed:
            warnings.warn(f"{what}, but {len(failed)} of its old blob(s) could not be removed ({failed[0]}); "
                          "nothing refers to them: gc removes them once the blob storage allows it",
                          OrphanBlobWarning, stacklevel=3)

    # -------------------------------------------------------------------------------------------- documents

    def __len__(self) -> int:
        with self.read_session() as session:
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

    def _prefix_sizes(self, session: Session) -> dict[int, int]:
        return dict(session.execute(sa.select(Prefix.id, Prefix.kv_nbytes)).all())

    def get_document(self, doc_id: str) -> DocumentRecord | None:
        """The document with its segments and caches, or None."""
        check_doc_id(doc_id)
        with self.read_session() as session:
            document = self._load_document(session, doc_id)
            return document_record(document, self._prefix_sizes(session)) if document else None

    def _document_or_raise(self, doc_id: str) -> DocumentRecord:
        record = self.get_document(doc_id)
        if record is None:
            raise DocumentNotFoundError(f"no document {doc_id!r} in the store at {self.where}")
        return record

    def list_documents(
        self, *, metadata: dict | None = None, limit: int | None = None, offset: int = 0
    ) -> list[DocumentRecord]:
        """Documents in insertion order (id order within a second), optionally only those whose metadata has
        all the given ``key: value`` pairs; ``limit`` (>= 1) and ``offset`` (>= 0) page them."""
        check_page(limit, offset)
        with self.read_session() as session:
            stmt = sa.select(Document).options(selectinload(Document.segments).selectinload(Segment.caches))
            condition = metadata_condition(session, metadata)
            if condition is not None:
                stmt = stmt.where(condition)
            stmt = stmt.order_by(Document.created, Document.id).offset(offset)
            if limit is not None:
                stmt = stmt.limit(limit)
            sizes = self._prefix_sizes(session)
            return [document_record(d, sizes) for d in session.scalars(stmt)]

    def delete_document(self, doc_id: str) -> bool:
        """Remove the document's rows, then its blobs. False if there was no such document. Works on a full disk
        (the store's reserve file is given back for the database's journal)."""
        check_doc_id(doc_id)
        self.require_writable()

        def delete():
            with self.write_session() as session, session.begin():
                document = self._load_document(session, doc_id)
                if document is None:
                    return None
                caches = [(c.payload_sha256, c.blob_path) for s in document.segments for c in s.caches]
                session.delete(document)
            return caches

        caches = self.reserve.retry(delete, self.where)
        if caches is None:
            return False
        # Rows first: a crash here leaves orphan blobs (gc removes them), never rows without blobs.
        self._forget(caches, f"document {doc_id!r} was deleted")
        self.reserve.keep()
        return True

    def add_document(
        self,
        model,
        text: str,
        *,
        doc_id: str | None = None,
        metadata: dict | None = None,
        ratio: float = DEFAULT_BUDGET.ratio,
        level: str = DEFAULT_BUDGET.level,
        scorer: str = "kvzip",
        force: bool = False,
        max_segment_tokens: int | None = None,
        progress: Progress | None = None,
        kv_bits: int = 16,
    ) -> DocumentRecord:
        """Segment, compress and store ``text``; returns the stored document.

        ``doc_id`` defaults to a hash of the text. Re-adding the same text under the same id is a no-op when caches
        of this model, template, ratio, level and scorer already exist (only metadata given here is updated);
        missing caches are added. ``force=True`` recompresses them, and is required to replace a document whose id
        exists with other text. ``max_segment_tokens`` defaults to ``default_max_tokens(model)``. ``progress`` gets
        ``("segment", done, total)`` over segments (and the engine's ``prefill``/``score`` stages within one).
        ``kv_bits`` 8 or 4 stores the caches quantized (``kvzip_rag.quant``); a segment keeps one cache per ratio,
        level and scorer, so adding it again with other ``kv_bits`` replaces that cache.
        """
        return self.indexer(model, max_segment_tokens=max_segment_tokens).add(
            text, doc_id=doc_id, metadata=metadata, ratio=ratio, level=level, scorer=scorer, force=force,
            progress=progress, kv_bits=kv_bits,
        )

    def recompress(
        self, doc_id: str, model, *, ratio: float = DEFAULT_BUDGET.ratio, level: str = DEFAULT_BUDGET.level,
        scorer: str = "kvzip", replace: bool = False, progress: Progress | None = None, kv_bits: int = 16,
    ) -> DocumentRecord:
        """(Re)build the caches of ``doc_id`` for ``model`` at ``ratio``/``level``/``scorer``.

        Caches of that kind are rebuilt; other caches are kept unless ``replace=True``, which removes this model's
        caches at other ratios, levels or scorers (other models' caches are always kept).
        """
        return self.indexer(model).recompress(doc_id, ratio=ratio, level=level, scorer=scorer, replace=replace,
                                              progress=progress, kv_bits=kv_bits)

    # -------------------------------------------------------------------------------------------- search

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        doc_ids: Iterable[str] | None = None,
        metadata: dict | None = None,
        kind: CacheKind | None = None,
        budget: Budget = AS_STORED,
    ) -> list[SearchHit]:
        """The ``k`` segments that best match ``query`` (full-text, best first), optionally only within ``doc_ids``
        and documents whose metadata has all the given ``key: value`` pairs.

        ``kind``: only segments with a cache of that kind (a model's: ``CacheKind.of_model(model)``) are ranked,
        and each hit carries the cache that serves it at ``budget`` (:func:`kvzip_rag.budget.select_cache`; ``None``
        when its caches of that kind cannot serve the budget: loading it then says why)."""
        check_k(k)
        if query is None:
            return []
        check_query(query)
        with self.read_session() as session:
            conditions = []
            if doc_ids is not None:
                ids = doc_id_list(doc_ids)
                conditions.append(Segment.document_id.in_(ids))
            if kind is not None:
                conditions.append(sa.exists().where(Cache.segment_id == Segment.id,
                                                    Cache.model_fingerprint == kind.fingerprint,
                                                    Cache.template_digest == kind.template_digest))
            condition = metadata_condition(session, metadata)
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
            serving: dict[int, CacheRecord | None] = {}
            if kind is not None:
                sizes = self._prefix_sizes(session)
                found: dict[int, list[CacheRecord]] = {}
                for c, seg in session.execute(sa.select(Cache, Segment).join(Segment, Segment.id == Cache.segment_id)
                                              .where(Cache.segment_id.in_(list(rows)))):
                    found.setdefault(seg.id, []).append(cache_record(c, seg, sizes.get(c.prefix_id, 0)))
                serving = {i: select_cache(found.get(i, []), kind, budget) for i in rows}
            return [
                SearchHit(rows[i][0].document_id, i, rows[i][0].index, score, rows[i][0].text, dict(rows[i][1] or {}),
                          serving.get(i))
                for i, score in ranked
                if i in rows
            ]

    # -------------------------------------------------------------------------------------------- caches

    def caches_for(self, doc_id: str, model=None, *, segment: int | None = None) -> list[CacheRecord]:
        """Stored caches of a document (of one segment index, of one model's fingerprint and template); empty for
        a document that is not stored."""
        with self.read_session() as session:
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
            sizes = self._prefix_sizes(session)
            return [cache_record(c, s, sizes.get(c.prefix_id, 0)) for c, s in session.execute(stmt)]

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

        ``target``: a document id (with ``segment=`` index), a ``SearchHit``, a ``SegmentRecord``, a ``CacheRecord``,
        a ``CacheRef`` or a cache id (a ``CacheRef`` whose cache is gone or replaced: ``CacheChangedError``).
        ``ratio`` below the stored one reads only the kept entries (equal to ``at_ratio``). Every call returns a new
        object, so conversations never share tails; repeated loads are served from an in-memory LRU
        keyed by the blob's content hash. The blob is checked against its row on every read (``CorruptBlobError``
        when a valid blob lies under another document's row). A missing document: ``DocumentNotFoundError``.
        """
        import torch

        from kvzip_rag.cache import cache_info, packed_fresh

        from . import loading
        from .cachefile import check_loadable

        Budget(ratio, level)
        record, prefix_row = loading.pick(self, model, target, segment, ratio, level)
        device = str(torch.device(device) if device is not None else model.device)
        label = segment_label(record.document_id, record.segment_index)
        ratio, level = check_loadable(cache_info(record), ratio, level, label)
        key = (record.payload_sha256, ratio, level, device)
        cached = self._lru.get(key, record.payload_sha256)
        if cached is not None:
            self.last_read_nbytes = 0
            return packed_fresh(cached)
        stats = ReadStats()
        cache = loading.read_cache(self, record, prefix_row, ratio, level, stats).to(device)
        self.last_read_nbytes = stats.nbytes
        self._lru.put(key, record.payload_sha256, cache)
        return packed_fresh(cache)

    # -------------------------------------------------------------------------------------------- maintenance

    def verify(self, doc_ids: Iterable[str] | None = None) -> VerifyReport:
        """Check every blob (or those of ``doc_ids``) and the shared prefixes they use: present, same sha256 as
        recorded, valid header and checksums, built from its segment's text, describing the cache its row says.
        Problems are reported, nothing is changed."""
        return maintenance.verify(self, doc_ids)

    def gc(self, *, min_age_s: float = GC_MIN_AGE_S, dry_run: bool = False, now: bool = False) -> GCReport:
        """Remove blobs (and stale temp files) that no row points to, and shared template prefixes (row and blob)
        that no cache uses any more (every document of that model was deleted), when older than ``min_age_s``
        (default 600 s: younger ones may belong to an add still in progress in another process; a writer whose
        prefix is removed under it stores it again). ``now=True`` is ``min_age_s=0``: only for a quiet store,
        where no other process is indexing. Reports rows whose blob is missing in ``missing`` (``verify()`` says
        more). Works on a full disk."""
        return maintenance.collect_garbage(self, min_age_s=0.0 if now else min_age_s, dry_run=dry_run)

