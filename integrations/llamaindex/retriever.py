"""The LlamaIndex retriever of a KVzipIndex: the core service's routing, as the index's ``NodeWithScore`` s."""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle

from kvzip_rag.bridge import run_in_thread
from kvzip_rag.qa import check_k

if TYPE_CHECKING:
    from .index import KVzipIndex


class KVzipIndexRetriever(BaseRetriever):
    """Routes a query to this index's segments (``index.qa.route``: store full-text search, with the fallback) and
    returns their nodes (:meth:`KVzipIndex.nodes_for`)."""

    def __init__(self, index: "KVzipIndex", similarity_top_k: int = 1,
                 callback_manager: Optional[CallbackManager] = None, verbose: bool = False) -> None:
        self._index = index
        self.similarity_top_k = check_k(similarity_top_k, "similarity_top_k")  # refused when built, not when asked
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @property
    def index(self) -> "KVzipIndex":
        return self._index

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        routing = self._index.qa.route(query_bundle.query_str, self.similarity_top_k)
        return self._index.nodes_for(routing.targets)

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return await run_in_thread(lambda: self._retrieve(query_bundle))
