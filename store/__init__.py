"""Persistence: compressed caches as safetensors blobs, indexed in SQL (SQLite by default).

    >>> from kvzip_rag.store import CacheStore
    >>> store = CacheStore("~/my-store")                       # index.sqlite + blobs/ inside
    >>> store.add_document(model, text, doc_id="manual", metadata={"lang": "en"}, ratio=0.3)
    >>> hit = store.search("how do I reset the device?", k=1)[0]
    >>> cache = store.load_cache(hit, model)                   # a PackedCache with an empty tail
    >>> kvzip_rag.answer(model, cache, "How do I reset the device?").text

Documents are split into segments that fit the model window; each segment gets one compressed cache per
(model, template, ratio, level, scorer), stored as a self-describing safetensors blob (see :mod:`.blob`) under a
generated name; the template prefix, identical for every document of a model and template, is stored once
(``prefixes`` table) and joined on load. Writes are ordered so that no row ever points at a missing or partial
blob: blob (temp file, fsync, rename) first, then the rows in one transaction; a failed transaction removes its
blobs, and :meth:`CacheStore.gc` removes blobs that a crash left without a row. Modules: :mod:`.cache_store`
(storage API), :mod:`.indexer` (segment -> compress -> store), :mod:`.blob` (the checked blob format),
:mod:`.backends` (where blob bytes live: a local folder; :mod:`.objects`: object storage), :mod:`.reserve` (full
disks), :mod:`.cachefile` (cache <-> blob, ratio policy), :mod:`.prefixes` (the shared prefix), :mod:`.schema` (ORM,
migrations), :mod:`.ranking` (full-text ranking), :mod:`.loading`, :mod:`.maintenance`, :mod:`.records`, :mod:`.lru`,
:mod:`.filters`, :mod:`.validate`, :mod:`.backup`, :mod:`.distributed` (indexing on Ray).

The cache codec and the indexer (which import torch) are imported on first use: a store opened to list, search,
delete or gc never imports torch or transformers (``kvzip-rag ls`` starts fast).
"""

import importlib

from .backends import BlobBackend, LocalBlobs
from .blob import FORMAT, BlobReader, ReadStats
from .cache_store import DB_NAME, GC_MIN_AGE_S, CacheStore
from .records import (
    CacheRecord,
    CacheRef,
    DocumentRecord,
    GCReport,
    SearchHit,
    SegmentRecord,
    VerifyProblem,
    VerifyReport,
)
from .segment import TextSegment, default_max_tokens, segment_document, split_text

__all__ = [
    "DB_NAME", "FORMAT", "GC_MIN_AGE_S", "BlobBackend", "BlobReader", "CacheRecord", "CacheRef", "CacheStore",
    "DocumentRecord",
    "GCReport", "Indexer", "LocalBlobs", "ReadStats", "SearchHit", "SegmentRecord", "TextSegment", "VerifyProblem",
    "VerifyReport", "default_max_tokens", "read_cache", "read_cache_header", "segment_document", "split_text",
    "verify_cache", "write_cache",
]

_LAZY = {"read_cache": "cachefile", "read_cache_header": "cachefile", "verify_cache": "cachefile",
         "write_cache": "cachefile", "Indexer": "indexer"}


def __getattr__(name: str):
    """PEP 562: the torch-importing names, on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
