"""Loading a cache for a question: which stored cache serves (document, segment, model, ratio, level), and
reading it with its row checked against its blob (content hash) and the shared prefix joined."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from kvzip_rag.budget import Budget, CacheKind, same_ratio, select_cache
from kvzip_rag.cache import PackedCache, cache_info
from kvzip_rag.checks import check_index
from kvzip_rag.errors import (
    CacheChangedError,
    CorruptBlobError,
    DocumentNotFoundError,
    InvalidArgumentError,
    ModelMismatchError,
)

from .blob import BlobReader
from .cachefile import document_header, read_document
from .records import CacheRecord, CacheRef, SearchHit, SegmentRecord, cache_record, segment_label
from .schema import Cache, Document, Prefix, Segment
from .validate import check_doc_id


def segment_for(store, session: Session, target, segment: int) -> Segment:
    if isinstance(target, (SearchHit, SegmentRecord)):
        stmt = sa.select(Segment).where(Segment.id == (target.segment_id if isinstance(target, SearchHit)
                                                        else target.id))
    elif isinstance(target, str):
        check_doc_id(target)
        stmt = sa.select(Segment).where(Segment.document_id == target,
                                        Segment.index == check_index(segment, "segment"))
    else:
        raise InvalidArgumentError(
            "load_cache takes a document id (with segment=), a SearchHit, a SegmentRecord, a CacheRecord or a "
            "cache id"
        )
    found = session.scalars(stmt.options(selectinload(Segment.caches))).first()
    if found is None:
        doc_id = target if isinstance(target, str) else target.document_id
        if session.get(Document, doc_id) is None:
            raise DocumentNotFoundError(f"no document {doc_id!r} in the store at {store.where}")
        raise DocumentNotFoundError(f"document {doc_id!r} has no segment {segment} (it was re-added?)")
    return found

def pick(
    store, model, target, segment: int, ratio: float | None, level: str | None
) -> tuple[CacheRecord, Prefix | None]:
    """The stored cache that serves ``target`` for ``model`` at ``ratio``/``level``, with its prefix row."""
    with store.read_session() as session:
        if isinstance(target, (CacheRecord, CacheRef)) or (isinstance(target, int) and not isinstance(target, bool)):
            cache_id = check_index(target, "a cache id") if isinstance(target, int) else target.id
            found = session.execute(
                sa.select(Cache, Segment).join(Segment, Segment.id == Cache.segment_id).where(Cache.id == cache_id)
            ).first()
            if found is None:
                raise CacheChangedError(f"no cache {cache_id} in the store at {store.where} (deleted?)")
            record = cache_record(*found)
            if not isinstance(target, int) and target.payload_sha256 not in ("", record.payload_sha256):
                raise CacheChangedError(f"cache {cache_id} was replaced since it was listed; list it again")
            cache_info(record).check_model(model, segment_label(record.document_id, record.segment_index))
            prefix_id = found[0].prefix_id
            return record, session.get(Prefix, prefix_id) if prefix_id is not None else None
        seg = segment_for(store, session, target, segment)
        records = [cache_record(c, seg) for c in seg.caches]
        prefixes = {p.id: p for p in session.scalars(sa.select(Prefix))}
        rows = {c.id: c for c in seg.caches}
    label = segment_label(seg.document_id, seg.index)
    kind = CacheKind.of_model(model)
    mine = [c for c in records if kind.holds(c)]
    if not mine:
        if records:
            built = ", ".join(sorted({f"{c.model_name} ({c.model_fingerprint})" for c in records}))
            raise ModelMismatchError(
                f"{label} has caches built by {built} only, none by model {model.name!r} "
                f"(fingerprint {model.fingerprint}) with its current template; call recompress() for this model"
            )
        raise DocumentNotFoundError(f"{label} has no cache")
    best = select_cache(mine, kind, Budget(ratio, level))
    if best is None:
        stored = ", ".join(f"ratio {c.ratio} level {c.level}" for c in mine)
        raise InvalidArgumentError(
            f"{label} is stored at {stored}; it cannot load at ratio {ratio} level {level or 'as stored'} "
            "(a cache loads at any lower ratio of its own level): recompress() it"
        )
    return best, prefixes.get(rows[best.id].prefix_id)



def read_cache(store, record: CacheRecord, prefix_row: Prefix | None, ratio, level, stats) -> PackedCache:
    """``record``'s cache at ``ratio``/``level``, its blob checked against the row (content hash, then what the
    header describes) before anything else is read, the shared prefix joined."""
    label = segment_label(record.document_id, record.segment_index)
    with BlobReader(store.blobs, record.blob_path, label, stats) as reader:
        if reader.payload_sha256 != record.payload_sha256:
            raise CorruptBlobError(misplaced(store, reader, record, label))
        header = document_header(reader)
        info = header.info
        if (info.model_fingerprint, info.template_digest, info.level, info.context_length) != (
            record.model_fingerprint, record.template_digest, record.level, record.context_length
        ) or not same_ratio(info.ratio, record.ratio):
            raise CorruptBlobError(f"{label}: the blob does not describe the cache its row records")
        prefix = None
        if header.prefix == "shared":
            if prefix_row is None:
                raise CorruptBlobError(f"{label}: its shared template prefix is not in the store; run verify()")
            prefix = store.prefixes.load(prefix_row, "cpu")
        cache = read_document(reader, ratio=ratio, level=level, prefix=prefix)
    cache.quantized = None  # the memory cache holds the dequantized form only (faster first token on a hit)
    return cache


def misplaced(store, reader: BlobReader, record: CacheRecord, label: str) -> str:
    """A valid blob under the wrong row: say whose it is, when the store knows."""
    with store.read_session() as session:
        owner = session.execute(
            sa.select(Segment.document_id, Segment.index).join(Cache, Cache.segment_id == Segment.id)
            .where(Cache.payload_sha256 == reader.payload_sha256)
        ).first()
    whose = f"document {owner[0]!r} segment {owner[1]}'s cache" if owner else "a cache this store does not know"
    return (f"{label}: its blob file {record.blob_path} holds {whose}, not the one its row records (files "
            "swapped or restored from elsewhere?); refusing to answer from it. Run verify(), then delete and "
            "re-add the affected documents")
