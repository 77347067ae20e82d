"""``KVzipRetriever``: the core service's routing as LangChain Documents (no model needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, model_validator

from kvzip_rag.bridge import run_in_thread
from kvzip_rag.qa import QAService

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

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       **kwargs: Any) -> list[Document]:
        sync = run_manager.get_sync()
        return await run_in_thread(lambda: self._get_relevant_documents(query, run_manager=sync, **kwargs))
