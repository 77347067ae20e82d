"""Indexing: segment a document, compress each segment, store the blobs, then commit the rows in one transaction.

``Indexer(model, store)`` is usable on its own (a worker that only indexes); ``CacheStore.add_document`` and
``recompress`` delegate to it. Writes are ordered so that no row ever points at a missing or partial blob: blobs
first, rows in one transaction, blobs removed again when the transaction fails. What one ``add`` may write before
its rows exist is bounded: ``max_segments`` segments, and after the first blob the free space is checked against
the estimated total (``StoreFullError`` before the disk is filled, not after).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kvzip_rag.budget import DEFAULT_BUDGET, check_ratio_level, same_ratio
from kvzip_rag.cache import PackedCache, PrefixKV
from kvzip_rag.errors import InvalidArgumentError, KVzipError, ModelMismatchError, StoreError
from kvzip_rag.quant import check_bits

from .backends import full_error
from .cachefile import encode_document
from .records import CacheRecord, DocumentRecord
from .schema import Cache, Document, Prefix, Segment
from .segment import MAX_SEGMENTS, segment_document
from .validate import check_doc_id, check_metadata, check_text

Progress = Callable[[str, int, int], None]  # (stage, done, total)
PREFIX_TOLERANCE = 1e-2  # relative L2 difference between a document's own prefix KV and the stored one


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def scorer_name(scorer, level: str) -> str:
    from kvzip_rag.compression import resolve_scorer

    return resolve_scorer(scorer, level).name


@dataclass(frozen=True)
class CacheKind:
    """What distinguishes two caches of the same segment (one rule for rows and records)."""

    fingerprint: str
    template: str
    ratio: float
    level: str
    scorer: str
    kv_bits: int = 16

    def same_slot(self, c: Cache | CacheRecord) -> bool:
        """Same model, template, ratio, level and scorer: a segment holds one such cache, whatever its bits."""
        return (c.model_fingerprint, c.template_digest, c.level, c.scorer) == (
            self.fingerprint, self.template, self.level, self.scorer
        ) and same_ratio(c.ratio, self.ratio)

    def matches(self, c: Cache | CacheRecord) -> bool:
        return self.same_slot(c) and (c.kv_bits or 16) == self.kv_bits


class _Raced(Exception):
    """Another writer stored the same document between our check and our transaction."""


class _PrefixGone(Exception):
    """gc removed shared prefixes (ids in ``args[0]``) that the rows about to be committed use: no cache used
    them any more and they were older than gc's grace period."""


T = TypeVar("T")


def _hold_prefixes(session: Session, rows: list[Cache]) -> None:
    """Key-share lock the shared prefixes ``rows`` use until the transaction ends, so that gc cannot delete them
    before the rows reference them (SQLite: the write transaction already excludes gc's); ``_PrefixGone`` for
    those gc has already deleted."""
    wanted = {row.prefix_id for row in rows if row.prefix_id is not None}
    if wanted:
        held = set(session.scalars(sa.select(Prefix.id).where(Prefix.id.in_(wanted))
                                   .with_for_update(read=True, key_share=True)))
        if wanted - held:
            raise _PrefixGone(wanted - held)


class Indexer:
    """Compresses documents with ``model`` into ``store`` (a :class:`~kvzip_rag.store.CacheStore`)."""

    def __init__(self, model, store, *, max_segment_tokens: int | None = None, max_segments: int = MAX_SEGMENTS):
        self.model, self.store = model, store
        self.max_segment_tokens = max_segment_tokens
        self.max_segments = max_segments
        self._prefixes: dict[int, tuple[PrefixKV, str]] = {}  # prefix id -> (its keys/values, model name)

    def kind(self, ratio: float, level: str, scorer, kv_bits: int = 16) -> CacheKind:
        check_ratio_level(ratio, level)
        return CacheKind(self.model.fingerprint, self.model.template.digest, float(ratio), level,
                         scorer_name(scorer, level), check_bits(kv_bits))

    # ---------------------------------------------------------------------------------------------- adding

    def add(
        self, text: str, *, doc_id: str | None = None, metadata: dict | None = None,
        ratio: float = DEFAULT_BUDGET.ratio, level: str = DEFAULT_BUDGET.level, scorer="kvzip", force: bool = False,
        progress: Progress | None = None, kv_bits: int = 16,
    ) -> DocumentRecord:
        """See :meth:`CacheStore.add_document`."""
        text = check_text(text)
        kind = self.kind(ratio, level, scorer, kv_bits)
        digest = content_hash(text)
        doc_id = check_doc_id(doc_id) if doc_id is not None else digest[:32]
        meta = check_metadata(metadata) if metadata is not None else None
        self.store.require_writable()
        existing = self.store.get_document(doc_id)
        if existing is not None and existing.content_hash == digest:
            return self._ensure(existing, kind, scorer, force=force, metadata=meta, progress=progress)
        if existing is not None and not force:
            raise InvalidArgumentError(
                f"document {doc_id!r} already exists with different text; delete it first or pass force=True to "
                "replace it"
            )
        pieces = segment_document(self.model, text, self.max_segment_tokens)
        if len(pieces) > self.max_segments:
            raise InvalidArgumentError(
                f"the document splits into {len(pieces)} segments, more than this store's limit of "
                f"{self.max_segments} per document; split it into several documents or raise max_segments"
            )
        written: list[str] = []
        try:
            rows = self._compress([p.text for p in pieces], kind, scorer, written, progress)
            self.store._touch(written)
            old_blobs = self._commit_new(doc_id, digest, text, meta, pieces, rows, force)
        except _Raced:
            self.store.remove_blobs(written)
            return self.add(text, doc_id=doc_id, metadata=metadata, ratio=ratio, level=level, scorer=scorer,
                            progress=progress, kv_bits=kv_bits)
        except IntegrityError:
            self.store.remove_blobs(written)
            if force:
                raise
            # Another process added this id meanwhile: same text -> their caches serve us; other text -> error.
            return self.add(text, doc_id=doc_id, metadata=metadata, ratio=ratio, level=level, scorer=scorer,
                            progress=progress, kv_bits=kv_bits)
        except BaseException as error:
            self.store.remove_blobs(written)
            self.store.reserve.raise_if_full(error, self.store.where)
            raise
        self.store._forget(old_blobs)
        return self.store.get_document(doc_id)

    def _commit(self, rows: list[Cache], write: Callable[[Session], T]) -> T:
        """``write(session)`` in one write transaction that first holds the shared prefixes ``rows`` use. A prefix
        gc removed since it was looked up is stored again and the rows re-pointed at it (the document blobs do
        not depend on which row holds the prefix)."""
        for _ in range(3):
            try:
                with self.store.write_session() as session, session.begin():
                    _hold_prefixes(session, rows)
                    return write(session)
            except _PrefixGone as gone:
                for old_id in gone.args[0]:
                    prefix, model_name = self._prefixes.pop(old_id)
                    new_id, _ = self.store.prefixes.ensure(prefix, model_name)
                    self._prefixes[new_id] = (prefix, model_name)
                    for row in rows:
                        if row.prefix_id == old_id:
                            row.prefix_id = new_id
        raise StoreError(f"the shared prefix of model {self.model.name!r} was removed by gc three times while "
                         "these caches were being stored; run gc --now only when no other process is indexing")

    def _commit_new(self, doc_id, digest, text, meta, pieces, rows, force) -> list[tuple[str, str]]:
        def write(session: Session) -> list[tuple[str, str]]:
            old = self.store._load_document(session, doc_id)
            old_blobs = []
            if old is not None:  # stored by another writer since we looked
                if not force:
                    if old.content_hash == digest:
                        raise _Raced()
                    raise InvalidArgumentError(
                        f"document {doc_id!r} already exists with different text; delete it first or pass "
                        "force=True to replace it"
                    )
                old_blobs = [(c.payload_sha256, c.blob_path) for s in old.segments for c in s.caches]
                session.delete(old)
                session.flush()
            document = Document(id=doc_id, content_hash=digest, text=text, meta=meta or {})
            for index, (piece, row) in enumerate(zip(pieces, rows)):
                segment = Segment(index=index, text=piece.text, token_count=piece.token_count,
                                  char_start=piece.char_start, char_end=piece.char_end)
                segment.caches.append(row)
                document.segments.append(segment)
            session.add(document)
            return old_blobs

        return self._commit(rows, write)

    def recompress(
        self, doc_id: str, *, ratio: float = DEFAULT_BUDGET.ratio, level: str = DEFAULT_BUDGET.level,
        scorer="kvzip", replace: bool = False, progress: Progress | None = None, kv_bits: int = 16,
    ) -> DocumentRecord:
        """See :meth:`CacheStore.recompress`."""
        kind = self.kind(ratio, level, scorer, kv_bits)
        self.store.require_writable()
        record = self.store._document_or_raise(doc_id)
        return self._ensure(record, kind, scorer, force=True, metadata=None, progress=progress, drop_others=replace)

    def _ensure(
        self, document: DocumentRecord, kind: CacheKind, scorer, *, force: bool, metadata: dict | None,
        progress: Progress | None, drop_others: bool = False,
    ) -> DocumentRecord:
        """Add (or with ``force`` replace) the caches of ``kind`` for every segment of an existing document."""
        have = {c.segment_id for c in document.caches if kind.matches(c)}
        todo = [s for s in document.segments if force or s.id not in have]
        others = [c for c in document.caches if c.model_fingerprint == kind.fingerprint and not kind.matches(c)]
        if not todo and (metadata is None or metadata == document.metadata) and not (drop_others and others):
            return document  # the no-op
        self.store.require_writable()
        written: list[str] = []
        replaced: list[tuple[str, str]] = []
        try:
            built = self._compress([s.text for s in todo], kind, scorer, written, progress)
            rows = {s.id: row for s, row in zip(todo, built)}
            self.store._touch(written)

            def write(session: Session) -> None:
                current = self.store._load_document(session, document.id)
                if current is None or current.content_hash != document.content_hash:
                    raise KVzipError(f"document {document.id!r} was deleted or replaced while it was being compressed")
                if metadata is not None:
                    current.meta = metadata
                for segment in current.segments:
                    row = rows.get(segment.id)
                    for cache in list(segment.caches):
                        same = kind.same_slot(cache)  # the one cache of this ratio/level/scorer, any kv_bits
                        if (same and row is not None) or (drop_others and not same
                                                           and cache.model_fingerprint == kind.fingerprint):
                            replaced.append((cache.payload_sha256, cache.blob_path))
                            segment.caches.remove(cache)
                    session.flush()
                    if row is not None:
                        segment.caches.append(row)

            self._commit(list(rows.values()), write)
        except IntegrityError:
            # A concurrent add stored the same kind of cache first: theirs is as good as ours.
            self.store.remove_blobs(written)
            return self.store.get_document(document.id)
        except BaseException as error:
            self.store.remove_blobs(written)
            self.store.reserve.raise_if_full(error, self.store.where)
            raise
        self.store._forget(replaced)
        return self.store.get_document(document.id)

    # ---------------------------------------------------------------------------------------------- compressing

    def _compress(
        self, texts: list[str], kind: CacheKind, scorer, written: list[str], progress: Progress | None
    ) -> list[Cache]:
        """Compress and store every segment's blob; returns the (unsaved) rows."""
        from kvzip_rag.compression import compress

        rows: list[Cache] = []
        if progress:
            progress("segment", 0, len(texts))
        for index, text in enumerate(texts):
            cache = compress(self.model, text, ratio=kind.ratio, level=kind.level, scorer=scorer, progress=progress,
                             kv_bits=kind.kv_bits)
            rows.append(self._store_one(cache, kind, text, written))
            if index == 0 and len(texts) > 1:
                self._check_room(rows[0].nbytes * (len(texts) - 1))
            if progress:
                progress("compress", index + 1, len(texts))
                progress("segment", index + 1, len(texts))
        return rows

    def _check_room(self, needed: int) -> None:
        """Refuse before writing the remaining segments when they cannot fit (plus 5% and 1 MiB of slack)."""
        root = self.store.reserve.disk
        if root is None:
            return
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            return
        if free < needed * 1.05 + (1 << 20):
            raise full_error(str(root), int(needed * 1.05 + (1 << 20)) - free,
                             OSError(f"{free} bytes free, about {needed} needed for the remaining segments"))

    def _store_one(self, cache: PackedCache, kind: CacheKind, text: str, written: list[str]) -> Cache:
        prefix_id, _ = self._shared_prefix(cache)
        encoded = encode_document(cache, shared_prefix=True, segment_sha256=content_hash(text))
        name = self.store.put_blob(encoded.blob.data)
        written.append(name)
        info = cache.info
        return Cache(
            model_name=info.model_name, model_fingerprint=info.model_fingerprint,
            template_digest=info.template_digest, ratio=kind.ratio, level=kind.level, scorer=info.scorer,
            kv_bits=kind.kv_bits, blob_path=name, nbytes=len(encoded.blob.data), kv_nbytes=encoded.kv_nbytes,
            full_nbytes=info.full_nbytes, prefix_length=info.prefix_length, context_length=info.context_length,
            sha256=encoded.blob.sha256, payload_sha256=encoded.blob.payload_sha256, prefix_id=prefix_id,
        )

    def _shared_prefix(self, cache: PackedCache) -> tuple[int, PrefixKV]:
        """The stored prefix of this model and template (stored now if it is the first), checked against the
        document's own prefix: the same up to float rounding, or the model is not what its fingerprint says."""
        from kvzip_rag.cache import split_prefix

        own, _ = split_prefix(cache)
        prefix_id, stored = self.store.prefixes.ensure(own, cache.info.model_name)
        self._prefixes[prefix_id] = (stored, cache.info.model_name)
        for a, b in zip(own.keys + own.values, stored.keys + stored.values):
            a, b = a.detach().float().cpu(), b.float()
            if a.shape != b.shape or float((a - b).norm()) > PREFIX_TOLERANCE * (float(b.norm()) + 1e-6):
                raise ModelMismatchError(
                    f"model {cache.info.model_name!r} computes a template prefix unlike the one stored for its "
                    f"fingerprint {cache.info.model_fingerprint}; this store was built by another build of the model"
                )
        return prefix_id, stored


__all__ = ["CacheKind", "Indexer", "MAX_SEGMENTS", "content_hash", "scorer_name"]
