"""Persistence: compressed caches as safetensors blobs, indexed in SQL (SQLite by default).

    >>> from kvzip_rag.store import CacheStore
    >>> store = CacheStore("~/my-store")                       # index.sqlite + blobs/ inside
    >>> store.add_document(model, text, doc_id="manual", metadata={"lang": "en"}, ratio=0.3)
    >>> hit = store.search("how do I reset the device?", k=1)[0]
    >>> cache = store.load_cache(hit, model)                   # a PackedCache with an empty tail
    >>> kvzip_rag.answer(model, cache, "How do I reset the device?").text

Documents are split into segments that fit the model window; each segment gets one compressed cache per
(model, template, ratio, level, scorer), stored as a self-describing safetensors blob (see :mod:`.blob`) under a
generated name. Writes are ordered so that no row ever points at a missing or partial blob: blob (temp file, fsync,
rename) first, then the rows in one transaction; a failed transaction removes its blobs, and :meth:`CacheStore.gc`
removes blobs that a crash left without a row.
"""

from .blob import BlobHeader, ReadStats, read_blob, write_blob
from .cache_store import (
    DB_NAME,
    CacheRecord,
    CacheStore,
    DocumentRecord,
    GCReport,
    SearchHit,
    SegmentRecord,
    VerifyProblem,
    VerifyReport,
)
from .segment import TextSegment, default_max_tokens, segment_document, split_text

__all__ = [
    "DB_NAME", "BlobHeader", "CacheRecord", "CacheStore", "DocumentRecord", "GCReport", "ReadStats", "SearchHit",
    "SegmentRecord", "TextSegment", "VerifyProblem", "VerifyReport", "default_max_tokens", "read_blob",
    "segment_document", "split_text", "write_blob",
]
