"""What the store returns: frozen records built from its rows (never live ORM objects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from .schema import Cache, Document, Segment


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
    id: int  # never reused (AUTOINCREMENT), but the load path keys on payload_sha256 anyway
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
    kv_nbytes: int  # keys + values of this document's own entries (the shared template prefix is not counted)
    full_nbytes: int  # the uncompressed cache of the same tokens, prefix included
    prefix_length: int
    context_length: int
    sha256: str  # of the blob file
    created: datetime
    payload_sha256: str = ""  # of the blob's tensors: binds the blob to this row
    prefix_nbytes: int = 0  # keys + values of the shared prefix (stored once per model and template)
    kv_bits: int = 16  # 16: the cache dtype; 8 or 4: quantized keys and values (kvzip_rag.quant)

    @property
    def kept_fraction(self) -> float:
        """Bytes this document adds to the store over its full cache's bytes (e.g. 0.25 at ratio 0.3 on a
        200-token document: the template prefix is shared, not stored again)."""
        return self.kv_nbytes / max(self.full_nbytes, 1)


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
    cache: CacheRecord | None = field(default=None, repr=False)  # the one that serves it (search with kind=)


@dataclass(frozen=True)
class CacheRef:
    """A stored cache as routing saw it: its row id and the hash of its tensors. Loading by it fails with
    ``CacheChangedError`` when the row is gone or holds another cache (the document was replaced meanwhile)."""

    id: int
    payload_sha256: str


@dataclass(frozen=True)
class VerifyProblem:
    cache_id: int | None  # None: the segment has no cache row at all
    document_id: str
    segment_index: int
    blob_path: str | None
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
    removed: list[str] = field(default_factory=list)  # relative paths of orphan blobs, temp files, unused prefixes
    freed_nbytes: int = 0
    prefixes: list[str] = field(default_factory=list)  # model names of the unused shared prefixes removed
    missing: list[int] = field(default_factory=list)  # cache ids whose blob is gone (see verify())


def segment_label(document_id: str, segment_index: int) -> str:
    """How messages name one segment of a document."""
    return f"document {document_id!r} segment {segment_index}"


def segment_record(s: Segment) -> SegmentRecord:
    return SegmentRecord(s.id, s.document_id, s.index, s.text, s.token_count, s.char_start, s.char_end)


def cache_record(c: Cache, segment: Segment, prefix_nbytes: int = 0) -> CacheRecord:
    return CacheRecord(
        id=c.id, document_id=segment.document_id, segment_id=segment.id, segment_index=segment.index,
        model_name=c.model_name, model_fingerprint=c.model_fingerprint, template_digest=c.template_digest,
        ratio=c.ratio, level=c.level, scorer=c.scorer, blob_path=c.blob_path, nbytes=c.nbytes,
        kv_nbytes=c.kv_nbytes, full_nbytes=c.full_nbytes, prefix_length=c.prefix_length,
        context_length=c.context_length, sha256=c.sha256, created=c.created, payload_sha256=c.payload_sha256,
        prefix_nbytes=prefix_nbytes, kv_bits=c.kv_bits if c.kv_bits is not None else 16,
    )


def document_record(d: Document, prefix_nbytes: dict[int, int] | None = None) -> DocumentRecord:
    sizes = prefix_nbytes or {}
    segments = sorted(d.segments, key=lambda s: s.index)
    return DocumentRecord(
        id=d.id, content_hash=d.content_hash, text=d.text, metadata=dict(d.meta or {}), created=d.created,
        segments=tuple(segment_record(s) for s in segments),
        caches=tuple(cache_record(c, s, sizes.get(c.prefix_id, 0))
                     for s in segments for c in sorted(s.caches, key=lambda c: c.id)),
    )
