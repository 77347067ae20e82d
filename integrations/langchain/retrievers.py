"""``KVzipRetriever``: the core service's routing as LangChain Documents (no model needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, model_validator

from kvzip_rag.bridge import run_in_thread
from kvzip_rag.budget import DEFAULT_BUDGET, Budget
from kvzip_rag.errors import EmptyDocumentError, InvalidArgumentError
from kvzip_rag.frontier import log_stored, pick_budget
from kvzip_rag.qa import QAService
from kvzip_rag.quant import check_bits
from kvzip_rag.scorers import check_scorer

from ._service import build_service, segment_documents


class KVzipRetriever(BaseRetriever):
    """Documents for the stored segments whose compressed caches answer a query.

    Built from ``store=`` (a folder or ``CacheStore``; default: the user's store) or ``qa=`` (a shared
    :class:`kvzip_rag.qa.QAService`). Routing is the service's: segments ranked by the store's full-text search
    (BM25 on SQLite), best first; a query that matches nothing returns the first ``k`` segments with ``score`` 0.0
    and ``metadata["routing"] == "fallback"``.

    ``page_content`` is the segment text; ``id`` is ``"{doc_id}:{segment_index}"``; ``metadata`` holds the
    document's own metadata plus ``doc_id``, ``segment_index``, ``cache_id``, ``ratio``, ``level``, ``bytes``,
    ``full_bytes``, ``kv_bits``, ``model``, ``score`` and ``routing`` (the same as a LlamaIndex node's:
    ``Target.as_metadata``). ``k`` and ``doc_ids`` can be given per call. A :class:`ChatKVzip` over the same store
    that receives these Documents inside a prompt reads their ``doc_id``/``segment_index`` and answers from their
    caches.
    """

    qa: Any = Field(default=None, exclude=True, repr=False)
    store: Any = Field(default=None, exclude=True, repr=False)
    index: Any = Field(default=None, exclude=True, repr=False)
    ratio: float | None = None
    level: str | None = None
    k: int = 4
    doc_ids: list[str] | None = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _service(self) -> "KVzipRetriever":
        if not isinstance(self.qa, QAService):
            self.qa = build_service({"qa": self.qa, "store": self.store, "index": self.index, "ratio": self.ratio,
                                     "level": self.level})
        return self

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None, doc_ids: Sequence[str] | None = None) -> list[Document]:
        routing = self.qa.route(query, self.k if k is None else k, self.doc_ids if doc_ids is None else doc_ids)
        return segment_documents(self.qa, routing.targets)

    @classmethod
    def from_texts(cls, texts: Sequence[str], metadatas: Sequence[dict] | None = None, *,
                   ids: Sequence[str] | None = None, store: Any = None, model: Any = None, threads: int | None = None,
                   ratio: float | None = None, level: str | None = None, kv_bits: int | None = None,
                   scorer: str | None = None, target_bytes: str | float | None = None,
                   max_nll_loss: float | None = None, k: int = 4) -> "KVzipRetriever":
        """Compress ``texts`` (one document each; ``ids``: their document ids, default a hash of the text) into
        ``store`` and return a retriever over that store: the LangChain ``from_texts`` way to build a store.

        ``kv_bits``, ``scorer`` (default ``kvzip``), ``ratio``/``level`` are the store's options
        (:meth:`CacheStore.add_document`); ``target_bytes`` (blob bytes per document token, or ``"0.02x"`` of the full
        fp16 cache) or ``max_nll_loss`` (nats) choose ratio and kv_bits, and the scorer unless given, from the
        model's measured curve instead (:mod:`kvzip_rag.frontier`). Every text is checked before any is
        compressed."""
        texts = list(texts)
        metadatas = [{} for _ in texts] if metadatas is None else [dict(m) for m in metadatas]
        names = [None] * len(texts) if ids is None else list(ids)
        if len(metadatas) != len(texts) or len(names) != len(texts):
            raise InvalidArgumentError(f"from_texts got {len(texts)} texts, {len(metadatas)} metadatas and "
                                       f"{len(names)} ids: give one of each per text")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise EmptyDocumentError(f"text {i} is empty or whitespace only; nothing to compress")
        if scorer is not None:
            check_scorer(scorer)
        qa = QAService(store, model, threads=threads, level=level)
        ratio, kv_bits, scorer, point = pick_budget(qa.model, target_bytes=target_bytes, max_nll_loss=max_nll_loss,
                                                    scorer=scorer, ratio=ratio, kv_bits=kv_bits)
        qa = QAService(qa.store, qa.model, threads=threads, ratio=ratio, level=level)
        budget = Budget(ratio or DEFAULT_BUDGET.ratio, level or DEFAULT_BUDGET.level)
        bits = check_bits(16 if kv_bits is None else kv_bits)
        with qa.lock:
            stored = [qa.store.add_document(qa.model, text, doc_id=name, metadata=metadata, ratio=budget.ratio,
                                            level=budget.level, kv_bits=bits, scorer=scorer or "kvzip")
                      for text, metadata, name in zip(texts, metadatas, names)]
        if point is not None:
            log_stored(stored, point, target_bytes)
        return cls(qa=qa, k=k)

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       **kwargs: Any) -> list[Document]:
        sync = run_manager.get_sync()
        return await run_in_thread(lambda: self._get_relevant_documents(query, run_manager=sync, **kwargs))
