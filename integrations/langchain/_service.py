"""What the LangChain adapters share: the core service they are built on, and Documents for routed segments.

Every adapter takes ``qa=`` (a :class:`kvzip_rag.qa.QAService`, shared so one model is loaded once) or builds one
from ``store=`` (a folder or ``CacheStore``; default: the user's store) and ``model=`` (a ``KVzipModel``, an alias
or a path; loaded on first use with ``threads=``). Nothing here imports LlamaIndex.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from langchain_core.documents import Document

from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.qa import QAService, Target, matching_cache


def build_service(values: dict) -> QAService:
    """The service named by an adapter's fields (``qa``, else ``store``/``model``/``threads``/``ratio``/``level``;
    ``index``: anything with a ``.qa`` service, e.g. a ``KVzipIndex``)."""
    qa = values.get("qa")
    index = values.get("index")
    if qa is None and index is not None:
        qa = getattr(index, "qa", None)
        if not isinstance(qa, QAService):
            raise InvalidArgumentError("index= must carry a kvzip_rag.qa.QAService as .qa (e.g. a KVzipIndex)")
    if qa is not None:
        if not isinstance(qa, QAService):
            raise InvalidArgumentError(f"qa= must be a kvzip_rag.qa.QAService, got {type(qa).__name__}")
        return qa
    return QAService(values.get("store"), values.get("model"), threads=values.get("threads"),
                     ratio=values.get("ratio"), level=values.get("level"))


# Segments a retriever handed out recently, by text: a chat model that finds them in a prompt answers from their
# caches instead of re-reading them (the idiomatic {"context": retriever, ...} | prompt | chat_model chain).
_RECENT: "OrderedDict[tuple[str, str], Target]" = OrderedDict()
_RECENT_MAX = 512
_RECENT_LOCK = threading.Lock()


def remember(service: QAService, target: Target) -> None:
    if len(target.text) < 40:  # too short to recognise reliably inside a prompt
        return
    with _RECENT_LOCK:
        key = (service.store.url, target.text)
        _RECENT[key] = target
        _RECENT.move_to_end(key)
        while len(_RECENT) > _RECENT_MAX:
            _RECENT.popitem(last=False)


def recall(service: QAService) -> list[Target]:
    with _RECENT_LOCK:
        return [t for (store, _), t in _RECENT.items() if store == service.store.url]


def segment_document(service: QAService, target: Target, record: Any = None) -> Document:
    """A Document for one routed segment, with the metadata of the cache it is answered from."""
    model = service.model if service.model_loaded else None
    record = record if record is not None else service.store.get_document(target.doc_id)
    caches = [c for c in (record.caches if record is not None else []) if c.segment_index == target.segment_index]
    cache = matching_cache(caches, fingerprint=model.fingerprint if model else None,
                           template_digest=model.template.digest if model else None,
                           ratio=service.ratio, level=service.level)
    metadata = {
        **target.metadata,
        "doc_id": target.doc_id,
        "segment_index": target.segment_index,
        "cache_id": cache.id if cache else None,
        "ratio": service.ratio if service.ratio is not None else (cache.ratio if cache else None),
        "level": service.level or (cache.level if cache else None),
        "bytes": cache.kv_nbytes if cache else None,
        "full_bytes": cache.full_nbytes if cache else None,
        "kv_bits": cache.kv_bits if cache else None,
        "model": cache.model_name if cache else None,
        "score": float(target.score or 0.0),
        "routing": target.routing,
    }
    remember(service, target)
    return Document(page_content=target.text, metadata=metadata, id=target.node_id)


def target_of(document: Document) -> Target:
    meta = document.metadata
    if "doc_id" not in meta or "segment_index" not in meta:
        raise InvalidArgumentError("a Document without doc_id/segment_index metadata is not a KVzip segment")
    return Target(str(meta["doc_id"]), int(meta["segment_index"]), meta.get("score"), document.page_content,
                  {k: v for k, v in meta.items()}, meta.get("routing") or "search")
